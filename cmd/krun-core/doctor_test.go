package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

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
	if want != nil && first != "kvm: NOT usable: "+want.Error() {
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
