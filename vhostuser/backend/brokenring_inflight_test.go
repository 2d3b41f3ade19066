package backend_test

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// TestBrokenRingRestartsWithInflight: a ring the guest broke
// (virtq.ErrQueueBroken) with an inflight region is started again by the
// front-end after GET_VRING_BASE on a ring the driver laid out afresh (its
// used index back at 0), as a stopped ring is: every request it took was
// completed before it stopped, so the region has nothing in flight. The
// region was kept as if requests were in flight (as after a fault), and
// the restart failed: "used index 0 in guest memory, 70 in the region".
func TestBrokenRingRestartsWithInflight(t *testing.T) {
	for _, workers := range []int{0, 2} {
		t.Run(map[int]string{0: "ring goroutine", 2: "workers"}[workers], func(t *testing.T) {
			dev := newTestDevice(1)
			dev.workers = workers
			failed := make(chan error, 1)
			h := newHarness(t, dev, func(s *backend.Server) {
				s.RingFailed = func(q int, err error) {
					select {
					case failed <- err:
					default:
					}
				}
			})
			g, err := testguest.Start(h.client, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 4 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			r := g.Rings[0]
			for i := range 70 { // the used index past the ring's size
				echoOnce(t, g, r, string(rune('a'+i%26)))
			}
			_, avail, _ := r.Addrs()
			idx, err := g.Mem.Bytes(avail+2, 2)
			if err != nil {
				t.Fatal(err)
			}
			binary.LittleEndian.PutUint16(idx, 0x3030)
			if err := r.KickAlways(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-failed:
				if !errors.Is(err, virtq.ErrQueueBroken) {
					t.Fatalf("RingFailed got %v, want virtq.ErrQueueBroken", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("RingFailed was not called for the broken ring")
			}
			// The driver's reset: the ring stops, and the driver lays it
			// out afresh.
			if _, err := h.client.GetVringBase(0); err != nil {
				t.Fatal(err)
			}
			nr, err := testguest.NewRing(g.Mem, 0, testguest.RingOptions{
				Size:     64,
				EventIdx: g.Features()&vhostuser.FeatureRingEventIdx != 0,
				Indirect: g.Features()&vhostuser.FeatureRingIndirectDesc != 0,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer nr.Close()
			if err := h.client.SetupQueue(nr.Setup(), true); err != nil {
				t.Fatalf("the ring's restart: %v", err)
			}
			if _, got := echoOnce(t, g, nr, "after"); string(got) != "after" {
				t.Fatalf("after the ring's restart: got %q", got)
			}
		})
	}
}
