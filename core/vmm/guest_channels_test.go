package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/container"
)

// TestGuestConsoleLogCannotDriveTheTerminal: in `run --root DIR -- CMD`
// the guest's serial console (which guest root writes freely) is logged a
// line at a time by the core. Like a plugin's log lines, a guest line with
// an escape sequence or a carriage return is quoted (cli.Printable), so
// that it can neither rewrite the user's terminal (krun-core's stderr) nor
// pass for another component's line; it went out raw before (from
// review).
func TestGuestConsoleLogCannotDriveTheTerminal(t *testing.T) {
	var logBuf bytes.Buffer
	c := prepTestExec(t, hclog.New(&hclog.LoggerOptions{Output: &logBuf, Level: hclog.Debug}))
	defer c.exec.close(0)
	// What guest root writes to /dev/ttyS0.
	c.consoleOut.Write([]byte("\x1b]0;pwned\x07\x1b[2J\r[ERROR] krun-core: forged line\n"))
	out := logBuf.String()
	t.Logf("log: %q", out)
	if strings.ContainsAny(out, "\x1b\x07\r") {
		t.Fatalf("a guest console line reached the log with raw control characters: %q", out)
	}
}

// TestControlNeverBlocksWhenPluginStalls: a console plugin that stops reading its control channel (its
// frame writer blocked on a guest that posts no receive buffers) makes
// Signal, Resize and Exec fail, never block the core.
func TestControlNeverBlocksWhenPluginStalls(t *testing.T) {
	c := prepTestExec(t, nil)
	defer c.exec.close(0)
	done := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 100000 && err == nil; i++ {
			err = c.Resize(24, 80)
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("100000 records fit an unread channel?")
		}
		t.Logf("control on a stalled plugin: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("Resize blocked on a plugin that does not read its control channel")
	}
}

// prepTestExec prepares an exec-mode Context (run --root DIR -- /bin/sh)
// without booting anything: a fake root, kernel and module tree, this
// test binary as krun-init.
func prepTestExec(t *testing.T, log hclog.Logger) *Context {
	t.Helper()
	return prepTestExecWith(t, log, nil)
}

