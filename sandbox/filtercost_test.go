package sandbox

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cost of the plugins' seccomp filters per system call (docs/BENCHMARKS.md,
// "The cost of the sandbox per request"). A filter is for the life of a
// process, so a child (this test binary in helper mode "filtercost")
// installs the filters and times the calls; the benchmark reports its
// figure as ns/call.

const (
	envCostFilter = "KRUN_SANDBOX_TEST_COST_FILTER" // none, fs (the fs launch filter and Restrict's), walk
	envCostCalls  = "KRUN_SANDBOX_TEST_COST_CALLS"
)

// BenchmarkFilterCost times getppid, whose rule is unconditional: the
// kernel's action cache answers for it without running the filters
// ("fs"), against no filter ("none") and against a filter the cache cannot
// answer for, the fs launch filter with getppid's rule made to look at an
// argument and placed last ("walk"), which is what every call would cost
// without the cache.
func BenchmarkFilterCost(b *testing.B) {
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	for _, mode := range []string{"none", "fs", "walk"} {
		b.Run(mode, func(b *testing.B) {
			cmd := exec.Command(self)
			cmd.Env = append(os.Environ(), envHelper+"=filtercost", envCostFilter+"="+mode, envCostCalls+"="+strconv.Itoa(b.N))
			out, err := cmd.CombinedOutput()
			if err != nil {
				b.Fatalf("helper: %v: %s", err, out)
			}
			ns, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
			if err != nil {
				b.Fatalf("helper output %q: %v", out, err)
			}
			b.ReportMetric(ns, "ns/call")
		})
	}
}

// filterCostMain is the helper: it installs the filters and prints the
// best ns per getppid over five batches of N calls.
func filterCostMain() int {
	runtime.LockOSThread() // the filters below are this thread's (no TSYNC)
	n, err := strconv.Atoi(os.Getenv(envCostCalls))
	if err != nil || n < 1 {
		fmt.Fprintln(os.Stderr, "bad call count")
		return 2
	}
	if err := installCostFilters(os.Getenv(envCostFilter)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	best := time.Duration(1<<63 - 1)
	for range 5 {
		start := time.Now()
		for range n {
			unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
		}
		best = min(best, time.Since(start))
	}
	fmt.Println(float64(best) / float64(n))
	return 0
}

func installCostFilters(mode string) error {
	if mode == "none" {
		return nil
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	e := launchEnv{Syscalls: ProfileFS, ExecFD: 9}
	outer, err := launchRules(e)
	if err != nil {
		return err
	}
	spec := filterSpec{arch: auditArch, x32Bit: x32SyscallBit, self: uint64(os.Getpid()), nums: syscallNumbers(),
		deny: unix.SECCOMP_RET_ERRNO | uint32(refusedErrno), wrongArch: unix.SECCOMP_RET_KILL_PROCESS}
	switch mode {
	case "fs":
		spec.rules = outer
	case "walk":
		// getppid last, and conditional (pid argument 0 == 0 always holds).
		for _, r := range outer {
			if r.name != "getppid" {
				spec.rules = append(spec.rules, r)
			}
		}
		spec.rules = append(spec.rules, allowIf("getppid", "arg0 == 0", "benchmark", all(eq(0, 0))))
	default:
		return fmt.Errorf("unknown filter %q", mode)
	}
	prog, err := compileFilter(spec)
	if err != nil {
		return err
	}
	if _, err := seccompInstall(prog, specAllow); err != nil {
		return fmt.Errorf("install filter: %w", err)
	}
	if mode == "fs" {
		inner, err := policyRules(Policy{Syscalls: ProfileFS})
		if err != nil {
			return err
		}
		narrow, err := compileNarrowing(narrowSpec{arch: auditArch, x32Bit: x32SyscallBit, self: uint64(os.Getpid()),
			outer: outer, inner: inner, nums: syscallNumbers(), deny: unix.SECCOMP_RET_ERRNO | uint32(refusedErrno)})
		if err != nil {
			return err
		}
		if _, err := seccompInstall(narrow, specAllow); err != nil {
			return fmt.Errorf("install narrowing filter: %w", err)
		}
	}
	return nil
}
