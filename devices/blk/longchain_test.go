package blk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/testguest"
)

// TestChainsLongerThanRing drives the device as Linux does behind QEMU's
// vhost-user-blk-pci: the front-end reads seg_max (254: chains of 256 with
// the header and the status) before it sets a ring of 128, and the driver
// then sends requests of seg_max data segments in indirect tables of
// seg_max+2 entries. Writes and reads of that shape must be served (status
// OK, every byte where it belongs), not refused as malformed.
func TestChainsLongerThanRing(t *testing.T) {
	const ring = 128
	r := newRigRing(t, 4<<20, false, blk.Config{}, nil, ring)
	bk := r.blk(t, 0)
	segs := int(bk.Config.SegMax)
	if segs+2 <= ring {
		t.Fatalf("seg_max %d fits a ring of %d: the test needs a longer chain", segs, ring)
	}
	// The back-end takes chains as long as seg_max allows, and no longer.
	if got := r.dev.Info().MaxChain; got != segs+2 {
		t.Fatalf("Info().MaxChain %d, want seg_max+2 = %d", got, segs+2)
	}
	mem := r.guest.Mem
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const segLen = 512
	data := fill(segs*segLen, 3)

	// do sends one request of typ at sector 0: header, segs segments of
	// segLen (device-readable for a write, writable for a read), status.
	do := func(typ uint32, payload []byte) []byte {
		t.Helper()
		entries := segs + 2
		table, err := mem.Alloc(uint64(16*entries), 16)
		if err != nil {
			t.Fatal(err)
		}
		hdrAddr, _ := mem.Alloc(16, 16)
		hdr, _ := mem.Bytes(hdrAddr, 16)
		binary.LittleEndian.PutUint32(hdr, typ)
		binary.LittleEndian.PutUint64(hdr[8:], 0)
		statusAddr, _ := mem.Alloc(1, 1)
		status, _ := mem.Bytes(statusAddr, 1)
		status[0] = 0xff
		tb, _ := mem.Bytes(table, uint64(16*entries))
		put := func(i int, addr uint64, n uint32, flags uint16) {
			d := tb[16*i:]
			binary.LittleEndian.PutUint64(d, addr)
			binary.LittleEndian.PutUint32(d[8:], n)
			binary.LittleEndian.PutUint16(d[12:], flags)
			binary.LittleEndian.PutUint16(d[14:], uint16(i+1))
		}
		const next, write = 1, 2
		put(0, hdrAddr, 16, next)
		bufs := make([][]byte, segs)
		for i := range segs {
			// Each segment a page apart: scattered, as a guest's pages are.
			a, err := mem.Alloc(4096, 4096)
			if err != nil {
				t.Fatal(err)
			}
			bufs[i], _ = mem.Bytes(a, segLen)
			flags := uint16(next)
			if typ == testguest.BlkTIn {
				flags |= write
			} else {
				copy(bufs[i], payload[i*segLen:])
			}
			put(1+i, a, segLen, flags)
		}
		put(entries-1, statusAddr, 1, write)
		q := r.guest.Rings[0]
		if _, err := q.PostIndirect(table, uint32(16*entries), typ); err != nil {
			t.Fatal(err)
		}
		q.KickAlways()
		done, err := q.Wait(ctx)
		if err != nil {
			t.Fatalf("request type %d with %d segments: %v", typ, segs, err)
		}
		if len(done) != 1 || status[0] != testguest.BlkSOK {
			t.Fatalf("request type %d with %d segments in a table of %d on a ring of %d: completions %+v, status %#x, want OK",
				typ, segs, entries, ring, done, status[0])
		}
		var out []byte
		for _, b := range bufs {
			out = append(out, b...)
		}
		return out
	}

	do(testguest.BlkTOut, data)
	got := make([]byte, len(data))
	if err := bk.Read(ctx, 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the %d-segment write did not land: %v", segs, err)
	}
	if back := do(testguest.BlkTIn, nil); !bytes.Equal(back, data) {
		t.Fatalf("the %d-segment read returned other bytes", segs)
	}
	if s := r.dev.Stats(); s.Writes == 0 || s.Reads == 0 {
		t.Fatalf("device stats %+v: the requests did not reach the device", s)
	}
}
