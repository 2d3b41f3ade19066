package vmtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sync"
	"time"
)

// maxConsole bounds the console buffer; a guest printing without end cannot
// exhaust the test's memory. Older output is dropped from the front.
const maxConsole = 64 << 20

// console collects guest serial output and lets callers wait for patterns.
type console struct {
	max     int // buffer limit (maxConsole)
	mu      sync.Mutex
	buf     []byte
	dropped int64         // bytes dropped from the front of buf
	cursor  int64         // absolute offset where the next Expect starts
	changed chan struct{} // closed and replaced on every append or close
	closed  bool
	start   time.Time
	marks   map[string]time.Duration // first time a line with the key was seen
	keys    []string
	lineBuf []byte
	logLine func(string)
}

func newConsole(start time.Time, logLine func(string), keys ...string) *console {
	return &console{max: maxConsole, changed: make(chan struct{}), start: start, marks: map[string]time.Duration{}, keys: keys, logLine: logLine}
}

// Write appends guest output (io.Writer, fed by the QEMU stdout reader).
func (c *console) Write(p []byte) (int, error) {
	now := time.Since(c.start)
	c.mu.Lock()
	c.buf = append(c.buf, p...)
	if over := len(c.buf) - c.max; over > 0 {
		c.buf = append(c.buf[:0:0], c.buf[over:]...)
		c.dropped += int64(over)
	}
	var lines []string
	c.lineBuf = append(c.lineBuf, p...)
	for {
		i := bytes.IndexByte(c.lineBuf, '\n')
		if i < 0 {
			break
		}
		line := string(bytes.TrimRight(c.lineBuf[:i], "\r"))
		c.lineBuf = c.lineBuf[i+1:]
		lines = append(lines, line)
		for _, k := range c.keys {
			if _, seen := c.marks[k]; !seen && bytes.Contains([]byte(line), []byte(k)) {
				c.marks[k] = now
			}
		}
	}
	if len(c.lineBuf) > 1<<16 { // a very long line without newline
		lines = append(lines, string(c.lineBuf))
		c.lineBuf = nil
	}
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	if c.logLine != nil {
		for _, l := range lines {
			c.logLine(fmt.Sprintf("console %7.3fs| %s", now.Seconds(), l))
		}
	}
	return len(p), nil
}

// flush logs a trailing partial line.
func (c *console) flush() {
	c.mu.Lock()
	rest := string(c.lineBuf)
	c.lineBuf = nil
	c.mu.Unlock()
	if rest != "" && c.logLine != nil {
		c.logLine(fmt.Sprintf("console %7.3fs| %s", time.Since(c.start).Seconds(), rest))
	}
}

// close wakes waiters for good: no more output will come.
func (c *console) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.changed)
		c.changed = make(chan struct{})
	}
	c.mu.Unlock()
}

// String returns everything still buffered.
func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}

// mark returns when a line containing key was first seen.
func (c *console) mark(key string) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.marks[key]
	return d, ok
}

// ErrConsoleClosed is returned by Expect when the guest's console ended
// (QEMU exited) before the pattern appeared.
var ErrConsoleClosed = errors.New("console closed before the pattern appeared")

// expect waits until re matches output after the cursor, then moves the
// cursor past the match and returns the submatches.
func (c *console) expect(re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		startAbs := c.cursor
		if startAbs < c.dropped {
			startAbs = c.dropped
		}
		from := int(startAbs - c.dropped)
		if loc := re.FindSubmatchIndex(c.buf[from:]); loc != nil {
			subs := make([]string, len(loc)/2)
			for i := range subs {
				if loc[2*i] >= 0 {
					subs[i] = string(c.buf[from+loc[2*i] : from+loc[2*i+1]])
				}
			}
			c.cursor = startAbs + int64(loc[1])
			c.mu.Unlock()
			return subs, nil
		}
		closed, ch := c.closed, c.changed
		c.mu.Unlock()
		if closed {
			return nil, fmt.Errorf("expect %q: %w", re.String(), ErrConsoleClosed)
		}
		select {
		case <-ch:
		case <-deadline.C:
			return nil, fmt.Errorf("expect %q: timed out after %v", re.String(), timeout)
		}
	}
}

var _ io.Writer = (*console)(nil)
