// Package ratelog spaces log lines that a guest can cause at will (a
// refused feature, a failed request on a full disk): the first is logged,
// then at most one per interval, each saying how many went unlogged, so a
// guest cannot flood the host's log.
package ratelog

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// DefaultEvery is the interval of a zero Limiter.
const DefaultEvery = 10 * time.Second

// Limiter decides which of a stream of events get a log line. The zero
// value logs at most one line every DefaultEvery. It is safe for
// concurrent use.
type Limiter struct {
	Every time.Duration // 0: DefaultEvery

	last  atomic.Int64  // when a line was last allowed (Unix ns; 0: never)
	quiet atomic.Uint64 // events not logged since
}

// Allow reports whether this event may be logged now and, if so, how many
// events since the last logged one were not.
func (l *Limiter) Allow() (ok bool, unlogged uint64) {
	return l.allowAt(time.Now())
}

func (l *Limiter) allowAt(now time.Time) (bool, uint64) {
	every := l.Every
	if every <= 0 {
		every = DefaultEvery
	}
	t := now.UnixNano()
	last := l.last.Load()
	if (last != 0 && t-last < int64(every)) || !l.last.CompareAndSwap(last, t) {
		l.quiet.Add(1)
		return false, 0
	}
	return true, l.quiet.Swap(0)
}

// Warn logs msg at the warning level when Allow lets it through, adding
// how many events went unlogged before it (when any); the others go to
// the debug level.
func (l *Limiter) Warn(log hclog.Logger, msg string, args ...any) {
	l.logAt(log, hclog.Warn, msg, args)
}

// Error is Warn at the error level.
func (l *Limiter) Error(log hclog.Logger, msg string, args ...any) {
	l.logAt(log, hclog.Error, msg, args)
}

func (l *Limiter) logAt(log hclog.Logger, level hclog.Level, msg string, args []any) {
	if !l.Log(log, level, msg, args...) {
		log.Debug(msg, args...)
	}
}

// Log logs msg at level when Allow lets it through, adding how many
// events went unlogged before it (when any), and reports whether it did;
// the others are not logged at any level (a line a process that may be
// compromised causes at will).
func (l *Limiter) Log(log hclog.Logger, level hclog.Level, msg string, args ...any) bool {
	ok, unlogged := l.Allow()
	if !ok {
		return false
	}
	if unlogged > 0 {
		args = append(args, "unlogged_before", unlogged)
	}
	log.Log(level, msg, args...)
	return true
}

// Budget lets a stream of events through in bursts of up to Burst,
// refilled at PerSecond a second; the events it refuses are counted and
// the count is handed to the next one it lets through. It bounds what a
// process that may be compromised (a plugin's log lines) can make the host
// write, while a short burst (a plugin's start, a panic's trace) passes
// whole. Safe for concurrent use.
type Budget struct {
	Burst     float64
	PerSecond float64

	mu      sync.Mutex
	tokens  float64
	last    time.Time // when tokens was last refilled (zero: never used)
	refused uint64    // refused since the last event let through
}

// Allow reports whether this event may go through now and, if so, how
// many events were refused since the last one that went through.
func (b *Budget) Allow() (ok bool, refused uint64) {
	return b.allowAt(time.Now())
}

func (b *Budget) allowAt(now time.Time) (bool, uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last.IsZero() {
		b.tokens = b.Burst
		b.last = now
	} else if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.Burst, b.tokens+d.Seconds()*b.PerSecond)
		b.last = now
	}
	if b.tokens < 1 {
		b.refused++
		return false, 0
	}
	b.tokens--
	n := b.refused
	b.refused = 0
	return true, n
}
