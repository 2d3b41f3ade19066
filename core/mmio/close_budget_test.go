package mmio

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// slowStopBackend is a back-end that answers every request at once except
// the two that stop a ring (SET_VRING_ENABLE 0, GET_VRING_BASE), which it
// answers after delay: within the stop timeout, so it is never found gone.
// stops counts the stop requests it got.
func slowStopBackend(t *testing.T, stopTimeout, delay time.Duration, stops *atomic.Int32) *frontend.Client {
	return scriptedBackend(t, time.Second, stopTimeout, func(b *vhostuser.Conn, m *vhostuser.Message) {
		switch m.Request {
		case vhostuser.GetVringBase:
			s, _ := vhostuser.DecodeVringState(m.Payload)
			stops.Add(1)
			time.Sleep(delay)
			b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.VringState{Index: s.Index}.Encode(), nil)
			return
		case vhostuser.SetVringEnable:
			if s, _ := vhostuser.DecodeVringState(m.Payload); s.Num == 0 {
				stops.Add(1)
				time.Sleep(delay)
			}
		}
		if m.NeedReply() {
			b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(0), nil)
		}
	})
}

// TestCloseBoundedWithSlowStops (from review, helper-99): at the VM's exit
// (Device.Close) the stop budget is lifted (stopLimitLocked: closing), so
// each of a live ring's two stop requests gets the client's whole stop
// timeout, one ring after the other. A back-end that answers each of them
// just inside that timeout (an external back-end, which the core cannot
// kill, or a compromised plugin) holds the VM's exit for
// 2 x rings x DefaultStopTimeout: with queues=64, about 21 minutes. Close
// should be bounded as a whole (a budget of its own, as a guest access
// has StopBudget), not per request. Fixed: Close spends at most StopBudget
// on ring stops; the rings left are not asked.
func TestCloseBoundedWithSlowStops(t *testing.T) {
	const (
		stopTimeout = 300 * time.Millisecond
		delay       = 250 * time.Millisecond // each stop answered within its timeout
		budget      = 450 * time.Millisecond // StopBudget: 1.5 stop timeouts, as in the core
		queues      = 8
	)
	var stops atomic.Int32
	client := slowStopBackend(t, stopTimeout, delay, &stops)
	r := newRig(t, func(c *Config) {
		c.Backend = client
		c.NumQueues = queues
		c.StopBudget = budget
		c.Abandon = func(error) error { return nil }
	})
	if st := r.negotiate(featureVersion1); st&StatusFeaturesOK == 0 {
		t.Fatalf("features not accepted: status %#x", st)
	}
	for i := 0; i < queues; i++ {
		base := uint64(0x10000 * (3*i + 1))
		r.setupQueue(uint32(i), 256, base, base+0x10000, base+0x20000)
	}
	r.wr(RegStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
	if err := r.d.Failed(); err != nil {
		t.Fatalf("device failed at set-up: %v", err)
	}
	done := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		r.d.Close()
		done <- time.Since(start)
	}()
	limit := budget + stopTimeout + time.Second
	select {
	case took := <-done:
		t.Logf("Close with %d live rings took %v, %d stop requests (stop timeout %v, budget %v)", queues, took.Round(time.Millisecond), stops.Load(), stopTimeout, budget)
		// Which requests were made, not how long they took (the time
		// is a hang's bound): each takes delay or more, so no more than
		// budget/delay+1 start within the budget (16 without it).
		if n, most := stops.Load(), int32(budget/delay)+1; n > most {
			t.Errorf("Close with %d live rings made %d stop requests of %v each, past its budget of %v (at most %d)", queues, n, delay, budget, most)
		}
		if took > limit {
			t.Errorf("Close with %d live rings took %v against a back-end answering each stop within its %v timeout: %.0f stop timeouts, unbounded by the number of rings", queues, took.Round(time.Millisecond), stopTimeout, float64(took)/float64(stopTimeout))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Close did not return within 20 s")
	}
}
