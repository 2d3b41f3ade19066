package oci

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// callerTerminal is a pty standing for the terminal krun-oci is run at:
// its slave becomes krun-oci's stdio, and what krun-oci writes to it is
// collected from its master.
type callerTerminal struct {
	master, slave *os.File
	mu            sync.Mutex
	out           bytes.Buffer
}

func newCallerTerminal(t *testing.T, rows, cols uint16) *callerTerminal {
	t.Helper()
	m, s, err := openPty()
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	if err := setWinsize(m, rows, cols); err != nil {
		t.Fatal(err)
	}
	ct := &callerTerminal{master: m, slave: s}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := m.Read(buf)
			ct.mu.Lock()
			ct.out.Write(buf[:n])
			ct.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { m.Close(); s.Close() })
	return ct
}

// waitFor waits until the terminal has shown want.
func (ct *callerTerminal) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ct.mu.Lock()
		got := ct.out.String()
		ct.mu.Unlock()
		if strings.Contains(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the terminal did not show %q in 20 s; it shows %q", want, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestForegroundRunTerminal: with process.terminal (what `runc spec`
// writes) and no --console-socket, a foreground run makes the terminal
// itself and relays it to the caller's, as runc does: the command runs on
// a pty of its own at the caller's size (and follows it), input typed at
// the caller's terminal reaches it, its output comes back, and the
// caller's terminal leaves raw mode at the end. krun-oci refused it ("process.terminal
// needs --console-socket"), so `runc spec && krun-oci run ID` at a shell
// failed. A detached run still needs the socket.
func TestForegroundRunTerminal(t *testing.T) {
	r := newRT(t)
	ct := newCallerTerminal(t, 33, 111)
	before, err := unix.IoctlGetTermios(int(ct.master.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	b := bundle(t, []string{"sh", "-c", `tty; stty size; read x; echo "got $x"; while [ "$(stty size)" != "40 120" ]; do sleep 0.05; done; echo resized; exit 7`}, func(s *specs.Spec) { s.Process.Terminal = true })
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "--root", r.root, "run", "--bundle", b, "fg")
	cmd.Env = append(os.Environ(), asRuntime+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = ct.slave, ct.slave, ct.slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	ct.waitFor(t, "33 111")
	ct.mu.Lock()
	shown := ct.out.String()
	ct.mu.Unlock()
	if !strings.HasPrefix(shown, "/dev/pts/") || strings.HasPrefix(shown, ct.slave.Name()+"\n") {
		t.Errorf("the command's terminal: %q, want a pty other than the caller's %s", shown, ct.slave.Name())
	}
	if _, err := ct.master.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	ct.waitFor(t, "got hello")
	// The caller's terminal changes size: the container's follows.
	if err := setWinsize(ct.master, 40, 120); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Signal(unix.SIGWINCH) // the kernel would, were it krun-oci's controlling terminal
	ct.waitFor(t, "resized")
	err = cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 {
		ct.mu.Lock()
		t.Fatalf("run: %v, want exit status 7; terminal: %q", err, ct.out.String())
	}
	after, err := unix.IoctlGetTermios(int(ct.master.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if after.Lflag != before.Lflag || after.Iflag != before.Iflag || after.Oflag != before.Oflag {
		t.Errorf("the caller's terminal was left changed: lflag %#x iflag %#x oflag %#x, was %#x %#x %#x",
			after.Lflag, after.Iflag, after.Oflag, before.Lflag, before.Iflag, before.Oflag)
	}

	if _, e, code := r.run(nil, nil, "run", "--detach", "--bundle", b, "fg2"); code != 1 || !strings.Contains(e, "console-socket") {
		t.Errorf("a detached run with a terminal and no --console-socket: exit %d, %q", code, e)
	}
}

// TestForegroundExecTerminalFound: exec -t in the foreground finds the
// caller's terminal where runc does, on stderr, stdout or stdin; with
// stdin redirected from a file it was refused.
func TestForegroundExecTerminalFound(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "30"}, nil)
	r.mustRun("create", "--bundle", b, "ex")
	r.mustRun("start", "ex")
	ct := newCallerTerminal(t, 20, 70)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "--root", r.root, "exec", "-t", "ex", "sh", "-c", "echo exec-ran")
	cmd.Env = append(os.Environ(), asRuntime+"=1")
	cmd.Stdout, cmd.Stderr = ct.slave, ct.slave // stdin: /dev/null
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	if err := cmd.Run(); err != nil {
		ct.mu.Lock()
		t.Fatalf("exec -t with stdin not a terminal: %v; terminal: %q", err, ct.out.String())
	}
	ct.waitFor(t, "exec-ran")
	r.mustRun("kill", "ex", "KILL")
	r.waitStatus("ex", specs.StateStopped)
}
