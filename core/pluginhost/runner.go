package pluginhost

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-plugin/runner"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/sandbox"
)

// ProcRunner is go-plugin's runner.Runner for one plugin process. It exists
// (instead of go-plugin's own command runner) so the host learns the exit
// status, starts the process from a goroutine that is never locked to an OS
// thread (Pdeathsig fires when the forking thread exits, and only locked
// threads ever exit), and gives the plugin /dev/null as stdin.
type ProcRunner struct {
	cmd    *exec.Cmd
	path   string // the plugin executable
	stdout io.ReadCloser
	stderr io.ReadCloser

	pid  int
	done chan struct{} // closed once the process is reaped (or never started)
	// afterStart runs once cmd.Start has returned, started or not (the
	// sandbox's supervision of its launcher channel).
	afterStart func()

	waitOnce sync.Once
	waitErr  error
	hint     string      // Diagnose's question when the handshake fails
	stopping atomic.Bool // the host killed the process on purpose
	hostAddr atomic.Pointer[string]
}

var _ runner.Runner = (*ProcRunner)(nil)

// NewProcRunner prepares cmd (stdin /dev/null, stdout and stderr piped to
// go-plugin). hint is what Diagnose asks when the handshake fails; "" asks
// whether the binary is a krun-core plugin with a matching pluginsdk.
func NewProcRunner(cmd *exec.Cmd, hint string) (*ProcRunner, error) {
	path := cmd.Path
	if len(cmd.Args) > 1 && cmd.Args[0] == sandbox.TrampolineName {
		path = cmd.Args[1] // the sandbox's trampoline execs the plugin
	}
	if hint == "" {
		hint = "is " + path + " a krun-core plugin built for this machine with a matching pluginsdk?"
	}
	cmd.Stdin = nil // go-plugin sets os.Stdin; a plugin reads nothing from the terminal
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	return &ProcRunner{cmd: cmd, path: path, stdout: &handshakeGuard{ReadCloser: stdout}, stderr: stderr, done: make(chan struct{}), hint: hint}, nil
}

// maxHandshakeLine is the longest first line go-plugin reads from a
// plugin's stdout (its bufio.Scanner's limit).
const maxHandshakeLine = 64 << 10

// handshakeRefused is why handshakeGuard refused a plugin's handshake line.
type handshakeRefused struct{ why string }

func (e *handshakeRefused) Error() string { return e.why }

// handshakeGuard hands a plugin's stdout to go-plugin once its first line,
// the handshake, has been checked for what go-plugin would act on though
// krun-core never asked for it: a sixth field is a TLS certificate for
// go-plugin's AutoMTLS, whose loading writes into a TLS configuration
// krun-core does not have (a nil pointer: the host crashed; found in
// review). A refused line ends the stream with handshakeRefused, which
// go-plugin reports as a failed read of stdout before the handshake.
type handshakeGuard struct {
	io.ReadCloser
	checked bool
	pending []byte // read and checked, not yet passed on
	err     error
}

func (g *handshakeGuard) Read(p []byte) (int, error) {
	if !g.checked {
		g.checked = true
		g.pending, g.err = checkHandshake(g.ReadCloser)
	}
	if len(g.pending) > 0 {
		n := copy(p, g.pending)
		g.pending = g.pending[n:]
		return n, nil
	}
	if g.err != nil {
		return 0, g.err
	}
	return g.ReadCloser.Read(p)
}

// checkHandshake reads r up to its first line's end (or maxHandshakeLine
// bytes, or the end of the stream) and checks that line; it returns what
// it read, to be passed on, or the refusal.
func checkHandshake(r io.Reader) ([]byte, error) {
	var buf []byte
	chunk := make([]byte, 4096)
	for eof := false; ; {
		line := buf
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			line = buf[:i]
		} else if len(buf) > maxHandshakeLine {
			return buf, nil // go-plugin refuses the line as too long
		} else if !eof {
			n, err := r.Read(chunk)
			buf = append(buf, chunk[:n]...)
			if err != nil && err != io.EOF {
				return buf, err
			}
			eof = err == io.EOF
			continue
		}
		// A whole line, or the last piece of the stream, which go-plugin's
		// scanner takes as a line too.
		if err := refuseHandshake(line); err != nil {
			return nil, err // nothing of it reaches go-plugin
		}
		return buf, nil // after the end, the next read sees it again
	}
}

