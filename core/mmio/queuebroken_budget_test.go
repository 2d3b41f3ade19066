package mmio

import (
	"strings"
	"testing"
	"time"
)

// TestQueueBrokenHasItsOwnStopBudget (from review): QueueBroken stops the
// device's rings outside any guest access (the monitor's goroutine, or an
// error eventfd's watcher), but used the stop budget of the last guest
// access that stopped a ring, which Write only clears at the start of the
// next access. A driver that stopped one queue and then, more than
// StopBudget later, broke another ring (no register write in between: its
// kicks are ioeventfds) had the healthy back-end abandoned (killed) at
// once instead of asked to stop its rings, and a device without Recover
// failed for good instead of needing a reset.
func TestQueueBrokenHasItsOwnStopBudget(t *testing.T) {
	errs := make(chan int, 8)
	var abandons []error
	r := newRig(t, func(c *Config) {
		c.OnQueueError = func(q int) { errs <- q }
		c.StopBudget = 50 * time.Millisecond
		c.Abandon = func(why error) error {
			abandons = append(abandons, why)
			return nil
		}
	})
	st := r.negotiate(featureVersion1)
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.setupQueue(1, 64, 0x4000, 0x5000, 0x6000)
	r.wr(RegStatus, st|StatusDriverOK)

	// The driver stops queue 1: its access's stop budget starts.
	r.wr(RegQueueSel, 1)
	r.wr(RegQueueReady, 0)
	time.Sleep(100 * time.Millisecond) // well past that access's budget

	// The back-end stops ring 0, which the driver broke, and stays healthy.
	r.b.calls = nil
	signal(t, r.b.queues[0].Err)
	waitQueueError(t, errs, 0)
	if !r.d.QueueBroken(0) {
		t.Fatal("QueueBroken(0) after the signal did nothing")
	}
	if len(abandons) != 0 {
		t.Errorf("the healthy back-end was abandoned (killed): %v; back-end calls %v", abandons, r.b.calls)
	}
	if err := r.d.Failed(); err != nil {
		t.Errorf("device failed: %v", err)
	}
	if r.d.NeedsReset() == nil {
		t.Error("device does not need a reset")
	}
	if !strings.Contains(strings.Join(r.b.calls, ";"), "GetVringBase 0") {
		t.Errorf("ring 0 was not stopped in the back-end (GET_VRING_BASE): %v", r.b.calls)
	}
}
