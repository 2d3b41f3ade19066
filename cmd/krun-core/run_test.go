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
	k := filepath.Join(t.TempDir(), "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
	tests := []struct {
		args []string
		want string
	}{
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
		if !strings.Contains(errb.String(), tt.want) {
			t.Errorf("%v: stderr %q lacks %q", tt.args, errb.String(), tt.want)
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
	var out, errb bytes.Buffer
	start := time.Now()
	// A disk too: its plugin must not be started.
	rc := runCommand([]string{"--kernel", k, "--plugin-dir", "/nonexistent", "--disk", "path=" + img + ",format=raw"}, &out, &errb)
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
