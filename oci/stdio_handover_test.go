package oci

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/krun-core/krun-core/internal/stdiotest"
)

// runStdio runs the runtime with the given stdin, and stdout and stderr
// on out, and returns its exit status.
func (r *rtEnv) runStdio(stdin, out *os.File, args ...string) int {
	r.t.Helper()
	cmd := r.command(args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, out, out
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	if err := cmd.Run(); err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			r.t.Fatalf("run %v: %v", args, err)
		}
		return ee.ExitCode()
	}
	return 0
}

// TestCallerTerminalNeverReachesThePlugin: the console plugin runs in a
// session of its own, out of the shell's job control, and read the
// caller's terminal itself when it was krun-oci's stdin: `krun-oci run ID
// &` at an interactive shell took what the user typed to the foreground
// job (found in review; krun-core run's was fixed before). What the
// console plugin gets (here the fake VM's command) is a pipe: a
// foreground run reads the terminal itself, a detached create's monitor
// does, an exec's process did already. A pty of process.terminal is
// krun-oci's own and not concerned.
func TestCallerTerminalNeverReachesThePlugin(t *testing.T) {
	r := newRT(t)
	show := []string{"sh", "-c", "stat -L -c %F /proc/self/fd/0"}
	b := bundle(t, show, nil)
	idle := bundle(t, []string{"sleep", "30"}, nil)
	for _, tc := range []struct {
		name string
		run  func(stdin, out *os.File)
	}{
		{"run", func(stdin, out *os.File) {
			if code := r.runStdio(stdin, out, "run", "--bundle", b, "fg"); code != 0 {
				t.Fatalf("run: exit %d", code)
			}
		}},
		{"create and start", func(stdin, out *os.File) {
			if code := r.runStdio(stdin, out, "create", "--bundle", b, "bg"); code != 0 {
				t.Fatalf("create: exit %d", code)
			}
			r.mustRun("start", "bg")
			r.waitStatus("bg", specs.StateStopped)
			r.mustRun("delete", "bg")
		}},
		{"exec", func(stdin, out *os.File) {
			r.mustRun("run", "--detach", "--bundle", idle, "ex")
			if code := r.runStdio(stdin, out, append([]string{"exec", "ex"}, show...)...); code != 0 {
				t.Fatalf("exec: exit %d", code)
			}
			r.mustRun("delete", "--force", "ex")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ct := newCallerTerminal(t, 24, 80)
			out, err := os.Create(filepath.Join(t.TempDir(), "out"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			tc.run(ct.slave, out)
			if got, _ := os.ReadFile(out.Name()); string(got) != "fifo\n" {
				t.Errorf("the command's stdin is %q, want a pipe (fifo)", got)
			}
		})
	}
}

// TestExecOutputToAFile: an exec's `>>log 2>&1` reached the console
// plugin as the file itself, one description with the caller's: a
// compromised plugin could clear O_APPEND and write over the log, or
// truncate it (found in review). It gets a pipe that exec copies into the
// file, and all of the output is there, in order, when exec returns.
func TestExecOutputToAFile(t *testing.T) {
	r := newRT(t)
	r.mustRun("run", "--detach", "--bundle", bundle(t, []string{"sleep", "30"}, nil), "ex")
	defer r.mustRun("delete", "--force", "ex")
	log := stdiotest.AppendLog(t, "earlier\n")
	script := `stat -L -c %F /proc/self/fd/1; i=0; while [ $i -lt 3000 ]; do echo "line $i"; [ $((i % 7)) = 0 ] && echo "err $i" >&2; i=$((i+1)); done; echo last`
	devNull, _ := os.Open(os.DevNull)
	defer devNull.Close()
	if code := r.runStdio(devNull, log, "exec", "ex", "sh", "-c", script); code != 0 {
		t.Fatalf("exec: exit %d", code)
	}
	var want bytes.Buffer
	want.WriteString("earlier\nfifo\n")
	for i := range 3000 {
		fmt.Fprintf(&want, "line %d\n", i)
		if i%7 == 0 {
			fmt.Fprintf(&want, "err %d\n", i)
		}
	}
	want.WriteString("last\n")
	if got, _ := os.ReadFile(log.Name()); string(got) != want.String() {
		n := min(len(got), 40)
		t.Fatalf("the log after exec: %d bytes starting %q, want %d bytes starting %q", len(got), got[:n], want.Len(), want.Bytes()[:40])
	}
}

// TestBackgroundReadStops: krun-oci run and exec caught SIGTTIN (every
// signal is forwarded, as by runc), so a background job's read of the
// terminal did not stop it: the read was tried again at once, with a
// SIGTTIN each time. With a terminal on stdin they let the kernel's job
// control stop them, as any program (`krun-oci exec c cat &` at a shell:
// "Stopped (tty input)").
func TestBackgroundReadStops(t *testing.T) {
	r := newRT(t)
	r.mustRun("run", "--detach", "--bundle", bundle(t, []string{"sleep", "30"}, nil), "ex")
	b := bundle(t, []string{"cat"}, nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args string
	}{
		{"exec", "exec ex cat"},
		{"run", "run --bundle " + b + " bgrun"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ct := newCallerTerminal(t, 24, 80)
			// An interactive shell's job control (sh -m, on its
			// controlling terminal): the job runs in a process group
			// of its own, in the background.
			script := fmt.Sprintf(`%s --root %s %s & pid=$!; sleep 2; awk '{print "state", $3}' /proc/$pid/stat; kill -9 $pid`, exe, r.root, tc.args)
			cmd := exec.Command("sh", "-mc", script)
			cmd.Env = append(os.Environ(), asRuntime+"=1")
			// A file: what the job left running (a container's
			// monitor) keeps its stdout open.
			out, err := os.Create(filepath.Join(t.TempDir(), "out"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			cmd.Stdin, cmd.Stdout, cmd.Stderr = ct.slave, out, out
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
			timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
			defer timer.Stop()
			err = cmd.Run()
			got, _ := os.ReadFile(out.Name())
			if err != nil {
				t.Fatalf("sh: %v: %s", err, got)
			}
			if !strings.Contains(string(got), "state T") {
				t.Errorf("krun-oci %s in the background, reading the terminal: %q, want it stopped (state T)", tc.args, got)
			}
		})
	}
}

// TestExecOutputFileFails: a file on exec's stdout that fails its writes
// (a full disk; here one opened read-only) lost the command's output
// without a word: exec returned the command's status and said nothing.
// It says so in one line on stderr; the status stays the command's.
func TestExecOutputFileFails(t *testing.T) {
	r := newRT(t)
	r.mustRun("run", "--detach", "--bundle", bundle(t, []string{"sleep", "30"}, nil), "ex")
	defer r.mustRun("delete", "--force", "ex")
	path := filepath.Join(t.TempDir(), "out")
	os.WriteFile(path, nil, 0o644)
	ro, err := os.Open(path) // every write fails
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	errOut, err := os.Create(filepath.Join(t.TempDir(), "err"))
	if err != nil {
		t.Fatal(err)
	}
	defer errOut.Close()
	devNull, _ := os.Open(os.DevNull)
	defer devNull.Close()
	cmd := r.command("exec", "ex", "sh", "-c", "echo lost; exit 3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devNull, ro, errOut
	err = cmd.Run()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 3 {
		t.Fatalf("exec: %v, want the command's status 3", err)
	}
	got, _ := os.ReadFile(errOut.Name())
	if lines := strings.Split(strings.TrimSuffix(string(got), "\n"), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], "krun-oci exec: ") || !strings.Contains(lines[0], "the command's output") {
		t.Fatalf("exec's stderr: %q, want one line about the command's output", got)
	}
}

// TestExecLeavesNoFDsInTheMonitor: each exec hands the monitor its stdio,
// a status pipe and a life pipe; none of them may stay open in the
// monitor once the exec is over, with pipes, a `>>log` (pumped by exec)
// or a terminal on stdin (pumped by exec).
func TestExecLeavesNoFDsInTheMonitor(t *testing.T) {
	r := newRT(t)
	r.mustRun("run", "--detach", "--bundle", bundle(t, []string{"sleep", "60"}, nil), "ex")
	defer r.mustRun("delete", "--force", "ex")
	pid := r.state("ex").Pid
	count := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := count()
	log := stdiotest.AppendLog(t, "")
	devNull, _ := os.Open(os.DevNull)
	defer devNull.Close()
	ct := newCallerTerminal(t, 24, 80)
	for i := range 20 {
		stdin := devNull
		if i%2 == 1 {
			stdin = ct.slave
		}
		if code := r.runStdio(stdin, log, "exec", "ex", "true"); code != 0 {
			t.Fatalf("exec %d: exit %d", i, code)
		}
	}
	after := count()
	for deadline := time.Now().Add(5 * time.Second); after > before && time.Now().Before(deadline); after = count() {
		time.Sleep(50 * time.Millisecond)
	}
	if after > before {
		t.Fatalf("the monitor has %d fds after 20 execs, %d before", after, before)
	}
}