// refuseHandshake says why line, the plugin's handshake, is refused (nil:
// it is not).
func refuseHandshake(line []byte) error {
	fields := strings.Split(strings.TrimSpace(string(line)), "|")
	// As go-plugin: a sixth field of 50 bytes or less is extra data of
	// older servers, which it ignores.
	if len(fields) >= 6 && len(fields[5]) > 50 {
		return &handshakeRefused{"the plugin's handshake line offers a TLS certificate (go-plugin's AutoMTLS), which krun-core never asks for"}
	}
	return nil
}

func (r *ProcRunner) Start(context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- r.cmd.Start() }()
	err := <-errc
	if r.afterStart != nil {
		r.afterStart()
	}
	if err != nil {
		err = sandbox.ExplainStartError(r.cmd, err)
		r.waitOnce.Do(func() {
			r.waitErr = err
			close(r.done)
		})
		return err
	}
	r.pid = r.cmd.Process.Pid
	go r.watchExit()
	return nil
}

// Wait reaps the process; go-plugin calls it once the stdout and stderr
// pipes are drained. A kill the host asked for (MarkStopping) is reported
// to go-plugin as a clean exit, which it would otherwise log as an error;
// ExitErr keeps the real status.
func (r *ProcRunner) Wait(context.Context) error {
	r.waitOnce.Do(func() {
		r.waitErr = r.cmd.Wait()
		close(r.done)
	})
	<-r.done
	if r.stopping.Load() {
		return nil
	}
	return r.waitErr
}

// pipeDrainGrace is how long after the plugin's exit its stdout and stderr
// are left for go-plugin to read to their end before they are closed.
const pipeDrainGrace = 2 * time.Second

// watchExit closes the read ends of the plugin's stdout and stderr
// pipeDrainGrace after its process exits. go-plugin reaps the process
// (Wait) only once both pipes reach end of file, and a plugin can keep
// them from ever doing so: it sends their write ends over its vhost-user
// socket in a message the core never reads, and they stay open there
// after it is dead. Without this its Kill, and so the Launch or restart
// that killed it, would wait for good. Everything the process wrote is in
// the pipes when it exits; the grace is for go-plugin to read it.
func (r *ProcRunner) watchExit() {
	var info unix.Siginfo
	for {
		// WNOWAIT: the process stays for Wait to reap.
		err := unix.Waitid(unix.P_PID, r.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break // exited, or already reaped (ECHILD): Wait ran
		}
	}
	select {
	case <-r.done:
		return
	case <-time.After(pipeDrainGrace):
	}
	r.stdout.Close()
	r.stderr.Close()
}

// MarkStopping records that the host is about to kill the process.
func (r *ProcRunner) MarkStopping() { r.stopping.Store(true) }

// Pid is the process id, 0 before a successful start.
func (r *ProcRunner) Pid() int { return r.pid }

// Done is closed once the process has been reaped (or failed to start).
func (r *ProcRunner) Done() <-chan struct{} { return r.done }

// Path is the plugin executable.
func (r *ProcRunner) Path() string { return r.path }

// ExitErr is the wait status; it blocks until Done is closed.
func (r *ProcRunner) ExitErr() error {
	<-r.done
	return r.waitErr
}

func (r *ProcRunner) Kill(context.Context) error {
	if r.cmd.Process == nil {
		return nil
	}
	if err := r.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	return nil
}

func (r *ProcRunner) Stdout() io.ReadCloser { return r.stdout }
func (r *ProcRunner) Stderr() io.ReadCloser { return r.stderr }
func (r *ProcRunner) Name() string          { return r.path }

func (r *ProcRunner) ID() string {
	if r.pid == 0 {
		return ""
	}
	return strconv.Itoa(r.pid)
}

