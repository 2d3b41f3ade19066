package devspec

import (
	"strings"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/lines"
	"github.com/krun-core/krun-core/internal/ratelog"
)

// maxHelperLine bounds one line of a helper's output; a longer one is
// logged in pieces.
const maxHelperLine = 4096

// helperChatter are lines passt prints about its environment on every
// start, which say nothing about the device: logged at DEBUG.
var helperChatter = []string{
	"Failed to send ",       // "Failed to send 47 bytes to syslog": no syslog here
	"Don't run as root",     // root drops to nobody, as it should
	"Couldn't open syslog",  // likewise
	"Failed to open syslog", // likewise
}

// A helper's lines are logged in bursts of up to helperLogBurst, then at
// helperLogPerSecond a second, as a plugin's are (core/pluginhost).
const (
	helperLogBurst     = 1000
	helperLogPerSecond = 200
)

// HelperLog returns a writer for a helper process's (passt's) stdout and
// stderr that logs each non-empty line into log: a helper never writes to
// krun-core's own stderr. passt's lines carry no level; its start-up
// chatter goes to DEBUG and every other line (passt prints warnings and
// errors only, with --quiet) to WARN.
//
// passt parses the guest's packets and may be compromised, so its lines
// are hostile, as a plugin's are: one with a control character (a
// carriage return, an escape sequence) is logged quoted, so that it can
// neither pass for another component's line nor drive the terminal, and
// the lines logged are bounded by a budget; the next line logged after a
// refusal says how many were dropped (helper_lines_dropped).
func HelperLog(log hclog.Logger) *LineLogger {
	l := &LineLogger{log: log, budget: &ratelog.Budget{Burst: helperLogBurst, PerSecond: helperLogPerSecond}, level: func(line string) hclog.Level {
		for _, c := range helperChatter {
			if strings.HasPrefix(line, c) {
				return hclog.Debug
			}
		}
		return hclog.Warn
	}}
	l.w = &lines.Writer{Max: maxHelperLine, Line: l.line}
	return l
}

// LineLogger logs what is written to it, a line at a time.
type LineLogger struct {
	log    hclog.Logger
	level  func(line string) hclog.Level
	budget *ratelog.Budget
	w      *lines.Writer
}

// Write logs every complete line of p; a partial line waits for the rest.
func (w *LineLogger) Write(p []byte) (int, error) { return w.w.Write(p) }

func (w *LineLogger) line(b []byte) {
	s := strings.TrimSpace(string(b))
	if s == "" {
		return
	}
	level := w.level(s)
	if cur := w.log.GetLevel(); cur != hclog.NoLevel && level < cur {
		return // not logged, so not counted against the budget
	}
	ok, dropped := w.budget.Allow()
	if !ok {
		return
	}
	var args []any
	if dropped > 0 {
		args = append(args, "helper_lines_dropped", dropped)
	}
	w.log.Log(level, cli.Printable(s), args...)
}

// Close logs a last line that had no newline.
func (w *LineLogger) Close() error {
	w.w.Flush()
	return nil
}
