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

	"github.com/krun-core/krun-core/core/boot/boottest"
)

func TestRunMissingDeviceFileNamedFirst(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
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
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
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

// TestRunExecConfigCheckedFirst: mistakes in what --root DIR -- CMD builds
// the guest's configuration from are one line naming the flag, before the
// KVM check (they were found only inside Start, after it, and named the
// configuration's internal fields, "env[2]"; from review).
func TestRunExecConfigCheckedFirst(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	elf := filepath.Join(dir, "vmlinux")
	os.WriteFile(elf, append(append([]byte("\x7fELF"), make([]byte, 4096)...), "Linux version 6.1.0-test (builder) #1 SMP\x00"...), 0o644)
	notKernel := filepath.Join(dir, "bzImage")
	os.WriteFile(notKernel, []byte("x"), 0o644)
	k := filepath.Join(dir, "vmlinuz")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	share := filepath.Join(dir, "share")
	os.Mkdir(share, 0o755)
	pd := filepath.Join(dir, "plugins")
	os.Mkdir(pd, 0o755)
	for _, p := range []string{"krun-plugin-console", "krun-plugin-fs-virtio"} {
		os.WriteFile(filepath.Join(pd, p), []byte("#!/bin/false\n"), 0o755)
	}
	t.Setenv("KRUN_TEST_FROM_HOST", "host value")
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"env without a key", []string{"--env", "=x"}, "--env =x: want KEY=VALUE"},
		{"rlimit twice", []string{"--rlimit", "nofile=1:2", "--rlimit", "NOFILE=3:4"}, "RLIMIT_NOFILE is limited twice"},
		{"root open files too few", []string{"--root-open-files", "100"}, "--root-open-files \"100\": want a number of files from 1024 to 1048576"},
		{"root open files not a number", []string{"--root-open-files", "lots"}, "--root-open-files \"lots\": want a number of files"},
		{"the root's tag", []string{"--fs", "path=" + share + ",tag=krun-root"}, `share tag "krun-root" is the root's own`},
		{"one mount point twice", []string{"--fs", "path=" + share + ",tag=a,mount=/x", "--fs", "path=" + share + ",tag=b,mount=/x/"}, `shares "a" and "b" are both mounted at /x`},
		{"a default mount point taken", []string{"--fs", "path=" + share + ",tag=a", "--fs", "path=" + share + ",tag=b,mount=/mnt/a"}, "both mounted at /mnt/a"},
		{"no module tree", []string{"--kernel-modules", filepath.Join(dir, "nope")}, "no kernel/ directory"},
		{"not a kernel", []string{"--kernel", notKernel}, "not a bzImage"},
		// An ELF vmlinux has a release, but the boot code loads only a
		// bzImage (review of the review).
		{"an ELF kernel", []string{"--kernel", elf}, "not a bzImage"},
		// The module tree is looked for as Start looks for it.
		{"no modules next to the kernel", nil, "no module tree for kernel"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			args := append([]string{"--kernel", k, "--plugin-dir", pd, "--root", root}, tt.args...)
			rc := runCommand(append(args, "--", "sh"), &out, &errb)
			if rc != 125 || !strings.Contains(errb.String(), tt.want) || strings.Count(errb.String(), "\n") != 1 {
				t.Errorf("exit %d, stderr %q: want exit 125 and one line with %q", rc, errb.String(), tt.want)
			}
		})
	}
	// A bare --env KEY takes krun-core's own value, or nothing.
	for _, tc := range []struct {
		in   []string
		want []string
	}{
		{[]string{"KRUN_TEST_FROM_HOST"}, []string{"KRUN_TEST_FROM_HOST=host value"}},
		{[]string{"KRUN_TEST_UNSET_ANYWHERE"}, []string{}},
		{[]string{"A=1", "B="}, []string{"A=1", "B="}},
	} {
		got, err := commandEnv(tc.in)
		if err != nil || strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("commandEnv(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
