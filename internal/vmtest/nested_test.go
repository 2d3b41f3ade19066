package vmtest

import (
	"strings"
	"testing"
	"time"
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

func TestOuterKernelOopsed(t *testing.T) {
	oops := "KRUN-E2E-HEARTBEAT\n" +
		"[   80.120001] BUG: TASK stack guard page was hit at 00000000c3f3ab56 (stack is 000000004beff36b..000000006121da41)\n" +
		"[   80.120500] stack guard page: 0000 [#1] PREEMPT SMP NOPTI\n" +
		"KRUN-E2E-HEARTBEAT\n"
	tests := []struct {
		name    string
		console string
		verdict string
		want    string
	}{
		{"oops, then a failing verdict", oops, "fail krun-core run exited 137", "BUG: TASK stack guard page was hit at 00000000c3f3ab56 (stack is 000000004beff36b..000000006121da41)"},
		{"oops, no verdict", oops, "", "BUG: TASK stack guard page was hit at 00000000c3f3ab56 (stack is 000000004beff36b..000000006121da41)"},
		{"general protection fault", "[    3.5] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP\n", "fail x", "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP"},
		{"oops, but the test passed", oops, "ok", ""},
		{"a failure without an oops", "KRUN-E2E-HEARTBEAT\n[    1.0] virtio_blk virtio0: [vda] 2048 sectors\n", "fail x", ""},
		// An inner guest's report, forwarded with a prefix, is not the
		// outer kernel's.
		{"an inner guest's oops, forwarded", "run| [    2.0] BUG: kernel NULL pointer dereference\n", "fail x", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := outerKernelOopsed(&Result{Console: tc.console, Verdict: tc.verdict})
			if ok != (tc.want != "") || got != tc.want {
				t.Errorf("outerKernelOopsed = %q, %v; want %q", got, ok, tc.want)
			}
		})
	}
}

// TestInnerTripleFault: an outer guest that failed after an inner guest
// triple-faulted (krun-core's warning, printed by the script) is retried;
// one that passed, or failed otherwise, is not.
func TestInnerTripleFault(t *testing.T) {
	line := `create log| 2026-12-07T01:08:48.010Z [WARN]  krun-oci: guest triple fault: treated as reboot: vcpu=1 rip=0xffffffff81e7e744 rsp=0xffffc90000013e00 cr0=0x80050033 cr2=0x0 cr3=0x2a10000`
	tests := []struct {
		name, console, verdict string
		want                   bool
	}{
		{"fault, then a failing verdict", "KRUN-E2E-HEARTBEAT\n" + line + "\n", "fail network namespace script: exit 3", true},
		{"fault, no verdict", line + "\n", "", true},
		{"fault, but the test passed", line + "\n", "ok", false},
		{"a failure without one", "create err| the guest ended before the container was ready\n", "fail x", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := innerTripleFault(&Result{Console: tc.console, Verdict: tc.verdict})
			if ok != tc.want || (ok && got != line) {
				t.Errorf("innerTripleFault = %q, %v; want %v", got, ok, tc.want)
			}
		})
	}
}

func TestWedgeWatch(t *testing.T) {
	t0 := time.Unix(1000, 0)
	beat := "KRUN-E2E-HEARTBEAT\n"
	oops := "[   80.1] BUG: TASK stack guard page was hit at 0000\n"
	stall := "[  150.5] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
	type look struct {
		at   time.Duration
		con  string
		want string // substring of the reason; "" for none
	}
	tests := []struct {
		name  string
		looks []look
	}{
		{"heartbeats keep it alive", []look{
			{0, beat, ""}, {60 * time.Second, beat + beat, ""}, {150 * time.Second, beat + beat + beat, ""}}},
		{"silence", []look{
			{0, beat, ""}, {wedgeAfter, beat, ""}, {wedgeAfter + time.Second, beat, "printed nothing"}}},
		{"soft lockup", []look{
			{0, beat + "[ 99.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!\n", "soft lockup"}}},
		{"a fault, heartbeat goes on, no verdict", []look{
			{0, beat, ""}, {5 * time.Second, beat + oops, ""}, {60 * time.Second, beat + oops + beat, ""},
			{5*time.Second + oopsGrace, beat + oops + beat + beat, ""},
			{6*time.Second + oopsGrace, beat + oops + beat + beat + beat, "fault of its own"}}},
		// The kernel's stall reports after the fault are no progress
		// (review: they came every 63 s and put the kill off for good).
		{"a fault, then only the kernel", []look{
			{0, beat, ""}, {5 * time.Second, beat + oops, ""},
			{60 * time.Second, beat + oops + beat + stall, ""},
			{6*time.Second + oopsGrace, beat + oops + beat + stall + stall, "fault of its own"}}},
		// A script that goes on printing after a fault line (an inner
		// kernel's, printed raw, say) is left to its verdict.
		{"a fault, then progress", []look{
			{0, beat, ""}, {5 * time.Second, beat + oops, ""},
			{60 * time.Second, beat + oops + "step 2 done\n", ""},
			{6*time.Second + oopsGrace, beat + oops + "step 2 done\n" + beat, ""},
			{120 * time.Second, beat + oops + "step 2 done\n" + beat + "step 3 done\n", ""},
			{121*time.Second + oopsGrace, beat + oops + "step 2 done\n" + beat + "step 3 done\n" + beat + beat, "fault of its own"}}},
		{"an inner guest's forwarded fault", []look{
			{0, "run| " + oops, ""}, {2 * oopsGrace, "run| " + oops + beat, ""}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := wedgeWatch{lastLen: -1}
			for i, l := range tc.looks {
				got := w.check(l.con, t0.Add(l.at))
				if (got == "") != (l.want == "") || !strings.Contains(got, l.want) {
					t.Fatalf("look %d: check = %q, want %q", i, got, l.want)
				}
			}
		})
	}
}
