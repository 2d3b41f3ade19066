// Package lines splits a byte stream into lines for a logger: the output
// of a helper process or a plugin, written in pieces of any size.
package lines

import (
	"bytes"
	"sync"
)

// Writer calls Line with every complete line written to it (without the
// newline), and with pieces of Max bytes of a line longer than that. It is
// safe for concurrent use; Line is called with its lock held, one line at
// a time, and must not keep the slice.
type Writer struct {
	Max  int
	Line func([]byte)

	mu  sync.Mutex
	buf []byte
}

// Write takes any piece of the stream.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	consumed := false
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.Line(w.buf[:i])
		w.buf = w.buf[i+1:]
		consumed = true
	}
	for w.Max > 0 && len(w.buf) >= w.Max {
		w.Line(w.buf[:w.Max])
		w.buf = w.buf[w.Max:]
		consumed = true
	}
	if consumed {
		// Keep the (short) rest at the start of a fresh buffer so the
		// backing array does not grow with the stream. Only then: a
		// line written a byte at a time (a guest's UART) was copied
		// whole at every byte, quadratic in its length.
		w.buf = append([]byte(nil), w.buf...)
	}
	return len(p), nil
}

// Flush passes a last line that had no newline to Line.
func (w *Writer) Flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.Line(w.buf)
	}
	w.buf = nil
}

// Pending is the length of the partial line held back.
func (w *Writer) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.buf)
}

// Tail keeps the last N lines given to Add. It is safe for concurrent
// use; the zero value keeps nothing.
type Tail struct {
	N int

	mu    sync.Mutex
	lines []string
	next  int // where the next line goes once N are kept
}

// Add keeps line, dropping the oldest once N are kept.
func (t *Tail) Add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.N <= 0 {
		return
	}
	if len(t.lines) < t.N {
		t.lines = append(t.lines, line)
		return
	}
	t.lines[t.next] = line
	t.next = (t.next + 1) % t.N
}

// Lines returns the lines kept, oldest first.
func (t *Tail) Lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.lines))
	out = append(out, t.lines[t.next:]...)
	return append(out, t.lines[:t.next]...)
}
