package main

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestInitSurvivesSignals: no signal another process sends PID 1 ends it
// (PID 1 exiting is a kernel panic, and the host then learns nothing of
// the command): a root command's kill -ABRT 1 (or SEGV, BUS, FPE, ILL,
// TRAP, STKFLT, SYS), which Go's runtime answered with a crash and exit
// 2, as well as the ones it already caught. The check runs in a child
// process (this test binary, told so by the environment), which signals
// itself after ignoreInitSignals and must still be there to exit 0.
func TestInitSurvivesSignals(t *testing.T) {
	if sig := os.Getenv("KRUN_INIT_TEST_SIGNAL"); sig != "" {
		var n int
		fmt.Sscan(sig, &n)
		ignoreInitSignals()
		unix.Kill(os.Getpid(), unix.Signal(n))
		time.Sleep(200 * time.Millisecond) // the handler has run by now
		os.Exit(0)
	}
	for _, sig := range []unix.Signal{unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1,
		unix.SIGABRT, unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE, unix.SIGILL, unix.SIGTRAP, unix.SIGSTKFLT, unix.SIGSYS} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestInitSurvivesSignals$")
		cmd.Env = append(os.Environ(), fmt.Sprintf("KRUN_INIT_TEST_SIGNAL=%d", int(sig)))
		out, err := cmd.CombinedOutput()
		if err != nil {
			first := string(out)
			if len(first) > 200 {
				first = first[:200]
			}
			t.Errorf("%v sent to init's process: %v\n%s", sig, err, first)
		}
	}
}
