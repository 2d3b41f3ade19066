package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/boot/boottest"
	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/vmm"
)

func TestRunUsageErrors(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	pd := filepath.Join(dir, "plugins") // krun-plugin-blk-raw only
	os.Mkdir(pd, 0o755)
	os.WriteFile(filepath.Join(pd, "krun-plugin-blk-raw"), []byte("#!/bin/false\n"), 0o755)
	img := filepath.Join(dir, "disk.raw")
	os.WriteFile(img, make([]byte, 4096), 0o644)
	sock := filepath.Join(dir, "absent.sock")
	nineDisks := []string{"--kernel", k}
	for i := 0; i < 9; i++ {
		nineDisks = append(nineDisks, "--disk", "path="+img+",format=raw")
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--kernel", k, "--bogus"}, "unknown flag --bogus (see krun-core run --help)"},
		{[]string{"--kernel"}, "a value is needed for --kernel"},
		{[]string{"--kernel", k, "--cpus", "two"}, `invalid value "two" for flag --cpus`},
		{[]string{"--kernel", k, "--log-level", "loud"}, `--log-level="loud"`},
		{[]string{"--kernel", k, "--log-format", "xml"}, `--log-format="xml": want text or json`},
		{[]string{"--kernel", k, "--vhost-user", "type=scsi,socket=" + sock}, `--vhost-user type=scsi,socket=` + sock + `: type="scsi": want blk, fs, net or a virtio device ID`},
		{[]string{"--kernel", k, "--vhost-user", "type=blk"}, "socket= is required"},
		{[]string{"--kernel", k, "--vhost-user", "type=blk,socket=" + sock + ",tag=x"}, "tag= is for type=fs only"},
		{[]string{"--kernel", k, "--vhost-user", "type=blk,socket=" + sock}, "vhost-user back-end socket " + sock + ": no such file or directory"},
		{[]string{"--kernel", k, "--vhost-user", "type=fs,tag=t,socket=" + img}, "vhost-user back-end socket " + img + " is not a socket"},
		{[]string{"--kernel", k, "--plugin", "Bad_Kind"}, `--plugin Bad_Kind: plugin kind "Bad_Kind"`},
		{[]string{"--kernel", k, "--plugin-dir", pd, "--plugin", "nothere,x=1"}, "krun-plugin-nothere not found in " + pd},
		{[]string{"--kernel", k, "--plugin-dir", filepath.Join(dir, "nope"), "--disk", "path=" + img + ",format=raw"}, "--plugin-dir " + filepath.Join(dir, "nope") + ": no such directory"},
		{[]string{"--kernel", filepath.Join(dir, "nokernel"), "--plugin-dir", pd}, "--kernel " + filepath.Join(dir, "nokernel") + ": no such file or directory"},
		{nineDisks, "more than 8 devices"},
		{[]string{}, "nothing to run"},
		{[]string{"--kernel", k, "--env", "A=b"}, "need --root"},
		{[]string{"--kernel", k + ".missing", "--initrd", k}, "--kernel"},
		{[]string{"--kernel", k, "--memory", "12Q"}, "--memory"},
		{[]string{"--kernel", k, "--memory", "1536K"}, "whole number of MiB"},
		{[]string{"--kernel", k, "--cpus", "0"}, "vCPUs"},
		{[]string{"--kernel", k, "--disk", "path=/x"}, "--disk"},
		{[]string{"--kernel", k, "--sandbox", "maybe"}, "--sandbox"},
		{[]string{"--kernel", k, "--sandbox", "off", "--sandbox-disable", "root"}, "--sandbox-disable"},
		{[]string{"--kernel", k, "--plugin-uid", "0"}, "--plugin-uid: 0: plugins never run as host root"},
		{[]string{"--kernel", k, "--plugin-gid", "-5"}, "--plugin-gid"},
		{[]string{"--kernel", k, "--initrd", k, "--disk", "path=/x"}, "--disk"},
		{[]string{"--kernel", k, "--boot-timeout", "soon"}, "not a duration"},
		{[]string{"--kernel", k, "--boot-timeout", "-5s"}, "negative"},
		{[]string{"--kernel", k, "--boot-timeout", "-5"}, `"-5" is negative`},
		{[]string{"--kernel", k, "--handshake-timeout", "0"}, "--handshake-timeout: 0s is not positive"},
		{[]string{"--kernel", k, "--handshake-timeout", "soon"}, "not a duration"},
		// Checked before the KVM check, as the other flags are (from
		// review: a directory or /dev/null got that far).
		{[]string{"--kernel", dir}, "--kernel " + dir + ": not a regular file"},
		{[]string{"--kernel", k, "--initrd", "/dev/null"}, "--initrd /dev/null: not a regular file"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		if rc := runCommand(tt.args, &out, &errb); rc != 1 {
			t.Errorf("%v: exit %d, want 1", tt.args, rc)
		}
		if !strings.Contains(errb.String(), tt.want) || strings.Count(errb.String(), "\n") != 1 || !strings.HasPrefix(errb.String(), "krun-core run: ") {
			t.Errorf("%v: stderr %q: want one line containing %q", tt.args, errb.String(), tt.want)
		}
	}
}

// On a host whose KVM cannot boot a stock kernel (no /dev/kvm, or a PVM
// one), run exits 1 at once with the one line kvm.CheckHost gives, before
// any plugin starts.
func TestRunWithoutKVM(t *testing.T) {
	want := kvm.CheckHost()
	if want == nil {
		t.Skip("this host's KVM boots stock kernels; the refusal is not reachable")
	}
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	// A disk too: its plugin must not be started (it would fail: it is
	// not a plugin at all).
	pd := t.TempDir()
	os.WriteFile(filepath.Join(pd, "krun-plugin-blk-raw"), []byte("#!/bin/false\n"), 0o755)
	var out, errb bytes.Buffer
	start := time.Now()
	rc := runCommand([]string{"--kernel", k, "--plugin-dir", pd, "--disk", "path=" + img + ",format=raw"}, &out, &errb)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("run took %v to refuse, want under 2 s", took)
	}
	if rc != 1 {
		t.Fatalf("exit %d, want 1", rc)
	}
	lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "/dev/kvm") || lines[0] != "krun-core run: "+want.Error() {
		t.Errorf("stderr %q: want the one line %q", errb.String(), "krun-core run: "+want.Error())
	}
}

