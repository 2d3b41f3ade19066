package main

// From review (helper-117): krun-core shares its stderr with the command
// (`krun-core run ... -- CMD 2>&1 | head -1`). Once that pipe's reader has
// gone, krun-core's own next line on stderr (its error line, --timing,
// the guest console's tail, a logged error while the guest runs) killed
// it with SIGPIPE: Go's runtime does that for a write to descriptor 1 or 2
// through an *os.File unless the program handles SIGPIPE. The run then
// ended with 141 instead of the command's status or krun-core's own,
// without its tear-down, and with the user's terminal left in raw mode.

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const brokenStderrHelperEnv = "KRUN_CORE_TEST_BROKEN_STDERR"

// TestRunOnBrokenStderrHelperProcess is not a test: run as a child of
// TestRunOnBrokenStderrKeepsItsStatus, it makes its stderr a pipe without
// a reader and runs krun-core run with a root that does not exist (one
// line on stderr, status 125), then reports the status on stdout.
func TestRunOnBrokenStderrHelperProcess(t *testing.T) {
	if os.Getenv(brokenStderrHelperEnv) == "" {
		return
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		fmt.Println("pipe:", err)
		os.Exit(2)
	}
	unix.Close(p[0]) // the reader went away
	if err := unix.Dup3(p[1], 2, 0); err != nil {
		fmt.Println("dup3:", err)
		os.Exit(2)
	}
	args := []string{"run", "--root", "/nonexistent/krun-core-test-root", "--", "/bin/true"}
	if os.Getenv(brokenStderrHelperEnv) == "serve" {
		args = []string{"serve", "--socket", "/nonexistent/krun-core-test.sock", "--disk", "path=/nonexistent/krun-core-test.img,format=raw"}
	}
	code := dispatch(args, os.Stdout, os.Stderr)
	fmt.Printf("status %d\n", code)
	os.Exit(0)
}

func TestRunOnBrokenStderrKeepsItsStatus(t *testing.T) {
	for _, tc := range []struct {
		cmd  string
		want int
	}{
		{"run", exitRunFailed},
		// serve too: a service whose log pipe broke (a restarted
		// journald) must not die of its next log line.
		{"serve", 1},
	} {
		t.Run(tc.cmd, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestRunOnBrokenStderrHelperProcess$", "-test.count=1")
			cmd.Env = append(os.Environ(), brokenStderrHelperEnv+"="+tc.cmd)
			var out strings.Builder
			cmd.Stdout = &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatal("helper did not finish within 60 s")
			}
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				t.Fatalf("krun-core %s died of %v writing its error line to a stderr whose reader went away (want: its own status, %d)", tc.cmd, ws.Signal(), tc.want)
			}
			if err != nil || !strings.Contains(out.String(), fmt.Sprintf("status %d", tc.want)) {
				t.Fatalf("helper: %v; stdout %q, want status %d", err, out.String(), tc.want)
			}
		})
	}
}
