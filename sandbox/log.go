package sandbox

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// Logger is what the sandbox logs through: a subset of hclog.Logger, which
// satisfies it. The package does not import hclog so that the trampoline
// binary (cmd/krun-sandbox-exec), which links this package and starts
// once per plugin launch, stays small: every package it links adds to its
// start-up (docs/BENCHMARKS.md, "Plugin launch and the sandbox
// trampoline").
type Logger interface {
	Debug(msg string, args ...any)
	Info(msg string, args ...any)
	Warn(msg string, args ...any)
	Error(msg string, args ...any)
}

// nopLogger discards everything.
type nopLogger struct{}

func (nopLogger) Debug(string, ...any) {}
func (nopLogger) Info(string, ...any)  {}
func (nopLogger) Warn(string, ...any)  {}
func (nopLogger) Error(string, ...any) {}

// lineLogger writes one line per message in hclog's layout ("TIME [LEVEL]
// name: msg: key=value ..."), Info and above: the launcher's default when
// its caller gave no logger.
type lineLogger struct {
	name string
	mu   sync.Mutex
	w    io.Writer
}

func (l *lineLogger) Debug(string, ...any)          {}
func (l *lineLogger) Info(msg string, args ...any)  { l.line("INFO] ", msg, args) }
func (l *lineLogger) Warn(msg string, args ...any)  { l.line("WARN] ", msg, args) }
func (l *lineLogger) Error(msg string, args ...any) { l.line("ERROR]", msg, args) }

func (l *lineLogger) line(level, msg string, args []any) {
	var b strings.Builder
	b.WriteString(time.Now().Format("2006-01-02T15:04:05.000Z0700"))
	b.WriteString(" [")
	b.WriteString(level)
	b.WriteString(" ")
	b.WriteString(l.name)
	b.WriteString(": ")
	b.WriteString(msg)
	for i := 0; i < len(args); i += 2 {
		if i == 0 {
			b.WriteString(":")
		}
		key := fmt.Sprint(args[i])
		val := "(missing)"
		if i+1 < len(args) {
			val = fmt.Sprint(args[i+1])
		}
		if strings.ContainsAny(val, " \t\n\"=") || val == "" {
			val = fmt.Sprintf("%q", val)
		}
		fmt.Fprintf(&b, " %s=%s", key, val)
	}
	b.WriteByte('\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	io.WriteString(l.w, b.String())
}
