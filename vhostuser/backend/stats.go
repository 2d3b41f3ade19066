package backend

import "sync/atomic"

// QueueStats are the counters of one ring, cumulative over the life of the
// Server (across reconnects).
type QueueStats struct {
	Index int
	// Requests is the number of requests completed (chains the device
	// served, malformed ones aside).
	Requests uint64
	// Malformed counts malformed chains and requests the device rejected
	// (Request.Malformed).
	Malformed uint64
	// Notifications counts call eventfd signals.
	Notifications uint64
	// Kicks counts kick eventfd wake-ups.
	Kicks uint64
	// Failures counts rings that failed (fault, panic, broken ring).
	Failures uint64
	// Resubmitted counts chains taken again from the inflight region:
	// taken by a back-end that died before completing them.
	Resubmitted uint64
	// Running reports whether the ring is being served now.
	Running bool
}

type counters struct {
	requests      atomic.Uint64
	malformed     atomic.Uint64
	notifications atomic.Uint64
	kicks         atomic.Uint64
	failures      atomic.Uint64
	resubmitted   atomic.Uint64
	running       atomic.Bool
}

func (c *counters) snapshot(idx int) QueueStats {
	return QueueStats{
		Index:         idx,
		Requests:      c.requests.Load(),
		Malformed:     c.malformed.Load(),
		Notifications: c.notifications.Load(),
		Kicks:         c.kicks.Load(),
		Failures:      c.failures.Load(),
		Resubmitted:   c.resubmitted.Load(),
		Running:       c.running.Load(),
	}
}
