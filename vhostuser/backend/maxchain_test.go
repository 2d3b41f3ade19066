package backend_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// TestChainBound: a ring smaller than the device's largest takes chains as
// long as DeviceInfo.MaxChain (by default MaxQueueSize), because a
// front-end reads the configuration that bounds them before it sets the
// ring size; one buffer more is malformed (completed with nothing written,
// counted) and the ring goes on.
func TestChainBound(t *testing.T) {
	const ring = 8
	for _, tc := range []struct {
		name     string
		maxChain int // DeviceInfo.MaxChain
		bound    int // what the ring must take
	}{
		{"default: the largest ring", 0, 256},
		{"set by the device", 40, 40},
		{"below the ring: the ring", 4, ring},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newTestDevice(1)
			dev.info.MaxChain = tc.maxChain
			_, g, r := startGuest(t, dev, testguest.Options{QueueSize: ring})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// post sends a chain of n buffers in an indirect table: n-1
			// readable bytes, then one writable buffer for their echo.
			post := func(n int) (uint32, []byte) {
				t.Helper()
				table, err := g.Mem.Alloc(uint64(16*n), 16)
				if err != nil {
					t.Fatal(err)
				}
				data, _ := g.Mem.Alloc(uint64(n), 1)
				out, _ := g.Mem.Alloc(uint64(n), 1)
				db, _ := g.Mem.Bytes(data, uint64(n))
				tb, _ := g.Mem.Bytes(table, uint64(16*n))
				for i := range n {
					d := tb[16*i:]
					addr, length, flags := data+uint64(i), uint32(1), uint16(1) // NEXT
					db[i] = byte(i)
					if i == n-1 {
						addr, length, flags = out, uint32(n-1), 2 // WRITE
					}
					binary.LittleEndian.PutUint64(d, addr)
					binary.LittleEndian.PutUint32(d[8:], length)
					binary.LittleEndian.PutUint16(d[12:], flags)
					binary.LittleEndian.PutUint16(d[14:], uint16(i+1))
				}
				if _, err := r.PostIndirect(table, uint32(16*n), n); err != nil {
					t.Fatal(err)
				}
				r.KickAlways()
				done, err := r.Wait(ctx)
				if err != nil || len(done) != 1 {
					t.Fatalf("chain of %d: completions %+v, %v", n, done, err)
				}
				ob, _ := g.Mem.Bytes(out, uint64(n-1))
				return done[0].Len, ob
			}
			n, got := post(tc.bound)
			if want := db(tc.bound - 1); n != uint32(tc.bound-1) || !bytes.Equal(got, want) {
				t.Fatalf("chain of %d buffers on a ring of %d: echoed %d bytes %x, want %d", tc.bound, ring, n, got, tc.bound-1)
			}
			if n, _ := post(tc.bound + 1); n != 0 {
				t.Fatalf("chain of %d buffers (one over the bound) echoed %d bytes", tc.bound+1, n)
			}
			if n, _ := post(3); n != 2 {
				t.Fatalf("the ring stopped serving after a chain over the bound (echoed %d)", n)
			}
		})
	}
}

// db is the readable bytes post lays out: 0, 1, ... n-1.
func db(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}
