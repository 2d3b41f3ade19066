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
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	ring, err := testguest.NewRing(mem, 0, testguest.RingOptions{Size: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer ring.Close()
	_, aa, ua := ring.Addrs()
	avail, _ := mem.Bytes(aa, 4+2*8+4)
	used, _ := mem.Bytes(ua, 4+8*8+4)

	tr := NewSyncRing(mem, ring, 0)
	tr.Timeout = 50 * time.Millisecond
	if _, err := tr.RoundTrip([][]byte{[]byte("slow")}, 0); err == nil {
		t.Fatal("no timeout from a device that does not answer")
	}

	// The device wakes up and answers everything, in order, promptly.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		var seen, usedIdx uint16
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Microsecond):
			}
			ai := binary.LittleEndian.Uint16(avail[2:])
			for seen != ai {
				head := binary.LittleEndian.Uint16(avail[4+2*uint64(seen%8):])
				e := 4 + 8*uint64(usedIdx%8)
				binary.LittleEndian.PutUint32(used[e:], uint32(head))
				binary.LittleEndian.PutUint32(used[e+4:], 0)
				seen++
				usedIdx++
				binary.LittleEndian.PutUint16(used[2:], usedIdx)
				ring.CallFile().Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
			}
		}
	}()
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
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	ring, err := testguest.NewRing(mem, 0, testguest.RingOptions{Size: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer ring.Close()
	tr := NewSyncRing(mem, ring, 0)
	tr.Timeout = 20 * time.Millisecond
	if _, err := tr.RoundTrip([][]byte{[]byte("slow")}, 4096); err == nil {
		t.Fatal("no timeout from a device that does not answer")
	}
	if len(tr.abandoned) != 1 {
		t.Fatalf("%d abandoned requests, want 1", len(tr.abandoned))
	}
	var head uint16
	var bufs []uint64
	for h, b := range tr.abandoned {
		head, bufs = h, b
	}
	if len(bufs) != 2 {
		t.Fatalf("abandoned request keeps %d buffers, want 2 (request and reply)", len(bufs))
	}
	// The next request's buffers do not overlap them.
	a, err := mem.Alloc(4096, 64)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bufs {
		if a == b {
			t.Fatalf("buffer %#x handed out again while the device may still use it", b)
		}
	}
	mem.Free(a)
	// The device completes the abandoned chain; the next request skips it.
	_, aa, ua := ring.Addrs()
	avail, _ := mem.Bytes(aa, 4+2*8+4)
	used, _ := mem.Bytes(ua, 4+8*8+4)
	go func() {
		var seen uint16
		for i := 0; i < 2000; i++ {
			time.Sleep(100 * time.Microsecond)
			ai := binary.LittleEndian.Uint16(avail[2:])
			for seen != ai {
				h := binary.LittleEndian.Uint16(avail[4+2*uint64(seen%8):])
				binary.LittleEndian.PutUint32(used[4+8*uint64(seen%8):], uint32(h))
				binary.LittleEndian.PutUint32(used[8+8*uint64(seen%8):], 0)
				seen++
				binary.LittleEndian.PutUint16(used[2:], seen)
				ring.CallFile().Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
			}
			if seen >= 2 {
				return
			}
		}
	}()
	tr.Timeout = 2 * time.Second
	if _, err := tr.RoundTrip([][]byte{[]byte("next")}, 0); err != nil {
		t.Fatalf("request after the late answer: %v", err)
	}
	if _, ok := tr.abandoned[head]; ok || len(tr.abandoned) != 0 {
		t.Fatalf("abandoned %v after the device completed head %d", tr.abandoned, head)
	}
}