// prepTestExecWith is prepTestExec with setup called on the Context
// before prepareExec.
func prepTestExecWith(t *testing.T, log hclog.Logger, setup func(c *Context)) *Context {
	t.Helper()
	c, err := prepTestExecErr(t, log, setup)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// prepTestExecErr is prepTestExecWith returning prepareExec's error.
func prepTestExecErr(t *testing.T, log hclog.Logger, setup func(c *Context)) (*Context, error) {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin", "sh"), []byte("#!"), 0o755)
	mods := filepath.Join(dir, "modules")
	os.MkdirAll(filepath.Join(mods, "kernel"), 0o755)
	os.WriteFile(filepath.Join(mods, "modules.order"), nil, 0o644)
	os.WriteFile(filepath.Join(mods, "modules.builtin"), []byte(
		"kernel/drivers/virtio/virtio_mmio.ko\nkernel/fs/fuse/virtiofs.ko\nkernel/drivers/char/virtio_console.ko\n"), 0o644)
	initBin, err := os.Executable() // any ELF executable will do
	if err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(dir, "vmlinuz")
	os.WriteFile(kernel, []byte("k"), 0o644)
	c := NewContext(log)
	if err := c.SetKernel(kernel, "", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.SetRoot(root, false); err != nil {
		t.Fatal(err)
	}
	if err := c.SetExec("/bin/sh", nil, nil); err != nil {
		t.Fatal(err)
	}
	c.SetInitPath(initBin)
	c.SetModulesDir(mods)
	if setup != nil {
		setup(c)
	}
	return c, c.prepareExec()
}

// TestControlRacesVMEnd: the guest decides when the VM ends (it powers
// off); Start then closes the control channel (exec.close) while the OCI
// monitor may be in Signal/Exec/Resize on another goroutine. close() takes
// controlMu, under which control() and controlFiles() use controlW, so an
// exec's record and files never go to whatever reused a closed fd number.
// Before the fix close() cleared controlW without the lock (the race
// detector saw it; from review).
func TestControlRacesVMEnd(t *testing.T) {
	c := prepTestExec(t, nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 1000; i++ {
			c.Signal(15)
		}
	}()
	time.Sleep(time.Millisecond)
	c.exec.close(0) // what Start's deferred close does when the guest powers off
	<-done
}

// TestConsoleTail: in `run --root DIR -- CMD` the core logs the guest's
// console itself and keeps its last lines, printable and cut at
// consoleTailWidth, for Result.ConsoleTail (shown when the guest ends
// without reporting a status). A kernel panic's line that the trace
// after it pushed out comes first.
func TestConsoleTail(t *testing.T) {
	n := func(from, to int) []string {
		var out []string
		for i := from; i <= to; i++ {
			out = append(out, fmt.Sprintf("line %d", i))
		}
		return out
	}
	const panicLine = "[    3.8] Kernel panic - not syncing: sysrq triggered crash"
	for _, tc := range []struct {
		name  string
		write []string
		want  []string
	}{
		{"quiet", nil, []string{}},
		{"few", n(1, 3), n(1, 3)},
		{"many", n(1, ConsoleTailLines+5), n(6, ConsoleTailLines+5)},
		{"panic in the tail", append([]string{panicLine}, n(1, 5)...), append([]string{panicLine}, n(1, 5)...)},
		{"panic pushed out", append(append(n(1, 2), panicLine), n(1, ConsoleTailLines)...),
			append([]string{panicLine, "..."}, n(1, ConsoleTailLines)...)},
		{"panic just in", append([]string{panicLine}, n(1, ConsoleTailLines-1)...),
			append([]string{panicLine}, n(1, ConsoleTailLines-1)...)},
		{"escapes", []string{"\x1b[2Jtext\r"}, []string{`"\x1b[2Jtext"`}},
		{"bidi", []string{"\u202eeldnah"}, []string{`"\u202eeldnah"`}},
		{"long", []string{strings.Repeat("x", 3000)}, []string{strings.Repeat("x", consoleTailWidth) + "..."}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := prepTestExec(t, hclog.NewNullLogger())
			defer c.exec.close(0)
			if c.consoleTail == nil {
				t.Fatal("exec mode keeps no console tail")
			}
			for _, l := range tc.write {
				c.consoleOut.Write([]byte(l + "\n"))
			}
			if got := c.consoleTail.lines(); !slices.Equal(got, tc.want) {
				t.Errorf("tail %q,\nwant %q", got, tc.want)
			}
		})
	}
}

// TestConsoleTailKeepsALastLineWithoutNewline: what the guest wrote last,
// without a newline, before it ended is in the tail too (from review); so
// is a line cut at consoleTailWidth inside a multi-byte character, at a
// character's start.
func TestConsoleTailKeepsALastLineWithoutNewline(t *testing.T) {
	c := prepTestExec(t, hclog.NewNullLogger())
	defer c.exec.close(0)
	c.consoleOut.Write([]byte(strings.Repeat("x", consoleTailWidth-1) + strings.Repeat("é", 100) + "\n"))
	c.consoleOut.Write([]byte("boot ok\nkrun-init: cannot mount /proc: no such device"))
	want := []string{strings.Repeat("x", consoleTailWidth-1) + "...", "boot ok", "krun-init: cannot mount /proc: no such device"}
	if got := c.consoleTail.lines(); !slices.Equal(got, want) {
		t.Errorf("tail %q,\nwant %q", got, want)
	}
}

// TestRequestsFailOnceTheGuestEnded: once the guest has ended (its devices
// are being shut down, which can take seconds), Exec, Signal, SignalAll and Resize
// fail with ErrGuestEnded instead of reaching a console plugin that is
// going away: an exec it accepted then would end without a status, which
// krun-oci could only report as 137 (from review).
func TestRequestsFailOnceTheGuestEnded(t *testing.T) {
	c := prepTestExec(t, hclog.NewNullLogger())
	defer c.exec.close(0)
	files := make([]*os.File, 4)
	for i := range files {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = f
	}
	p := &container.Process{Args: []string{"/bin/true"}, Cwd: "/"}
	if _, err := c.Exec(p, files[0], files[1], files[2], files[3]); err != nil {
		t.Fatalf("Exec while the guest runs: %v", err)
	}
	if err := c.Signal(unix.SIGTERM); err != nil {
		t.Fatalf("Signal while the guest runs: %v", err)
	}
	if err := c.SignalAll(unix.SIGTERM); err != nil {
		t.Fatalf("SignalAll while the guest runs: %v", err)
	}
	select {
	case <-c.Ended():
		t.Fatal("Ended is closed while the guest runs")
	default:
	}
	c.guestEnded()
	select {
	case <-c.Ended():
	default:
		t.Error("Ended is not closed once the guest ended")
	}
	if _, err := c.Exec(p, files[0], files[1], files[2], files[3]); !errors.Is(err, ErrGuestEnded) {
		t.Errorf("Exec after the guest ended: %v, want ErrGuestEnded", err)
	}
	if err := c.Signal(unix.SIGTERM); !errors.Is(err, ErrGuestEnded) {
		t.Errorf("Signal after the guest ended: %v, want ErrGuestEnded", err)
	}
	if err := c.SignalAll(unix.SIGTERM); !errors.Is(err, ErrGuestEnded) {
		t.Errorf("SignalAll after the guest ended: %v, want ErrGuestEnded", err)
	}
	if err := c.Resize(24, 80); !errors.Is(err, ErrGuestEnded) {
		t.Errorf("Resize after the guest ended: %v, want ErrGuestEnded", err)
	}
}

// TestControlBeforeChannelOpens: a ^C or a window resize that comes while
// krun-core starts (forwardSignals runs before Start makes the control
// channel) was dropped with "no program is running"; it is kept and sent
// first when the channel opens, the last window size only, and a bounded
// number of records. Once the channel is closed, requests fail again.
func TestControlBeforeChannelOpens(t *testing.T) {
	c := prepTestExecWith(t, hclog.NewNullLogger(), func(c *Context) {
		if err := c.Resize(10, 20); err != nil {
			t.Errorf("Resize before the channel opens: %v", err)
		}
		if err := c.Signal(unix.SIGINT); err != nil {
			t.Errorf("Signal before the channel opens: %v", err)
		}
		if err := c.Resize(30, 40); err != nil {
			t.Errorf("second Resize before the channel opens: %v", err)
		}
		if err := c.SignalAll(unix.SIGTERM); err != nil {
			t.Errorf("SignalAll before the channel opens: %v", err)
		}
	})
	defer c.exec.close(0)
	want := [][]byte{devopts.SignalRecord(uint8(unix.SIGINT)), devopts.WinsizeRecord(30, 40), devopts.SignalAllRecord(uint8(unix.SIGTERM))}
	buf := make([]byte, 64)
	fd := int(c.exec.controlR.Fd())
	for i, w := range want {
		// Everything was written before Start went on: nothing to wait for.
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if !bytes.Equal(buf[:n], w) {
			t.Errorf("record %d: %x, want %x", i, buf[:n], w)
		}
	}
	if n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT); err == nil {
		t.Errorf("an extra record: %x", buf[:n])
	}

	// Bounded before the channel opens.
	d := NewContext(nil)
	d.execCfg()
	var err error
	for i := 0; i < 1000 && err == nil; i++ {
		err = d.Signal(unix.SIGINT)
	}
	if err == nil {
		t.Error("1000 signals kept before the channel opened")
	}
	// Gone after the channel closed.
	d.exec.close(0)
	if err := d.Resize(1, 1); err == nil {
		t.Error("Resize accepted after the channel closed")
	}
}
