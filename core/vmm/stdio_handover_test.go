package vmm

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/internal/stdiotest"
)

// consoleOf returns the console device prepareExec added.
func consoleOf(t *testing.T, c *Context) *devspec.ConsoleSpec {
	t.Helper()
	for _, d := range c.devices {
		if s, ok := d.(*devspec.ConsoleSpec); ok {
			return s
		}
	}
	t.Fatal("no console device")
	return nil
}

// TestConsoleOutputToAFileIsPumped: with `>>log` the console plugin
// shared the log's open file description, and a compromised plugin could
// clear O_APPEND on it and write over the log, or truncate it
// (docs/SECURITY.md; found in review). It gets a pipe that the core copies
// into the file, and everything written to the pipe is in the file when
// the run's end (exec.close, at Start's end) returns.
func TestConsoleOutputToAFileIsPumped(t *testing.T) {
	log := stdiotest.AppendLog(t, "earlier\n")
	c := prepTestExecWith(t, hclog.NewNullLogger(), func(c *Context) { c.SetStdio(nil, log, log, false) })
	s := consoleOf(t, c)
	if stdiotest.FileType(t, s.Stdout) != unix.S_IFIFO || s.Stderr != s.Stdout {
		c.exec.close(0)
		t.Fatalf("the console plugin gets %v (type %#o) and %v for a `>>log 2>&1`, want one pipe", s.Stdout.Name(), stdiotest.FileType(t, s.Stdout), s.Stderr.Name())
	}
	// What the plugin's copy, opened when it starts, writes.
	plugin, err := devspec.HandOver(s.Stdout, "stdout", unix.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	want := "earlier\n" + strings.Repeat("the command's output\n", 10000)
	plugin.WriteString(strings.TrimPrefix(want, "earlier\n"))
	plugin.Close()
	if err := c.exec.close(0); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(log.Name()); string(got) != want {
		t.Fatalf("the log has %d bytes when the run ends, want %d", len(got), len(want))
	}
}

// TestExecFilesHandedOverOneWay: krun-oci exec's stdout and stderr are
// often the caller's terminal, one O_RDWR description with its stdin;
// passed as they were, the console plugin could read what the user types
// to the shell's foreground job through them. Exec opens them again write
// only, as the main console's (devspec's HandOver).
func TestExecFilesHandedOverOneWay(t *testing.T) {
	c := prepTestExec(t, hclog.NewNullLogger())
	defer c.exec.close(0)
	_, tty := stdiotest.OpenPTY(t)
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	defer stdinW.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer statusR.Close()
	defer statusW.Close()
	p := &container.Process{Args: []string{"/bin/true"}, Cwd: "/"}
	if _, err := c.Exec(p, stdinR, tty, tty, statusW); err != nil {
		t.Fatal(err)
	}
	// The plugin's end of the control channel.
	buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4*4))
	_, oobn, _, _, err := unix.Recvmsg(int(c.exec.controlR.Fd()), buf, oob, 0)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages: %v, %v", msgs, err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 4 {
		t.Fatalf("files: %v, %v", fds, err)
	}
	for _, fd := range fds {
		defer unix.Close(fd)
	}
	for i, want := range []int{unix.O_RDONLY, unix.O_WRONLY, unix.O_WRONLY, unix.O_WRONLY} {
		fl, err := unix.FcntlInt(uintptr(fds[i]), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		if fl&unix.O_ACCMODE != want {
			t.Errorf("exec file %d has access mode %#o, want %#o", i, fl&unix.O_ACCMODE, want)
		}
	}
}

// TestOutputWaitBoundWhenAPluginWasLeft: the pumps of a `>>log` end when
// the plugin's end of their pipe is closed. A console plugin that
// outlived SIGKILL (uninterruptible sleep; the VM's end leaves it) keeps
// that end open, and the run waited for it for good. With a bound (Start
// gives abandonWait once a plugin was left) close returns, with an error
// saying so.
func TestOutputWaitBoundWhenAPluginWasLeft(t *testing.T) {
	log := stdiotest.AppendLog(t, "")
	c := prepTestExecWith(t, hclog.NewNullLogger(), func(c *Context) { c.SetStdio(nil, log, log, false) })
	s := consoleOf(t, c)
	plugin, err := devspec.HandOver(s.Stdout, "stdout", unix.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer plugin.Close() // the plugin that is never reaped
	plugin.WriteString("written before the kill\n")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if got, _ := os.ReadFile(log.Name()); string(got) == "written before the kill\n" {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the pump copied %q in 10 s", got)
		}
	}
	done := make(chan error, 1)
	go func() { done <- c.exec.close(100 * time.Millisecond) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "outlived SIGKILL") {
			t.Fatalf("close gave %v, want the left plugin named", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("close still waits for the pipe of a plugin that was left running")
	}
}
