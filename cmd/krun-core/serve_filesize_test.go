package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/devspec"
)

// TestServeDiskFileSizeLimit: the disk plugin that krun-core serve starts
// cannot grow its image past what the disk needs (RLIMIT_FSIZE, soft and
// hard): a raw image's size; a qcow2 image's size plus its worst-case
// growth to max-size=, from the launch; without max-size=, to the
// capacity the plugin reports, set once it has opened the image and
// before it serves. Read from /proc/PID/limits of the running plugin.
func TestServeDiskFileSizeLimit(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	dir := t.TempDir()
	raw := filepath.Join(dir, "d.raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(raw, 1<<30); err != nil {
		t.Fatal(err)
	}
	// An image each: a plugin outlives its serve for a moment (its
	// parent-death signal), holding the image's lock, and the next
	// serve of the same image was refused (seen in CI run 30).
	var qs uint64
	qcow2 := func(name string) string {
		q := filepath.Join(dir, name)
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", q, "2G").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		st, err := os.Stat(q)
		if err != nil {
			t.Fatal(err)
		}
		if qs != 0 && qs != uint64(st.Size()) {
			t.Fatalf("qemu-img made images of %d and %d bytes", qs, st.Size())
		}
		qs = uint64(st.Size())
		return q
	}
	q1, q2 := qcow2("max.qcow2"), qcow2("capacity.qcow2")
	for _, c := range []struct {
		name, disk string
		want       uint64
	}{
		{"raw", "path=" + raw + ",format=raw", 1 << 30},
		{"qcow2 max-size", "path=" + q1 + ",format=qcow2,max-size=4G", qs + devspec.QCOW2Growth(4<<30)},
		{"qcow2 capacity", "path=" + q2 + ",format=qcow2", qs + devspec.QCOW2Growth(2<<30)},
	} {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".sock")
			s := startServe(t, bin, "--socket", sock, "--disk", c.disk)
			waitSocket(t, s, sock)
			pid, err := waitPlugin(s, 1, 20*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			want := strconv.FormatUint(c.want, 10)
			if soft, hard := procLimit(t, pid, "Max file size"); soft != want || hard != want {
				t.Errorf("plugin pid %d: Max file size %s %s, want %s bytes", pid, soft, hard, want)
			}
		})
	}
}
