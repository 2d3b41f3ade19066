package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/kvm"
)

func TestRunUsageErrors(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	k := filepath.Join(dir, "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
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
		{[]string{"--kernel", filepath.Join(dir, "nokernel"), "--plugin-dir", pd}, "kernel: stat " + filepath.Join(dir, "nokernel") + ": no such file or directory"},
		{nineDisks, "more than 8 devices"},
		{[]string{}, "--kernel is required"},
		{[]string{"--kernel", k, "--memory", "12Q"}, "--memory"},
		{[]string{"--kernel", k, "--memory", "1536K"}, "whole number of MiB"},
		{[]string{"--kernel", k, "--cpus", "0"}, "vCPUs"},
		{[]string{"--kernel", k, "--disk", "path=/x"}, "--disk"},
		{[]string{"--kernel", k, "--sandbox", "maybe"}, "--sandbox"},
		{[]string{"--kernel", k, "--sandbox", "off", "--sandbox-disable", "root"}, "--sandbox-disable"},
		{[]string{"--kernel", k, "extra"}, "unexpected argument"},
		{[]string{"--kernel", k, "--boot-timeout", "soon"}, "not a duration"},
		{[]string{"--kernel", k, "--boot-timeout", "-5s"}, "negative"},
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
	os.WriteFile(k, []byte("x"), 0o644)
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
