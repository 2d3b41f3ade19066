package net

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/virtq"
)

// TestReceiveStress sends thousands of frames of random length through the
// rx path while the "guest" refills buffers of random sizes, sometimes
// running dry. Frames beyond what the device queues are dropped and
// counted; every frame that arrives must be whole and in order, with a
// consistent num_buffers, and arrivals plus drops account for all frames.
func TestReceiveStress(t *testing.T) {
	const frames = 3000
	rg := newRig(t, 1500, features)
	rnd := rand.New(rand.NewSource(1))
	want := make([][]byte, frames)
	for i := range want {
		n := ethHeaderLen + rnd.Intn(1500+4)
		f := make([]byte, n)
		rnd.Read(f)
		binary.BigEndian.PutUint32(f, uint32(i))
		want[i] = f
	}
	go func() {
		for _, f := range want {
			b := make([]byte, 4+len(f))
			binary.BigEndian.PutUint32(b, uint32(len(f)))
			copy(b[4:], f)
			if _, err := rg.passt.Write(b); err != nil {
				return
			}
		}
	}()

	r := rg.rx
	// The guest side: a pool of qSize descriptors, each with a fixed buffer.
	bufAddr := make([]guestmem.Addr, qSize)
	bufLen := make([]uint32, qSize)
	for i := range bufAddr {
		bufAddr[i] = r.alloc(2048)
	}
	next := uint16(0) // next used index to consume
	post := func(idx uint16) {
		bufLen[idx] = uint32(64 + rnd.Intn(2048-64))
		r.setDesc(idx, bufAddr[idx], bufLen[idx], virtq.DescFWrite, 0)
		r.offer(idx)
	}
	for i := uint16(0); i < qSize/2; i++ {
		post(i)
	}
	free := []uint16{}
	for i := uint16(qSize / 2); i < qSize; i++ {
		free = append(free, i)
	}
	deadline := time.Now().Add(60 * time.Second)
	got, last := 0, -1
	for got+int(rg.dev.stats.RxQueueFull.Load()) < frames {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d frames after 60 s", got, frames)
		}
		if r.used() == next {
			// Refill a few buffers now and then; sometimes leave the ring dry.
			if len(free) > 0 && rnd.Intn(3) > 0 {
				k := 1 + rnd.Intn(len(free))
				for _, idx := range free[:k] {
					post(idx)
				}
				free = free[k:]
			}
			time.Sleep(100 * time.Microsecond)
			continue
		}
		// One frame: first element carries the header with num_buffers.
		id, n := r.usedElem(next)
		first := make([]byte, n)
		r.mem.Read(bufAddr[id], first)
		nb := binary.LittleEndian.Uint16(first[10:])
		if nb == 0 || int(nb) > qSize {
			t.Fatalf("frame %d: num_buffers %d", got, nb)
		}
		for uint16(r.used()-next) < nb {
			if time.Now().After(deadline) {
				t.Fatalf("frame %d: waiting for %d buffers", got, nb)
			}
			time.Sleep(100 * time.Microsecond)
		}
		data := append([]byte(nil), first[12:]...)
		free = append(free, uint16(id))
		for k := uint16(1); k < nb; k++ {
			id, n := r.usedElem(next + k)
			b := make([]byte, n)
			r.mem.Read(bufAddr[id], b)
			data = append(data, b...)
			free = append(free, uint16(id))
		}
		next += nb
		if len(data) < 4 {
			t.Fatalf("frame %d: only %d bytes", got, len(data))
		}
		idx := int(binary.BigEndian.Uint32(data))
		if idx <= last || idx >= frames {
			t.Fatalf("frame %d carries index %d after %d", got, idx, last)
		}
		if !bytes.Equal(data, want[idx]) {
			t.Fatalf("frame %d differs: got %d bytes, want %d bytes", idx, len(data), len(want[idx]))
		}
		last = idx
		got++
	}
	if rg.dev.stats.RxFrames.Load() != uint64(got) {
		t.Fatalf("device counted %d frames, guest got %d", rg.dev.stats.RxFrames.Load(), got)
	}
	if got == 0 {
		t.Fatal("no frame arrived")
	}
	t.Logf("%d frames delivered, %d dropped with the queue full", got, rg.dev.stats.RxQueueFull.Load())
}
