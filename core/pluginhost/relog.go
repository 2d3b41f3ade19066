package pluginhost

import (
	"bytes"
	"encoding/json"
	"sort"
	"strconv"
	"strings"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/lines"
	"github.com/krun-core/krun-core/internal/ratelog"
)

// maxLogLine bounds one line of a plugin's stderr; a longer one is logged
// in pieces of this size.
const maxLogLine = 64 << 10

// pluginLog re-logs a plugin's stderr into the host's logger. A plugin
// logs hclog JSON lines; each becomes one host log line at the line's
// level, with its message and its fields keeping their JSON types: a
// number stays a number (1073741824, not "1.073741824e+09"), a string is
// passed as the string it is, and the plugin's @timestamp is dropped (the
// host stamps the line itself). go-plugin's own re-logging, which turns
// every number into a float64 and adds a second timestamp, is switched off
// (quietLogger.Named).
//
// A line that is not JSON (a Go panic, a runtime error) is logged at the
// level its "[LEVEL]" prefix names, at ERROR from a "panic: " or "fatal
// error: " line on, and otherwise at DEBUG.
//
// A plugin may be compromised, and the rate limits of its own log are its
// own code: the lines it makes the host log are bounded by a budget
// (logBudget), which a start's or a panic trace's burst passes whole; the
// next line logged after a refusal says how many were dropped
// (plugin_lines_dropped).
type pluginLog struct {
	log    hclog.Logger
	kind   string
	budget *ratelog.Budget

	w       *lines.Writer
	inPanic bool // under w's lock
}

// A plugin's log lines are re-logged in bursts of up to logBurst, then at
// logPerSecond a second: a plugin logging at INFO, or a panic's trace of
// every goroutine, stays well inside; a flood does not become the host's.
const (
	logBurst     = 1000
	logPerSecond = 200
)

// newLogBudget is the budget the re-logged lines of one plugin process
// share (its stderr and its stdio stream's).
func newLogBudget() *ratelog.Budget {
	return &ratelog.Budget{Burst: logBurst, PerSecond: logPerSecond}
}

// newPluginLog re-logs a plugin's lines into log under the budget (nil: a
// budget of its own).
func newPluginLog(log hclog.Logger, kind string, budget *ratelog.Budget) *pluginLog {
	if budget == nil {
		budget = newLogBudget()
	}
	l := &pluginLog{log: log, kind: kind, budget: budget}
	l.w = &lines.Writer{Max: maxLogLine, Line: l.line}
	return l
}

// Write takes any piece of the stream; complete lines are logged.
func (w *pluginLog) Write(p []byte) (int, error) { return w.w.Write(p) }

func (w *pluginLog) line(b []byte) {
	b = bytes.TrimRight(b, "\r")
	if len(bytes.TrimSpace(b)) == 0 {
		return
	}
	if b[0] == '{' {
		if level, msg, args, ok := w.parseJSON(b); ok {
			w.logLine(level, cli.Printable(msg), args)
			return
		}
	}
	// The level comes from the line as written; what is logged is quoted
	// if it must be (a quoted line starts with '"').
	raw := string(b)
	level := hclog.Debug
	for _, l := range []hclog.Level{hclog.Trace, hclog.Debug, hclog.Info, hclog.Warn, hclog.Error} {
		if strings.HasPrefix(raw, "["+strings.ToUpper(l.String())+"]") {
			level = l
		}
	}
	if strings.HasPrefix(raw, "panic: ") || strings.HasPrefix(raw, "fatal error: ") {
		w.inPanic = true
	}
	if w.inPanic {
		level = hclog.Error
	}
	w.logLine(level, cli.Printable(raw), nil)
}

// logLine logs one line of the plugin's at level if the host's level
// takes it and the budget allows it.
func (w *pluginLog) logLine(level hclog.Level, msg string, args []any) {
	if cur := w.log.GetLevel(); cur != hclog.NoLevel && level < cur {
		return // not logged, so not counted against the budget
	}
	ok, dropped := w.budget.Allow()
	if !ok {
		return
	}
	if dropped > 0 {
		args = append(args, "plugin_lines_dropped", dropped)
	}
	w.log.Log(level, msg, args...)
}

// parseJSON reads one hclog JSON line: its level, message and the other
// fields in key order, with typed values.
func (w *pluginLog) parseJSON(b []byte) (hclog.Level, string, []any, bool) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return 0, "", nil, false
	}
	msg, ok := m["@message"].(string)
	if !ok {
		return 0, "", nil, false
	}
	lv, _ := m["@level"].(string)
	level := hclog.LevelFromString(lv)
	if level == hclog.NoLevel {
		return 0, "", nil, false
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		switch k {
		case "@message", "@level", "@timestamp":
			continue
		case "@module":
			// The SDK names the logger it gives Configure after the
			// kind, which the host's logger name already says.
			if m[k] == w.kind {
				continue
			}
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	args := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		args = append(args, cli.Printable(k), logValue(m[k]))
	}
	return level, msg, args, true
}

// logValue turns a decoded JSON value back into what the plugin logged: an
// integer for an integral number, a float64 otherwise; strings, booleans
// and null as they are; an object or array as its compact JSON text.
func logValue(v any) any {
	switch v := v.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		if u, err := strconv.ParseUint(v.String(), 10, 64); err == nil {
			return u
		}
		if f, err := v.Float64(); err == nil {
			return f
		}
		return v.String()
	case map[string]any, []any:
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	return v
}