func TestParseMemory(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want uint64
		ok   bool
	}{{"512", 512, true}, {"512M", 512, true}, {"2G", 2048, true}, {"1T", 1 << 20, true}, {"100K", 0, false}, {"x", 0, false}} {
		got, err := parseMemory(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseMemory(%q) = %d, %v", tt.in, got, err)
		}
	}
}

// run --root DIR -- CMD refuses what it cannot run before any VM starts,
// with one line and the documented status: 125 for krun-core's own
// failures, 127 for a command not in the root, 126 for one that is not
// executable.
func TestRunRootErrors(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/data"), []byte("x"), 0o644)
	file := filepath.Join(root, "bin/sh")
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	tests := []struct {
		name string
		args []string
		rc   int
		want string
	}{
		{"missing root", []string{"--kernel", k, "--root", root + "/nope", "--", "sh"}, 125, "root"},
		{"root is a file", []string{"--kernel", k, "--root", file, "--", "sh"}, 125, "not a directory"},
		{"no command", []string{"--kernel", k, "--root", root}, 125, "needs a command"},
		{"command without root", []string{"--kernel", k, "--", "sh"}, 125, "needs --root"},
		{"root with initrd", []string{"--kernel", k, "--initrd", k, "--root", root, "--", "sh"}, 125, "alternatives"},
		{"command not found", []string{"--kernel", k, "--root", root, "--", "nosuch"}, 127, "command not found"},
		{"command not executable", []string{"--kernel", k, "--root", root, "--", "/bin/data"}, 126, "not executable"},
		{"bad rlimit", []string{"--kernel", k, "--root", root, "--rlimit", "nofile=x", "--", "sh"}, 125, "--rlimit"},
		{"relative workdir", []string{"--kernel", k, "--root", root, "--workdir", "tmp", "--", "sh"}, 125, "--workdir"},
		{"bad user", []string{"--kernel", k, "--root", root, "--user", "al ice", "--", "sh"}, 125, "--user"},
		{"empty group", []string{"--kernel", k, "--root", root, "--user", "alice:", "--", "sh"}, 125, "empty group"},
		{"user without root", []string{"--kernel", k, "--user", "alice"}, 1, "need --root"},
		{"port without root", []string{"--kernel", k, "--port", "8080:80"}, 1, "need --root"},
		{"root open files without root", []string{"--kernel", k, "--root-open-files", "4096"}, 1, "need --root"},
		{"bad port", []string{"--kernel", k, "--root", root, "--port", "80:x", "--", "sh"}, 125, "--port: port map: 80:x is not HOST:GUEST"},
		{"port with more keys", []string{"--kernel", k, "--root", root, "--port", "8080:80,mtu=1500", "--", "sh"}, 125, "--port: port map: 8080:80,mtu=1500 is not HOST:GUEST"},
		{"port twice", []string{"--kernel", k, "--root", root, "--port", "8080:80", "--port", "8080:81", "--", "sh"}, 125, "host port 8080 forwarded twice"},
		{"rlimit number unknown", []string{"--kernel", k, "--root", root, "--rlimit", "16=1:2", "--", "sh"}, 125, "--rlimit"},
		{"missing kernel", []string{"--kernel", k + ".missing", "--root", root, "--", "sh"}, 125, "--kernel"},
		{"kernel is a directory", []string{"--kernel", root, "--root", root, "--", "sh"}, 125, "--kernel " + root + ": not a regular file"},
		// --root without "--" runs a command all the same: its bad flag
		// exits 125 too (from review).
		{"bad flag, command without --", []string{"--kernel", k, "--root", root, "--cpus", "x", "sh"}, 125, "--cpus"},
		{"unknown flag, command without --", []string{"--bogus", "--root=" + root, "sh"}, 125, "--bogus"},
		{"escape sequence in the command", []string{"--kernel", k, "--root", root, "--", "/bin/s\x1b[31mh"}, 127, `"/bin/s\x1b[31mh"`},
		{"boot timeout too large", []string{"--kernel", k, "--root", root, "--boot-timeout", "99999999999", "--", "sh"}, 125, "too large"},
		{"boot timeout negative", []string{"--kernel", k, "--root", root, "--boot-timeout", "-5", "--", "sh"}, 125, "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			start := time.Now()
			if rc := runCommand(tt.args, &out, &errb); rc != tt.rc {
				t.Errorf("exit %d, want %d (stderr %q)", rc, tt.rc, errb.String())
			}
			if time.Since(start) > 2*time.Second {
				t.Errorf("took %v", time.Since(start))
			}
			lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tt.want) {
				t.Errorf("stderr %q: want one line with %q", errb.String(), tt.want)
			}
		})
	}
	// No kernel anywhere: one line naming where krun-core looked.
	t.Setenv("KRUN_KERNEL", "")
	os.Unsetenv("KRUN_KERNEL")
	t.Setenv("KRUN_KERNEL_CACHE", t.TempDir())
	if _, err := vmm.FindKernel(); err == nil {
		t.Skip("this host has a kernel of its own in /boot; the missing-kernel case is not reachable")
	}
	var out, errb bytes.Buffer
	if rc := runCommand([]string{"--root", root, "--", "sh"}, &out, &errb); rc != 125 || !strings.Contains(errb.String(), "make kernel") ||
		strings.Count(errb.String(), "\n") != 1 {
		t.Errorf("no kernel: exit %d, stderr %q", rc, errb.String())
	}
	// The root and the command are checked before the kernel is looked
	// for: without a kernel they are still reported as such, with their
	// own status (from review).
	for _, tc := range []struct {
		args []string
		rc   int
		want string
	}{
		{[]string{"--root", root + "/nope", "--", "sh"}, 125, "root " + root + "/nope"},
		{[]string{"--root", root, "--", "nosuch"}, 127, "command not found"},
		{[]string{"--root", root, "--", "/bin/data"}, 126, "not executable"},
	} {
		out.Reset()
		errb.Reset()
		if rc := runCommand(tc.args, &out, &errb); rc != tc.rc || !strings.Contains(errb.String(), tc.want) || strings.Contains(errb.String(), "kernel") {
			t.Errorf("%q without a kernel: exit %d, stderr %q; want %d and %q", tc.args, rc, errb.String(), tc.rc, tc.want)
		}
	}
	// A kernel found by the search is not called --kernel.
	t.Setenv("KRUN_KERNEL", root)
	out.Reset()
	errb.Reset()
	if rc := runCommand([]string{"--root", root, "--", "sh"}, &out, &errb); rc != 125 || !strings.Contains(errb.String(), "KRUN_KERNEL="+root+": not a regular file") {
		t.Errorf("KRUN_KERNEL a directory: exit %d, stderr %q", rc, errb.String())
	}
}

