package main

// Every short form an img page documents is accepted. (From review; test
// by a helper.)

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

// `krun-core img convert --help` documents "-b, --backing FILE", and the
// img page says the qemu-img short form -b works; convert refuses it as
// an unknown flag.
func TestImgConvertShortBacking(t *testing.T) {
	var page bytes.Buffer
	dispatch([]string{"img", "convert", "--help"}, &page, &page)
	if !strings.Contains(page.String(), "-b, --backing FILE") {
		t.Fatalf("convert's page no longer documents -b:\n%s", page.String())
	}
	dir := t.TempDir()
	// A plugin directory that does not exist: the command stops there,
	// after its flags were parsed, without starting anything.
	var out, errb bytes.Buffer
	dispatch([]string{"img", "convert", "--plugin-dir", filepath.Join(dir, "none"), "-f", "qcow2", "-O", "raw",
		"-b", filepath.Join(dir, "base.qcow2"), "--backing-format", "qcow2", filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "out.raw")}, &out, &errb)
	if strings.Contains(errb.String(), "unknown flag -b") {
		t.Errorf("img convert -b FILE, documented on its page: %q", errb.String())
	}
}

// The img page says the qemu-img short form -F FMT works; create took it,
// convert and resize refused it as an unknown flag (from review).
func TestImgShortBackingFormat(t *testing.T) {
	dir := t.TempDir()
	none := filepath.Join(dir, "none") // no plugins: the command stops after its flags
	for _, args := range [][]string{
		{"img", "convert", "--plugin-dir", none, "-f", "qcow2", "-O", "raw",
			"-b", filepath.Join(dir, "base.qcow2"), "-F", "qcow2", filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "out.raw")},
		{"img", "resize", "--plugin-dir", none, "-f", "qcow2",
			"-b", filepath.Join(dir, "base.qcow2"), "-F", "qcow2", filepath.Join(dir, "top.qcow2"), "+1M"},
	} {
		var out, errb bytes.Buffer
		dispatch(args, &out, &errb)
		if strings.Contains(errb.String(), "unknown flag -F") || strings.Contains(errb.String(), "needs --backing-format") {
			t.Errorf("%s: %q", strings.Join(args[:2], " "), errb.String())
		}
	}
	var page bytes.Buffer
	dispatch([]string{"img", "--help"}, &page, &page)
	if !strings.Contains(page.String(), "-F FMT") {
		t.Fatalf("the img page no longer documents -F:\n%s", page.String())
	}
}
