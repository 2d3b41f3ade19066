package vmtest

import (
	"strings"
	"testing"
)

// A console as CI's TestEngines printed it when the outer kernel crashed
// under TCG's nested SVM (trimmed).
const outerCrashConsole = `KRUN-E2E-HEARTBEAT
run| hi
run rc=3
[   30.291731] kvm [549]: vcpu0, guest rIP: 0xffffffffae87e744 Unhandled WRMSR(0xc0010007) = 0xffff
KRUN-E2E-HEARTBEAT
[   15.631556] BUG: TASK stack guard page was hit at 00000000c3f3ab56 (stack is 000000004beff36b..000000006121da41)
[   15.633143] stack guard page: 0000 [#1] PREEMPT SMP NOPTI
[   15.633484] CPU: 0 PID: 555 Comm: krun-oci Not tainted 6.1.0-57-amd64 #1  Debian 6.1.192-3
[   39.073249] Kernel panic - not syncing: corrupted stack end detected inside scheduler
[   39.074366] Kernel Offset: disabled
`

func TestOuterKernelCrashed(t *testing.T) {
	later := strings.Repeat("inner| still running\n", 60)
	tests := []struct {
		name    string
		console string
		verdict string
		killed  bool
		want    bool
	}{
		{"outer panic, QEMU exited", outerCrashConsole, "", false, true},
		{"killed by the harness", outerCrashConsole, "", true, false},
		{"verdict before the panic", outerCrashConsole, "fail x", false, false},
		{"no panic", "KRUN-E2E-HEARTBEAT\nrun rc=0\n", "", false, false},
		// An inner guest's panic, forwarded long before the end, did
		// not end the outer guest.
		{"inner panic long before the end", outerCrashConsole + later, "", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &Result{Console: tc.console, Verdict: tc.verdict}
			if got := outerKernelCrashed(r, tc.killed); got != tc.want {
				t.Errorf("outerKernelCrashed = %v, want %v", got, tc.want)
			}
		})
	}
	if got, want := outerPanicLine(outerCrashConsole), "Kernel panic - not syncing: corrupted stack end detected inside scheduler"; got != want {
		t.Errorf("outerPanicLine = %q, want %q", got, want)
	}
}