// TestRunFindsARelativeCommandFromWorkdir: ./server with --workdir /app is
// looked up in /app, as krun-init will (from review: it was "command not
// found", 127, on the host).
func TestRunFindsARelativeCommandFromWorkdir(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "app/bin"), 0o755)
	os.WriteFile(filepath.Join(root, "app/server"), []byte("#!"), 0o755)
	os.WriteFile(filepath.Join(root, "app/bin/tool"), []byte("#!"), 0o755)
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	for _, args := range [][]string{
		{"--workdir", "/app", "--", "./server"},
		{"--workdir", "/app", "--env", "PATH=bin", "--", "tool"},
		{"--workdir", "/app/bin", "--", "../server"},
	} {
		var out, errb bytes.Buffer
		rc := runCommand(append([]string{"--kernel", k, "--root", root}, args...), &out, &errb)
		// Past the lookup the run fails on this kernel or this host's
		// KVM, with 125; never 127.
		if rc != 125 || strings.Contains(errb.String(), "command not found") {
			t.Errorf("%q: exit %d, stderr %q; want the command found", args, rc, errb.String())
		}
	}
}

// TestShareMountNeedsRoot: --fs mount=GUESTDIR is where run --root mounts
// a share; run without a root and serve have no krun-init to mount it, so
// they refuse it with one line before anything starts.
func TestShareMountNeedsRoot(t *testing.T) {
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	var out, errb bytes.Buffer
	rc := runCommand([]string{"--kernel", k, "--initrd", k, "--fs", "path=" + dir + ",tag=d,mount=/data"}, &out, &errb)
	if rc != 1 || !strings.Contains(errb.String(), "mount= needs a root directory") || strings.Count(errb.String(), "\n") != 1 {
		t.Errorf("run without --root: exit %d, stderr %q", rc, errb.String())
	}
	if _, err := parseServeArgs([]string{"--socket", filepath.Join(dir, "s"), "--fs", "path=" + dir + ",tag=d,mount=/data"}); err == nil || !strings.Contains(err.Error(), "mount=") {
		t.Errorf("serve --fs mount=: %v", err)
	}
}

