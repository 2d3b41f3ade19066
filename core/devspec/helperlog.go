package devspec

import (
	"bytes"
	"strings"
	"sync"

	hclog "github.com/hashicorp/go-hclog"
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

// HelperLog returns a writer for a helper process's (passt's) stdout and
// stderr that logs each non-empty line into log: a helper never writes to
// krun-core's own stderr. passt's lines carry no level; its start-up
// chatter goes to DEBUG and every other line (passt prints warnings and
// errors only, with --quiet) to WARN.
func HelperLog(log hclog.Logger) *LineLogger {
	return &LineLogger{log: log, level: func(line string) hclog.Level {
		for _, c := range helperChatter {
			if strings.HasPrefix(line, c) {
				return hclog.Debug
			}
		}
		return hclog.Warn
	}}
}

// LineLogger logs what is written to it, a line at a time.
type LineLogger struct {
	log   hclog.Logger
	level func(line string) hclog.Level

	mu  sync.Mutex
	buf []byte
}

// Write logs every complete line of p; a partial line waits for the rest.
func (w *LineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.line(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
	for len(w.buf) >= maxHelperLine {
		w.line(w.buf[:maxHelperLine])
		w.buf = w.buf[maxHelperLine:]
	}
	w.buf = append([]byte(nil), w.buf...)
	return len(p), nil
}

func (w *LineLogger) line(b []byte) {
	s := strings.TrimSpace(string(b))
	if s == "" {
		return
	}
	w.log.Log(w.level(s), s)
}

// Close logs a last line that had no newline.
func (w *LineLogger) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.line(w.buf)
	w.buf = nil
	return nil
}
