package fuseclient

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// TestSyncRingAfterTimeout: one request times out, the device answers it
// late; the transport recovers (it skips the stale completion, frees the
// abandoned request's buffers then, and waits for its own), instead of
// failing every later request (from review).
func TestSyncRingAfterTimeout(t *testing.T) {
	h := newHandRing(t)
	tr := NewSyncRing(h.mem, h.ring, 0)
	tr.Timeout = 50 * time.Millisecond
	if _, err := tr.RoundTrip([][]byte{[]byte("slow")}, 0); err == nil {
		t.Fatal("no timeout from a device that does not answer")
	}
	// The device wakes up and answers everything, in order, promptly.
	h.answerFor(t)
	tr.Timeout = 2 * time.Second
	for i := 0; i < 3; i++ {
		if _, err := tr.RoundTrip([][]byte{[]byte("next")}, 0); err != nil {
			t.Errorf("request %d after the late answer: %v", i, err)
		}
	}
}

// TestSyncRingKeepsAbandonedBuffers: a request that timed out keeps its
// buffers until the device completes it (the device may still write its
// reply there); then they are freed.
func TestSyncRingKeepsAbandonedBuffers(t *testing.T) {
	h := newHandRing(t)
	tr := NewSyncRing(h.mem, h.ring, 0)
	tr.Timeout = 20 * time.Millisecond
	if _, err := tr.RoundTrip([][]byte{[]byte("slow")}, 4096); err == nil {
		t.Fatal("no timeout from a device that does not answer")
	}
	if len(tr.abandoned) != 1 {
		t.Fatalf("%d abandoned requests, want 1", len(tr.abandoned))
	}
	var head uint16
	var bufs []uint64
	for hd, b := range tr.abandoned {
		head, bufs = hd, b
	}
	if len(bufs) != 2 {
		t.Fatalf("abandoned request keeps %d buffers, want 2 (request and reply)", len(bufs))
	}
	// The next request's buffers do not overlap them.
	a, err := h.mem.Alloc(4096, 64)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bufs {
		if a == b {
			t.Fatalf("buffer %#x handed out again while the device may still use it", b)
		}
	}
	h.mem.Free(a)
	// The device completes the abandoned chain; the next request skips it.
	h.answerFor(t)
	tr.Timeout = 2 * time.Second
	if _, err := tr.RoundTrip([][]byte{[]byte("next")}, 0); err != nil {
		t.Fatalf("request after the late answer: %v", err)
	}
	if _, ok := tr.abandoned[head]; ok || len(tr.abandoned) != 0 {
		t.Fatalf("abandoned %v after the device completed head %d", tr.abandoned, head)
	}
}

// handRing is an 8-entry ring in its own memory, whose device the test
// plays by hand (answer).
type handRing struct {
	mem         *testguest.Memory
	ring        *testguest.Ring
	avail, used []byte
	seen        uint16 // available entries answered
}

func newHandRing(t *testing.T) *handRing {
	t.Helper()
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	ring, err := testguest.NewRing(mem, 0, testguest.RingOptions{Size: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ring.Close() })
	_, aa, ua := ring.Addrs()
	h := &handRing{mem: mem, ring: ring}
	h.avail, _ = mem.Bytes(aa, 4+2*8+4)
	h.used, _ = mem.Bytes(ua, 4+8*8+4)
	return h
}

// answer completes every chain made available since the last call, in
// order, with nothing written, and interrupts.
func (h *handRing) answer() {
	ai := binary.LittleEndian.Uint16(h.avail[2:])
	for h.seen != ai {
		head := binary.LittleEndian.Uint16(h.avail[4+2*uint64(h.seen%8):])
		e := 4 + 8*uint64(h.seen%8)
		binary.LittleEndian.PutUint32(h.used[e:], uint32(head))
		binary.LittleEndian.PutUint32(h.used[e+4:], 0)
		h.seen++
		binary.LittleEndian.PutUint16(h.used[2:], h.seen)
		h.ring.CallFile().Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
}

// answerFor plays the device every 100 µs until the test ends.
func (h *handRing) answerFor(t *testing.T) {
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Microsecond):
			}
			h.answer()
		}
	}()
}