// TestSecondsFlag: --boot-timeout's values: a duration or a number of
// seconds; a negative or too large one is named as such.
func TestSecondsFlag(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"90", 90 * time.Second, ""},
		{"+5", 5 * time.Second, ""},
		{"0", 0, ""},
		{"2m", 2 * time.Minute, ""},
		{"1m30s", 90 * time.Second, ""},
		{"-5", 0, "is negative"},
		{"-1s", 0, "is negative"},
		{"-99999999999999999999", 0, "is negative"},
		{"99999999999", 0, "too large"},
		{"99999999999999999999", 0, "too large"},
		{"soon", 0, "is not a duration"},
	}
	for _, tc := range tests {
		var d secondsFlag
		err := d.Set(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Set(%q) = %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || time.Duration(d) != tc.want {
			t.Errorf("Set(%q) = %v, %v; want %v", tc.in, time.Duration(d), err, tc.want)
		}
	}
}

// TestRunPortAddsANetwork: --port HOST:GUEST (krunvm's --port, libkrun's
// krun_set_port_map) gives the guest a passt network when no --net does,
// so its plugin must be there before anything starts; with a --net the
// port goes to that one. libkrun's numbered --rlimit passes too.
func TestRunPortAddsANetwork(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	pd := t.TempDir() // the root's and the console's plugins, no network's
	for _, p := range []string{"krun-plugin-fs-virtio", "krun-plugin-console"} {
		os.WriteFile(filepath.Join(pd, p), []byte("#!/bin/false\n"), 0o755)
	}
	base := []string{"--kernel", k, "--plugin-dir", pd, "--root", root, "--rlimit", "6=4096:8192"}
	for _, tt := range []struct {
		args  []string
		passt bool // the run wants krun-plugin-net-passt
	}{
		{nil, false},
		{[]string{"--port", "8080:80"}, true},
		{[]string{"--port", "8080"}, true},
		{[]string{"--net", "passt", "--port", "8080:80"}, true}, // the --net's own plugin
	} {
		var out, errb bytes.Buffer
		rc := runCommand(append(append(slices.Clone(base), tt.args...), "--", "sh"), &out, &errb)
		wantPasst := "krun-plugin-net-passt not found"
		if rc != 125 || strings.Contains(errb.String(), wantPasst) != tt.passt || strings.Count(errb.String(), "\n") != 1 {
			t.Errorf("%q: exit %d, stderr %q; want 125 and one line, naming the missing passt plugin: %v", tt.args, rc, errb.String(), tt.passt)
		}
	}
}
