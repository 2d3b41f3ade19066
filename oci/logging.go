package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/cli"
)

// runtimeLog is where the runtime reports: one line on stderr for a
// failure, as runc prints it, and the --log file in --log-format. With
// --log-format json each line is one object {"level","msg","time"} (what
// podman and containerd parse: a failing command leaves exactly one such
// line); without --log the JSON line goes to stderr instead of the plain
// one.
type runtimeLog struct {
	stderr io.Writer
	file   *os.File
	json   bool
	debug  bool
	mu     sync.Mutex
}

func openRuntimeLog(path, format string, debug bool, stderr io.Writer) (*runtimeLog, error) {
	l := &runtimeLog{stderr: stderr, debug: debug}
	switch format {
	case "", "text":
	case "json":
		l.json = true
	default:
		return l, fmt.Errorf("unknown --log-format %q (text or json)", format)
	}
	if path != "" {
		// O_NONBLOCK: a FIFO that nobody reads blocked open(2) for
		// ever; now it fails with ENXIO. One with a reader (and a
		// regular file) opens as before; Go's poller waits on a full
		// pipe instead of the write failing.
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o600)
		if st, serr := os.Stat(path); errors.Is(err, unix.ENXIO) && serr == nil && st.Mode()&os.ModeNamedPipe != 0 {
			return l, fmt.Errorf("--log %s: a FIFO that no process reads", path)
		}
		if err != nil {
			return l, fmt.Errorf("--log %s: %w", path, unwrapPath(err))
		}
		l.file = f
	}
	return l, nil
}

func (l *runtimeLog) close() {
	if l.file != nil {
		l.file.Close()
	}
}

// line formats one log line.
func (l *runtimeLog) line(level, msg string) []byte {
	msg = oneLine(msg)
	if l.json {
		b, _ := json.Marshal(struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
			Time  string `json:"time"`
		}{level, msg, time.Now().Format(time.RFC3339Nano)})
		return append(b, '\n')
	}
	return []byte(fmt.Sprintf("time=%q level=%s msg=%q\n", time.Now().Format(time.RFC3339Nano), level, msg))
}

// fail reports the error that ends a command.
func (l *runtimeLog) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	msg := oneLine(err.Error())
	switch {
	case l.file != nil:
		l.file.Write(l.line("error", msg))
		fmt.Fprintln(l.stderr, msg)
	case l.json:
		l.stderr.Write(l.line("error", msg))
	default:
		fmt.Fprintln(l.stderr, msg)
	}
}

// warn logs a warning (to the log file only: stderr belongs to the
// caller's protocol). With --log-format json only under --debug: podman
// reads the file as a single object, the error that ends a command.
func (l *runtimeLog) warn(format string, a ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil && (!l.json || l.debug) {
		l.file.Write(l.line("warning", fmt.Sprintf(format, a...)))
	}
}

// hclog returns a logger for the VM's machinery, into the log file at
// debug level with --debug, otherwise only warnings and errors (with
// --log-format json nothing: the file then holds only the runtime's own
// lines, one object each, which is what callers parse).
func (l *runtimeLog) hclog(name string) hclog.Logger {
	if l.file == nil || (l.json && !l.debug) {
		return hclog.NewNullLogger()
	}
	level := hclog.Warn
	if l.debug {
		level = hclog.Debug
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: level, Output: &lockedWriter{l: l}, JSONFormat: l.json})
}

type lockedWriter struct{ l *runtimeLog }

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.l.mu.Lock()
	defer w.l.mu.Unlock()
	return w.l.file.Write(p)
}

// oneLine folds a message into one line with its control characters
// written as escapes (cli.OneLine): an error can quote the bundle's
// config (a process argument, a path) and reaches the caller's terminal.
func oneLine(s string) string { return cli.OneLine(s) }
