package main

import (
	"fmt"
	"os"
	"strings"
	"sync"
)

// logger writes krun-init's own messages to the kernel log (/dev/kmsg, so
// they show on the kernel console with kernel messages, never on the
// command's stdout or stderr), or to /dev/console before /dev is mounted.
type logger struct {
	mu  sync.Mutex
	out *os.File
}

func newLogger() *logger { return &logger{out: os.Stderr} }

// useKmsg switches to /dev/kmsg when it can be opened.
func (l *logger) useKmsg() {
	f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	l.mu.Lock()
	l.out = f
	l.mu.Unlock()
}

// Printf logs an informational message; each line becomes one kernel log
// record (shown on the console unless the kernel runs "quiet").
func (l *logger) Printf(format string, a ...any) { l.logf(6, format, a...) }

// Errorf logs an error (kernel log level 3: shown even when "quiet").
func (l *logger) Errorf(format string, a ...any) { l.logf(3, format, a...) }

func (l *logger) logf(level int, format string, a ...any) {
	if l == nil {
		return
	}
	msg := fmt.Sprintf(format, a...)
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range strings.Split(strings.TrimRight(msg, "\n"), "\n") {
		if l.out == os.Stderr {
			fmt.Fprintf(l.out, "krun-init: %s\n", line)
		} else {
			// Facility user (8) plus the level.
			fmt.Fprintf(l.out, "<%d>krun-init: %s\n", 8+level, line)
		}
	}
}
