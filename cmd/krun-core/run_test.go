package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
		{[]string{"--kernel", k, "--plugin-uid", "0"}, "--plugin-uid: 0: plugins never run as host root"},
		{[]string{"--kernel", k, "--plugin-gid", "-5"}, "--plugin-gid"},
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

// Without /dev/kvm, run exits 1 with one line saying so.
func TestRunWithoutKVM(t *testing.T) {
	if _, err := os.Stat("/dev/kvm"); err == nil {
		t.Skip("this host has /dev/kvm")
	}
	k := filepath.Join(t.TempDir(), "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
	var out, errb bytes.Buffer
	if rc := runCommand([]string{"--kernel", k}, &out, &errb); rc != 1 {
		t.Fatalf("exit %d, want 1", rc)
	}
	lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "/dev/kvm") {
		t.Errorf("stderr %q: want one line about /dev/kvm", errb.String())
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
