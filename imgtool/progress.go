package imgtool

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Bar draws a one-line progress bar on a terminal, redrawn in place at
// most ten times a second.
type Bar struct {
	w     io.Writer
	mu    sync.Mutex
	last  time.Time
	drawn bool
	start time.Time
}

// NewBar returns a bar writing to w (a terminal).
func NewBar(w io.Writer) *Bar { return &Bar{w: w, start: time.Now()} }

// Update is a Progress function.
func (b *Bar) Update(done, total int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if b.drawn && now.Sub(b.last) < 100*time.Millisecond && (total == 0 || done < total) {
		return
	}
	b.last, b.drawn = now, true
	fmt.Fprint(b.w, "\r"+barLine(done, total, now.Sub(b.start)))
}

// Done ends the bar's line.
func (b *Bar) Done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drawn {
		fmt.Fprintln(b.w)
		b.drawn = false
	}
}

// barLine renders one state of the bar.
func barLine(done, total int64, took time.Duration) string {
	rate := ""
	if s := took.Seconds(); s > 0.5 {
		rate = fmt.Sprintf(" %s/s", humanSize(int64(float64(done)/s)))
	}
	if total <= 0 {
		return fmt.Sprintf("%10s%s   ", humanSize(done), rate)
	}
	const width = 40
	done = min(max(done, 0), total)
	fill := int(int64(width) * done / total)
	pct := 100 * float64(done) / float64(total)
	return fmt.Sprintf("[%s%s] %6.2f%% %s/%s%s   ", strings.Repeat("=", fill), strings.Repeat(" ", width-fill), pct,
		humanSize(done), humanSize(total), rate)
}