func (r *ProcRunner) Diagnose(context.Context) string { return r.hint }

// PluginToHost checks the address the plugin announced in its handshake:
// a plugin chooses it, so it must be a unix socket directly inside the
// plugin's own socket directory (never a TCP address or another path). A
// plugin in the sandbox's private root made it there, and the host reaches
// it through /proc/PID/root (sandbox.HostSocketPath).
func (r *ProcRunner) PluginToHost(network, addr string) (string, string, error) {
	if network != "unix" {
		return "", "", fmt.Errorf("plugin announced a %s address; only a unix socket in its socket directory is accepted", network)
	}
	p, err := sandbox.HostSocketPath(r.cmd.Env, r.pid, addr)
	if err != nil {
		return "", "", err
	}
	r.hostAddr.Store(&p)
	return network, p, nil
}

// HostAddr is the path of the plugin's gRPC socket as the host reaches it
// (PluginToHost's), "" before the handshake.
func (r *ProcRunner) HostAddr() string {
	if p := r.hostAddr.Load(); p != nil {
		return *p
	}
	return ""
}

func (r *ProcRunner) HostToPlugin(network, addr string) (string, string, error) {
	return network, addr, nil
}

// SandboxErrPrefix starts errors of the launcher-side sandbox.
const SandboxErrPrefix = "launcher-side sandbox:"

// TailBuffer keeps the last lines a plugin wrote to stderr, so that a crash
// report can quote its panic message (PanicLine). The zero value is ready.
type TailBuffer struct {
	mu    sync.Mutex
	lines []string
	part  []byte
	fatal string // the first Go panic or fatal-error line (sticky: the
	// goroutine dump that follows it is longer than the tail)
}

const (
	tailLines   = 64
	tailLineMax = 1024
)

func (t *TailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, b := range p {
		if b == '\n' {
			if t.fatal == "" && isFatalLine(string(t.part)) {
				t.fatal = string(t.part)
			}
			t.lines = append(t.lines, string(t.part))
			if len(t.lines) > tailLines {
				t.lines = t.lines[1:]
			}
			t.part = t.part[:0]
			continue
		}
		if len(t.part) < tailLineMax {
			t.part = append(t.part, b)
		}
	}
	return len(p), nil
}

// PanicLine returns the first Go panic or fatal-error line seen in the
// tail, else the last error-level hclog JSON line ("message: error"), else
// the last non-JSON line, else "".
func (t *TailBuffer) PanicLine() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.fatal != "" {
		return t.fatal
	}
	lines := t.lines
	if len(t.part) > 0 {
		lines = append(lines[:len(lines):len(lines)], string(t.part))
	}
	for _, l := range lines {
		if isFatalLine(l) {
			return l
		}
	}
	for i := len(lines) - 1; i >= 0; i-- {
		var e struct {
			Level   string `json:"@level"`
			Message string `json:"@message"`
			Error   string `json:"error"`
		}
		if json.Unmarshal([]byte(lines[i]), &e) != nil || e.Level != "error" {
			continue
		}
		if e.Error != "" {
			return e.Message + ": " + e.Error
		}
		return e.Message
	}
	for i := len(lines) - 1; i >= 0; i-- {
		if l := lines[i]; l != "" && l[0] != '{' {
			return l
		}
	}
	return ""
}

// isFatalLine matches the first line the Go runtime prints when a process
// dies: "panic: ...", "fatal error: ...", "SIGSEGV: segmentation violation".
func isFatalLine(l string) bool {
	if hasPrefix(l, "panic: ") || hasPrefix(l, "fatal error: ") {
		return true
	}
	i := strings.Index(l, ": ")
	if i < 4 || !hasPrefix(l, "SIG") {
		return false
	}
	for _, c := range []byte(l[3:i]) {
		if c < 'A' || c > 'Z' {
			return false
		}
	}
	return true
}

func hasPrefix(s, p string) bool { return len(s) >= len(p) && s[:len(p)] == p }
