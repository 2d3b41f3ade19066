package net

// Adversarial review (helper rev-net-88): a hostile guest on the tx/rx
// rings and a misbehaving passt on the stream. Tests named ...Finding fail
// on the reviewed code; the others record what held.

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/virtq"
)

// TestPasstLengthBeyondAnyFrame (from review, helper-88; fixed: such a
// length ends the stream, errStreamBroken, and the link goes down): passt never sends a frame longer than
// 65535 bytes (devopts.PasstMaxFrame), so a longer length prefix means its
// stream is broken (a bug, memory corruption, a replaced peer). The device
// "skips" such a frame by reading and discarding that many bytes: up to
// 4 GiB. Every real frame passt sends afterwards is swallowed as part of
// the skip, while the link stays up, so nothing tells the host to restart
// passt: receive is dead with no error for as long as it takes passt to
// send 4 GiB. Lengths within passt's range but over our MTU (and runts)
// are legitimately skipped and must keep working.
func TestPasstLengthBeyondAnyFrame(t *testing.T) {
	for _, tc := range []struct {
		name   string
		length uint32
	}{
		// hostile prefix: what it does on the reviewed code
		{"zero (runt, skipped, next frame delivered)", 0},
		{"13 (runt, skipped)", 13},
		{"mtu+19 (oversize within passt's limit, skipped)", 1500 + ethHeaderLen + vlanLen + 1},
		{"65535 (passt's largest, skipped)", devopts.PasstMaxFrame},
		{"65536 (beyond anything passt sends: swallows 64 KiB of later frames)", devopts.PasstMaxFrame + 1},
		{"0x7fffffff (swallows 2 GiB of later frames, link up)", 0x7fffffff},
		{"0xffffffff (swallows 4 GiB of later frames, link up)", 0xffffffff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRig(t, 1500, features)
			rg.postRx(0, 32, 2048)
			var p [4]byte
			binary.BigEndian.PutUint32(p[:], tc.length)
			if _, err := rg.passt.Write(p[:]); err != nil {
				t.Fatal(err)
			}
			// Body of the bogus frame, as far as it is plausible for
			// passt to have sent one.
			if tc.length <= devopts.PasstMaxFrame {
				if _, err := rg.passt.Write(make([]byte, tc.length)); err != nil {
					t.Fatal(err)
				}
			}
			// Then passt goes on with ordinary traffic: 50 good frames
			// (~74 KiB). A skip of 64 KiB ends inside one of them, and the
			// reader takes frame bytes for the next length prefix.
			for i := 0; i < 50; i++ {
				rg.writePasst(t, frame(1514, byte(i)))
			}
			deadline := time.Now().Add(3 * time.Second)
			for rg.dev.stats.RxFrames.Load() == 0 && rg.dev.LinkUp() {
				if time.Now().After(deadline) {
					t.Fatalf("length prefix %#x: after 50 good frames from passt, %d delivered, link still up "+
						"(rx_dropped_oversize %d): the stream is desynchronised, receive is dead and nothing restarts passt",
						tc.length, rg.dev.stats.RxFrames.Load(), rg.dev.stats.RxOversize.Load())
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

// txSeg is one descriptor of a hostile tx chain.
type txSeg struct {
	data  []byte
	n     uint32 // descriptor length if data is nil (overlapping, no write)
	write bool
}

// sendChain posts segs as one chain starting at descriptor first.
func (rg *rig) sendChain(first uint16, segs []txSeg) {
	r := rg.tx
	for i, s := range segs {
		n := s.n
		var a guestmem.Addr
		if s.data != nil {
			n = uint32(len(s.data))
			a = r.alloc(n)
			r.mem.Write(a, s.data)
		} else {
			a = dataBase // overlapping the rx area; never written
		}
		var fl uint16
		if i < len(segs)-1 {
			fl |= virtq.DescFNext
		}
		if s.write {
			fl |= virtq.DescFWrite
		}
		r.setDesc(first+uint16(i), a, n, fl, first+uint16(i)+1)
	}
	r.offer(first)
}

// split cuts b into pieces of the given sizes (the rest last).
func split(b []byte, sizes ...int) []txSeg {
	var out []txSeg
	for _, s := range sizes {
		out = append(out, txSeg{data: b[:s]})
		b = b[s:]
	}
	return append(out, txSeg{data: b})
}

// TestHostileTxChains (held): every hostile tx chain is either sent
// whole and unchanged or dropped and counted, and never desynchronises
// passt's stream: the good frame after it arrives intact and alone.
func TestHostileTxChains(t *testing.T) {
	garbageHdr := []byte{0x01, 0x81, 0xff, 0xff, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0x09, 0x09} // NEEDS_CSUM, TCPv4|ECN, hdr_len/gso_size/csum_* nonsense, num_buffers 0x909
	zeroHdr := make([]byte, 12)
	fr := frame(300, 9)
	for _, tc := range []struct {
		name string
		segs []txSeg
		sent []byte // nil: dropped
		ctr  string // the counter that must count the drop
	}{
		{"header only: dropped (malformed)", []txSeg{{data: zeroHdr}}, nil, "tx_malformed"},
		{"empty chain: dropped", []txSeg{{data: []byte{}}}, nil, "tx_malformed"},
		{"header short by one: dropped", []txSeg{{data: zeroHdr[:11]}}, nil, "tx_malformed"},
		{"13-byte frame: dropped", []txSeg{{data: zeroHdr}, {data: fr[:13]}}, nil, "tx_malformed"},
		{"14-byte frame: sent", []txSeg{{data: zeroHdr}, {data: fr[:14]}}, fr[:14], ""},
		{"header 1 byte a descriptor, frame cut at odd places: sent", append(split(zeroHdr, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), split(fr, 3, 1, 250)...), fr, ""},
		{"header and frame in one descriptor, cut mid-header: sent", split(append(append([]byte{}, zeroHdr...), fr...), 7), fr, ""},
		{"zero-length descriptors between: sent", []txSeg{{data: zeroHdr}, {data: []byte{}}, {data: fr[:100]}, {data: []byte{}}, {data: fr[100:]}}, fr, ""},
		{"garbage offload fields: sent unchanged", []txSeg{{data: garbageHdr}, {data: fr}}, fr, ""},
		{"writable descriptor at the end: dropped", []txSeg{{data: zeroHdr}, {data: fr}, {data: make([]byte, 64), write: true}}, nil, "tx_malformed"},
		{"maxFrame+1: dropped", []txSeg{{data: zeroHdr}, {data: frame(1500+ethHeaderLen+vlanLen+1, 1)}}, nil, "tx_dropped_oversize"},
		{"16 x 4 MiB overlapping descriptors (64 MiB): dropped", append([]txSeg{{data: zeroHdr}}, func() []txSeg {
			s := make([]txSeg, 16)
			for i := range s {
				s[i] = txSeg{n: memSize / 2}
			}
			return s
		}()...), nil, "tx_dropped_oversize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRig(t, 1500, features)
			rg.sendChain(0, tc.segs)
			good := frame(60, 77)
			rg.send(30, 12, good)
			if tc.sent != nil {
				if got := rg.readPasst(t); !bytes.Equal(got, tc.sent) {
					t.Fatalf("passt got %d bytes, want the %d-byte hostile frame unchanged", len(got), len(tc.sent))
				}
			}
			if got := rg.readPasst(t); !bytes.Equal(got, good) {
				t.Fatalf("the good frame after the hostile chain arrived as %d bytes: stream desynchronised", len(got))
			}
			rg.tx.waitUsed(2)
			if tc.ctr != "" && rg.dev.Counters()[tc.ctr] != 1 {
				t.Errorf("%s = %d, want 1 (counters %v)", tc.ctr, rg.dev.Counters()[tc.ctr], rg.dev.Counters())
			}
			for i := uint16(0); i < 2; i++ {
				if _, n := rg.tx.usedElem(i); n != 0 {
					t.Errorf("tx used element %d has length %d, want 0", i, n)
				}
			}
		})
	}
}

// TestHostileRxBuffers (held): rx buffers the guest sizes badly get
// exact used lengths, a correct num_buffers, a zeroed header and no stale
// bytes of an earlier, longer frame in the same buffer.
func TestHostileRxBuffers(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features uint64
		hdr      int
		bufs     int
		size     uint32
		frames   []int // frame lengths passt sends, in order, into reused buffers
		wantBufs []int // buffers used by each frame (num_buffers with MRG)
	}{
		{"mrg, 1-byte buffers: 62 buffers for a 50-byte frame", features, 12, 64, 1, []int{50}, []int{62}},
		{"mrg, buffers smaller than the header", features, 12, 64, 5, []int{60}, []int{15}},
		{"mrg, long frame then short one in the same buffers", features, 12, 8, 256, []int{1000, 60}, []int{4, 1}},
		{"version 1 without mrg: num_buffers 1", 1 << virtq.FeatureVersion1, 12, 1, 2048, []int{1514, 60}, []int{1, 1}},
		{"legacy header (10 bytes)", 0, 10, 1, 2048, []int{1514, 60}, []int{1, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRig(t, 1500, tc.features)
			r := rg.rx
			addrs := make([]guestmem.Addr, tc.bufs)
			for i := range addrs {
				addrs[i] = r.alloc(tc.size)
			}
			used := uint16(0)
			for fi, n := range tc.frames {
				// (Re)post the same buffers, filled with 0xee.
				for i, a := range addrs {
					r.mem.Write(a, bytes.Repeat([]byte{0xee}, int(tc.size)))
					r.setDesc(uint16(i), a, tc.size, virtq.DescFWrite, 0)
					r.offer(uint16(i))
				}
				fr := frame(n, byte(fi+1))
				rg.writePasst(t, fr)
				want := uint16(tc.wantBufs[fi])
				r.waitUsed(used + want)
				var all []byte
				for i := uint16(0); i < want; i++ {
					id, l := r.usedElem(used + i)
					b := make([]byte, l)
					r.mem.Read(addrs[id], b)
					all = append(all, b...)
				}
				time.Sleep(20 * time.Millisecond)
				if got := r.used(); got != used+want {
					t.Fatalf("frame %d: used index %d, want %d", fi, got, used+want)
				}
				used += want
				if len(all) != tc.hdr+n {
					t.Fatalf("frame %d: used lengths add up to %d, want %d", fi, len(all), tc.hdr+n)
				}
				h := append([]byte{}, all[:tc.hdr]...)
				if tc.hdr == 12 {
					if nb := binary.LittleEndian.Uint16(h[10:]); nb != want {
						t.Errorf("frame %d: num_buffers %d, want %d", fi, nb, want)
					}
					h[10], h[11] = 0, 0
				}
				if !bytes.Equal(h, make([]byte, tc.hdr)) {
					t.Errorf("frame %d: header % x, want zeros", fi, h)
				}
				if !bytes.Equal(all[tc.hdr:], fr) {
					t.Errorf("frame %d: content differs", fi)
				}
			}
		})
	}
}

// TestNoRxBuffersDoesNotStallTx (held): a guest that never posts rx
// buffers while passt floods it (far past the 8 MiB queue) neither blocks
// passt's writes nor stalls the guest's transmit.
func TestNoRxBuffersDoesNotStallTx(t *testing.T) {
	for _, size := range []int{60, 1514} {
		rg := newRig(t, 1500, features)
		n := rxQueueBytes/smallFrame + 2000 // beyond the bound
		fillRxQueue(t, rg, n, size)
		good := frame(200, 5)
		rg.send(0, 12, good)
		if got := rg.readPasst(t); !bytes.Equal(got, good) {
			t.Fatalf("frames of %d: tx frame arrived as %d bytes", size, len(got))
		}
		rg.tx.waitUsed(1)
	}
}

// TestRxSameHeadOfferedTwice (held; left untested by helper-137): a guest
// that offers one receive chain twice before the device used it gets both
// frames written into the same buffer, one used element each: the device
// keeps no per-head state that a second offer could corrupt (the guest
// only garbles its own buffer), and both rings go on serving.
func TestRxSameHeadOfferedTwice(t *testing.T) {
	rg := newRig(t, 1500, features)
	r := rg.rx
	a := r.alloc(2048)
	r.setDesc(0, a, 2048, virtq.DescFWrite, 0)
	r.offer(0)
	r.offer(0)
	first, second := frame(100, 1), frame(60, 2)
	rg.writePasst(t, first)
	rg.writePasst(t, second)
	r.waitUsed(2)
	for i := uint16(0); i < 2; i++ {
		id, l := r.usedElem(i)
		want := []int{len(first), len(second)}[i] + 12
		if id != 0 || int(l) != want {
			t.Errorf("used element %d: id %d length %d, want 0 and %d", i, id, l, want)
		}
	}
	got := make([]byte, 12+len(second))
	r.mem.Read(a, got)
	if !bytes.Equal(got[12:], second) {
		t.Error("the buffer does not hold the second frame")
	}
	// Both rings still serve.
	fresh := rg.postRx(1, 1, 2048)
	third := frame(80, 3)
	rg.writePasst(t, third)
	r.waitUsed(3)
	got = make([]byte, 12+len(third))
	r.mem.Read(fresh[0], got)
	if !bytes.Equal(got[12:], third) {
		t.Error("a frame after the twice-offered chain did not arrive intact")
	}
	out := frame(70, 4)
	rg.send(0, 12, out)
	if b := rg.readPasst(t); !bytes.Equal(b, out) {
		t.Error("transmit after the twice-offered chain failed")
	}
}
