package vmm

import (
	"sync/atomic"
	"time"
)

// The guest's status ports: krun-init (guest/init) writes one byte to each
// (out instructions, so the values are exits to the core and nothing the
// guest sends is parsed). They are the only way the guest reports to the
// core; the program's output travels through the console plugin.
const (
	// PortMilestone takes MilestoneInit when krun-init starts and
	// MilestoneExec when the program has been started (for --timing).
	PortMilestone = 0x510
	// PortExitStatus takes the program's exit status (0..255; 128+N for
	// a program killed by signal N) just before krun-init powers off.
	PortExitStatus = 0x511

	MilestoneInit = 1
	MilestoneExec = 2
)

// statusPorts records what the guest wrote to the status ports.
type statusPorts struct {
	initAt, execAt, exitAt atomic.Int64 // unix nanoseconds, 0: not yet
	exit                   atomic.Int32 // exit status + 1, 0: none
	notify                 *guestNotify // nil: nobody listens
}

// write handles an out to one of the status ports; it reports whether the
// port is one of them.
func (s *statusPorts) write(port uint16, data []byte) bool {
	switch port {
	case PortMilestone:
		if len(data) > 0 {
			now := time.Now().UnixNano()
			switch data[0] {
			case MilestoneInit:
				s.initAt.CompareAndSwap(0, now)
			case MilestoneExec:
				s.execAt.CompareAndSwap(0, now)
				if s.notify != nil {
					s.notify.markExeced()
				}
			case MilestoneReady:
				if s.notify != nil {
					s.notify.markReady()
				}
			}
		}
		return true
	case PortExitStatus:
		if len(data) > 0 {
			s.exit.Store(int32(data[0]) + 1)
			s.exitAt.CompareAndSwap(0, time.Now().UnixNano())
			if s.notify != nil {
				s.notify.markExited()
			}
		}
		return true
	}
	return false
}

// exitStatus returns the reported exit status, if any.
func (s *statusPorts) exitStatus() (int, bool) {
	v := s.exit.Load()
	return int(v) - 1, v != 0
}

func at(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// since is b-a, or 0 when either is unknown.
func since(a, b time.Time) time.Duration {
	if a.IsZero() || b.IsZero() || b.Before(a) {
		return 0
	}
	return b.Sub(a)
}
