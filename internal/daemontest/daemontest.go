// Package daemontest runs vhost-user back-end daemons in tests (krun-core
// serve, qemu-storage-daemon, virtiofsd): Start launches one and waits until
// it listens on its socket, and the daemon is stopped when the test ends at
// the latest, with its output in the test log if the test failed.
package daemontest

import (
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// Options describe a daemon.
type Options struct {
	// Name names the daemon in messages.
	Name string
	// Socket is the unix socket the daemon creates and listens on.
	Socket string
	// Ready is output that says the daemon is fully up ("" for none):
	// krun-core prints "krun-core: serving" once SIGTERM stops it cleanly.
	Ready string
	// Kill stops the daemon with SIGKILL and ignores how it ended (a
	// reference daemon). Otherwise Stop sends SIGTERM and the test fails
	// unless the daemon exits 0 within 15 s.
	Kill bool
	// Timeout is how long Start waits for the socket (0: 30 s).
	Timeout time.Duration
}

// Daemon is a running daemon.
type Daemon struct {
	Options
	Cmd *exec.Cmd
	// Out is its standard output and error.
	Out *syncbuf.Buffer

	t    testing.TB
	done chan struct{}
	err  error
	once sync.Once
}

// Start runs args as the daemon (killed with the test process if that
// dies) and returns once its socket exists and Ready has been printed; it
// fails the test if the daemon exits first or takes longer than Timeout.
func Start(t testing.TB, opt Options, args ...string) *Daemon {
	t.Helper()
	d := &Daemon{Options: opt, Out: &syncbuf.Buffer{}, t: t, done: make(chan struct{})}
	d.Cmd = exec.Command(args[0], args[1:]...)
	d.Cmd.Stdout, d.Cmd.Stderr = d.Out, d.Out
	d.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.Cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", d.Name, err)
	}
	go func() {
		d.err = d.Cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(d.Stop)
	timeout := d.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	deadline := time.Now().Add(timeout)
	for {
		if st, err := os.Stat(d.Socket); err == nil && st.Mode().Type() == fs.ModeSocket &&
			(d.Ready == "" || strings.Contains(d.Out.String(), d.Ready)) {
			return d
		}
		select {
		case <-d.done:
			t.Fatalf("%s exited before listening: %v\n%s", d.Name, d.err, d.Out)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no socket after %v\n%s", d.Name, timeout, d.Out)
		}
	}
}

// Done is closed once the daemon has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Err is how the daemon ended (valid once Done is closed).
func (d *Daemon) Err() error { <-d.done; return d.err }

// Alive reports whether the daemon is still running.
func (d *Daemon) Alive() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// Stop ends the daemon as Options.Kill says; later calls do nothing.
func (d *Daemon) Stop() { d.once.Do(d.stop) }

func (d *Daemon) stop() {
	defer func() {
		if d.t.Failed() {
			d.t.Logf("%s output:\n%s", d.Name, d.Out)
		}
	}()
	if d.Kill {
		d.Cmd.Process.Kill() // an error only says it has exited already
		<-d.done
		return
	}
	select {
	case <-d.done:
	default:
		d.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(15 * time.Second):
			d.Cmd.Process.Kill()
			<-d.done
			d.t.Errorf("%s did not exit within 15 s of SIGTERM", d.Name)
			return
		}
	}
	if d.err != nil {
		d.t.Errorf("%s: %v", d.Name, d.err)
	}
}
