package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/internal/stdiopump"
)

// execOptions are run's flags for --root DIR -- CMD.
type execOptions struct {
	root              string
	readOnly          bool
	openFiles         uint64 // --root-open-files; 0: the default
	command           []string
	env               []string
	workdir, hostname string
	user              string // USER[:GROUP]
	rlimits           []string
	ports             []string // --port HOST:GUEST
	tty               string   // auto, on or off
	noStdin           bool     // --no-stdin: the command's input is empty
	stdout, stderr    io.Writer
	pipes             *outputPipes // where stdout and stderr are not files; closed by the caller
}

// terminal is krun-core's stdin when it is a terminal: the command gets one
// in the guest. It is put in raw mode only when the VM starts (makeRaw),
// so that every earlier failure leaves the user's terminal as it was.
type terminal struct {
	f *os.File
}

// makeRaw puts the terminal in raw mode without signals (^C reaches the
// guest's terminal) and returns what restores it.
func (t *terminal) makeRaw() func() {
	if restore, ok := rawTerminal(t.f, false); ok {
		return restore
	}
	return func() {}
}

// setupExec configures c to run o.command in o.root. When stdin is a
// terminal the command gets a terminal of the same size, and setupExec
// returns it for the caller to put in raw mode once the VM starts.
//
// A terminal on stdin krun-core reads itself, and the console plugin gets
// a pipe (the returned stdiopump.Input, which the caller runs once the
// terminal is in raw mode). The plugin runs in a session of its own, out
// of the shell's job control: reading the terminal itself, it went on
// taking keystrokes while `krun-core run ... &` sat in the background and
// the user typed to the foreground job (a sudo password went to the
// guest; found in review, helper-124). krun-core is the shell's job: in
// the background its read stops it (SIGTTIN), as any program's, until
// `fg`.
func setupExec(c *vmm.Context, o execOptions) (*terminal, *stdiopump.Input, error) {
	if err := c.SetRoot(o.root, o.readOnly); err != nil {
		return nil, nil, err
	}
	if err := c.SetRootOpenFiles(o.openFiles); err != nil {
		return nil, nil, flagError("--root-open-files", err)
	}
	if err := c.SetExec(o.command[0], o.command, o.env); err != nil {
		return nil, nil, err
	}
	if o.workdir != "" {
		if err := c.SetWorkdir(o.workdir); err != nil {
			return nil, nil, flagError("--workdir", err)
		}
	}
	if o.hostname != "" {
		if err := c.SetHostname(o.hostname); err != nil {
			return nil, nil, flagError("--hostname", err)
		}
	}
	if o.user != "" {
		if err := c.SetUserSpec(o.user); err != nil {
			return nil, nil, flagError("--user", err)
		}
	}
	if len(o.rlimits) > 0 {
		if err := c.SetRlimits(o.rlimits); err != nil {
			return nil, nil, flagError("--rlimit", err)
		}
	}
	if len(o.ports) > 0 {
		if err := c.SetPortMap(o.ports); err != nil {
			return nil, nil, flagError("--port", err)
		}
	}
	stdout, err := o.pipes.fileOf(o.stdout)
	if err != nil {
		return nil, nil, err
	}
	stderr, err := o.pipes.fileOf(o.stderr)
	if err != nil {
		return nil, nil, err
	}
	var term *terminal
	stdin := os.Stdin
	if o.noStdin {
		stdin = nil
	}
	isTerm := false
	if stdin != nil {
		_, err = unix.IoctlGetTermios(int(stdin.Fd()), unix.TCGETS)
		isTerm = err == nil
	}
	if o.tty == "on" && !isTerm {
		return nil, nil, errors.New("--tty on: krun-core's stdin is not a terminal")
	}
	if isTerm && o.tty != "off" {
		if ws, err := unix.IoctlGetWinsize(int(os.Stdin.Fd()), unix.TIOCGWINSZ); err == nil {
			c.SetWinsize(ws.Row, ws.Col)
		}
		term = &terminal{f: os.Stdin}
	}
	var in *stdiopump.Input
	if isTerm {
		if in, stdin, err = stdiopump.NewInput(stdin); err != nil {
			return nil, nil, err
		}
	}
	c.SetStdio(stdin, stdout, stderr, term != nil)
	return term, in, nil
}

// flagError names the flag whose value err is about, without the layers'
// own prefixes ("invalid VM configuration: invalid krun-init config: ").
func flagError(flag string, err error) error {
	msg := err.Error()
	for _, p := range []string{vmm.ErrConfig.Error() + ": ", initconfig.ErrInvalid.Error() + ": "} {
		msg = strings.TrimPrefix(msg, p)
	}
	return fmt.Errorf("%s: %s", flag, msg)
}

// commandSignaller is what forwardSignals needs of the VM (*vmm.Context).
type commandSignaller interface {
	Signal(sig unix.Signal) error
	Resize(rows, cols uint16) error
}

// forwardSignals passes SIGINT, SIGTERM, SIGHUP and SIGQUIT to the command
// and window-size changes to its terminal. A third terminating signal
// stops the VM (cancel), and caught then returns it, so that run exits
// with the shell's status for it (128+N), not as krun-core's own failure
// (a command that ignores signals made run exit 125 with "context
// canceled"; found in review). stop ends the forwarding.
func forwardSignals(ctx context.Context, c commandSignaller, term *terminal, cancel func(), log hclog.Logger) (stop func(), caught func() syscall.Signal) {
	var got atomic.Int32
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGWINCH)
	done := make(chan struct{})
	go func() {
		terminating := 0
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case s := <-ch:
				sig := s.(syscall.Signal)
				if sig == syscall.SIGWINCH {
					if term != nil {
						if ws, err := unix.IoctlGetWinsize(int(term.f.Fd()), unix.TIOCGWINSZ); err == nil {
							c.Resize(ws.Row, ws.Col)
						}
					}
					continue
				}
				terminating++
				if terminating >= 3 {
					log.Warn("third signal: stopping the VM", "signal", sig.String())
					got.Store(int32(sig))
					cancel()
					return
				}
				if err := c.Signal(unix.Signal(sig)); err != nil && !errors.Is(err, vmm.ErrGuestEnded) {
					log.Warn("could not forward a signal to the command", "signal", sig.String(), "error", err)
				}
			}
		}
	}()
	stop = func() {
		signal.Stop(ch)
		close(done)
	}
	return stop, func() syscall.Signal { return syscall.Signal(got.Load()) }
}
