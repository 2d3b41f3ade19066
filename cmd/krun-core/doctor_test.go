package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/core/boot/boottest"
	"github.com/krun-core/krun-core/core/kvm"
)

// doctor's verdict is kvm.CheckHost's, in text and JSON, with exit status
// 1 when run cannot work here.
func TestDoctor(t *testing.T) {
	want := kvm.CheckHost()
	wantRC := 0
	if want != nil {
		wantRC = 1
	}
	var out, errb bytes.Buffer
	if rc := doctorCommand(nil, &out, &errb); rc != wantRC {
		t.Fatalf("doctor exit %d, want %d (CheckHost: %v); stderr %q", rc, wantRC, want, errb.String())
	}
	first := strings.SplitN(out.String(), "\n", 2)[0]
	// The line says "NOT usable" once, not "NOT usable: no usable KVM".
	if want != nil && first != "kvm: NOT usable: "+strings.TrimPrefix(want.Error(), "no usable KVM: ") {
		t.Errorf("doctor says %q, want the CheckHost line %q", first, want)
	}
	if want == nil && !strings.HasPrefix(first, "kvm: usable") {
		t.Errorf("doctor says %q on a usable host", first)
	}
	out.Reset()
	doctorCommand([]string{"--output", "json"}, &out, &errb)
	var r doctorReport
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("doctor --output json: %v\n%s", err, out.String())
	}
	if r.KVM.Usable != (want == nil) || (want != nil && r.KVM.Problem != want.Error()) {
		t.Errorf("doctor --output json kvm = %+v, CheckHost %v", r.KVM, want)
	}
	if rc := doctorCommand([]string{"extra"}, &out, &errb); rc != 1 {
		t.Errorf("doctor extra: exit %d", rc)
	}
	out.Reset()
	if rc := doctorCommand([]string{"--help"}, &out, &errb); rc != 0 || !strings.Contains(out.String(), "usage: krun-core doctor") {
		t.Errorf("doctor --help: exit %d, stdout %q", rc, out.String())
	}
}

// TestDoctorKernel: doctor names the kernel run would boot, its release
// and its module tree, or why there is none (from review: it said nothing
// of the kernel, which run needs as much as KVM).
func TestDoctorKernel(t *testing.T) {
	dir := t.TempDir()
	k := filepath.Join(dir, "boot", "vmlinuz-6.1.0-test")
	os.MkdirAll(filepath.Dir(k), 0o755)
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	t.Setenv("KRUN_KERNEL", k)
	var out, errb bytes.Buffer
	doctorCommand(nil, &out, &errb)
	if !strings.Contains(out.String(), "kernel: "+k+": modules of 6.1.0-test: ") {
		t.Errorf("no module tree: doctor says\n%s", out.String())
	}
	mods := filepath.Join(dir, "lib", "modules", "6.1.0-test")
	os.MkdirAll(filepath.Join(mods, "kernel"), 0o755)
	out.Reset()
	doctorCommand(nil, &out, &errb)
	if !strings.Contains(out.String(), "kernel: "+k+" (release 6.1.0-test, modules in "+mods+")\n") {
		t.Errorf("a kernel with its modules: doctor says\n%s", out.String())
	}
	t.Setenv("KRUN_KERNEL", filepath.Join(dir, "nope"))
	out.Reset()
	doctorCommand([]string{"--output", "json"}, &out, &errb)
	var r doctorReport
	if err := json.Unmarshal(out.Bytes(), &r); err != nil || r.Kernel.Path != "" || !strings.Contains(r.Kernel.Problem, "KRUN_KERNEL="+filepath.Join(dir, "nope")) {
		t.Errorf("no kernel: %+v, %v\n%s", r.Kernel, err, out.String())
	}
}
