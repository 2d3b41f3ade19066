package pluginhost

import (
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

	"github.com/hashicorp/go-plugin/runner"
)

// procRunner is go-plugin's runner.Runner for one plugin process. It exists
// (instead of go-plugin's own command runner) so the host learns the exit
// status, starts the process from a goroutine that is never locked to an OS
// thread (Pdeathsig fires when the forking thread exits, and only locked
// threads ever exit), and gives the plugin /dev/null as stdin.
type procRunner struct {
	cmd    *exec.Cmd
	stdout io.ReadCloser
	stderr io.ReadCloser

	pid  int
	done chan struct{} // closed once the process is reaped (or never started)
	// postStart runs right after the process started (sandbox limits); an
	// error kills the process and fails the launch.
	postStart func(pid int) error

	waitOnce sync.Once
	waitErr  error
}

var _ runner.Runner = (*procRunner)(nil)

func newProcRunner(cmd *exec.Cmd) (*procRunner, error) {
	cmd.Stdin = nil // go-plugin sets os.Stdin; a plugin reads nothing from the terminal
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	return &procRunner{cmd: cmd, stdout: stdout, stderr: stderr, done: make(chan struct{})}, nil
}

func (r *procRunner) Start(context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- r.cmd.Start() }()
	if err := <-errc; err != nil {
		r.waitOnce.Do(func() {
			r.waitErr = err
			close(r.done)
		})
		return err
	}
	r.pid = r.cmd.Process.Pid
	if r.postStart != nil {
		if err := r.postStart(r.pid); err != nil {
			_ = r.cmd.Process.Kill()
			_ = r.Wait(context.Background()) // go-plugin will not: Start failed
			return fmt.Errorf("%s %w", sandboxErrPrefix, err)
		}
	}
	return nil
}

// Wait reaps the process; go-plugin calls it once the stdout and stderr
// pipes are drained.
func (r *procRunner) Wait(context.Context) error {
	r.waitOnce.Do(func() {
		r.waitErr = r.cmd.Wait()
		close(r.done)
	})
	<-r.done
	return r.waitErr
}

// exitErr is the wait status once done is closed.
func (r *procRunner) exitErr() error {
	<-r.done
	return r.waitErr
}

func (r *procRunner) Kill(context.Context) error {
	if r.cmd.Process == nil {
		return nil
	}
	if err := r.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	return nil
}

func (r *procRunner) Stdout() io.ReadCloser { return r.stdout }
func (r *procRunner) Stderr() io.ReadCloser { return r.stderr }
func (r *procRunner) Name() string          { return r.cmd.Path }

func (r *procRunner) ID() string {
	if r.pid == 0 {
		return ""
	}
	return strconv.Itoa(r.pid)
}

func (r *procRunner) Diagnose(context.Context) string {
	return "is " + r.cmd.Path + " a krun-core plugin built for this machine with a matching pluginsdk?"
}

func (r *procRunner) PluginToHost(network, addr string) (string, string, error) {
	return network, addr, nil
}

func (r *procRunner) HostToPlugin(network, addr string) (string, string, error) {
	return network, addr, nil
}

// sandboxErrPrefix starts errors of the launcher-side sandbox.
const sandboxErrPrefix = "launcher-side sandbox:"

// tailBuffer keeps the last lines a plugin wrote to stderr, so that a crash
// report can quote its panic message.
type tailBuffer struct {
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

func (t *tailBuffer) Write(p []byte) (int, error) {
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

// panicLine returns the first Go panic or fatal-error line seen in the
// tail, else the last error-level hclog JSON line ("message: error"), else
// the last non-JSON line, else "".
func (t *tailBuffer) panicLine() string {
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
