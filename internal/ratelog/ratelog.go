// Package ratelog spaces log lines that a guest can cause at will (a
// refused feature, a failed request on a full disk): the first is logged,
// then at most one per interval, each saying how many went unlogged, so a
// guest cannot flood the host's log.
package ratelog

import (
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
	ok, unlogged := l.Allow()
	if !ok {
		log.Debug(msg, args...)
		return
	}
	if unlogged > 0 {
		args = append(args, "unlogged_before", unlogged)
	}
	log.Log(level, msg, args...)
}
