package main

// TestRunMissingDeviceFileNamedFirst: README, "Command line": bad input, "a
// missing file" included, is one line naming the problem, before anything
// starts. The files of --disk and --fs were opened only in Start, after
// the KVM check, so on a host without a usable KVM a typo in a disk path
// was reported as "no usable KVM", and on a host with one the plugins of
// the devices before it started first. (From review.)

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRunMissingDeviceFileNamedFirst(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
	pd := filepath.Join(dir, "plugins")
	os.Mkdir(pd, 0o755)
	for _, p := range []string{"krun-plugin-blk-raw", "krun-plugin-blk-qcow2", "krun-plugin-fs-virtio"} {
		os.WriteFile(filepath.Join(pd, p), []byte("#!/bin/false\n"), 0o755)
	}
	missing := filepath.Join(dir, "no-such-disk.img")
	missingDir := filepath.Join(dir, "no-such-dir")
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"raw disk", []string{"--disk", "path=" + missing + ",format=raw"}, missing},
		{"qcow2 disk", []string{"--disk", "path=" + missing + ",format=qcow2"}, missing},
		{"shared directory", []string{"--fs", "path=" + missingDir + ",tag=a"}, missingDir},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			args := append([]string{"--kernel", k, "--initrd", k, "--plugin-dir", pd}, tt.args...)
			rc := runCommand(args, &out, &errb)
			if rc != 1 || !strings.Contains(errb.String(), tt.want) || strings.Count(errb.String(), "\n") != 1 {
				t.Errorf("run %q: exit %d, stderr %q: want exit 1 and one line naming %s", tt.args, rc, errb.String(), tt.want)
			}
		})
	}
}

// TestRunMissingRootPluginsNamedFirst: run -- CMD adds the root share and
// the console; their plugins are looked for before the KVM check too.
func TestRunMissingRootPluginsNamedFirst(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	for _, tt := range []struct {
		name    string
		plugins []string
		want    string
	}{
		{"no fs plugin", []string{"krun-plugin-console"}, "fs-virtio"},
		{"no console plugin", []string{"krun-plugin-fs-virtio"}, "console"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pd := filepath.Join(t.TempDir(), "plugins")
			os.Mkdir(pd, 0o755)
			for _, p := range tt.plugins {
				os.WriteFile(filepath.Join(pd, p), []byte("#!/bin/false\n"), 0o755)
			}
			var out, errb bytes.Buffer
			rc := runCommand([]string{"--kernel", k, "--plugin-dir", pd, "--root", root, "--", "sh"}, &out, &errb)
			if rc != 125 || !strings.Contains(errb.String(), tt.want) || strings.Count(errb.String(), "\n") != 1 {
				t.Errorf("exit %d, stderr %q: want exit 125 and one line naming the %s plugin", rc, errb.String(), tt.want)
			}
		})
	}
}
