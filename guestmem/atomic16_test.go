package guestmem

import (
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// A ring index that another process stores while we read it, as the used
// index a back-end publishes: every value read is one that was stored,
// never the low byte of one and the high byte of the next (0x4cff ->
// 0x4d00 read as 0x4dff made TestRestartChaos's driver see its used index
// jump past its available index).
func TestLoad16NotTorn(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("needs two threads running at once")
	}
	for _, tt := range []struct {
		name string
		load func(m *Memory, a Addr) (uint16, error)
	}{
		{"Load16", (*Memory).Load16},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := twoRegions(t)
			const a = 0x10002 // a used ring's idx: 4-byte ring + 2
			var stop atomic.Bool
			done := make(chan struct{})
			go func() {
				defer close(done)
				for !stop.Load() {
					// 0x00ff <-> 0x0100 changes both bytes at once.
					if err := errors.Join(m.Store16(a, 0xff), m.Store16(a, 0x100)); err != nil {
						t.Error(err)
						return
					}
				}
			}()
			defer func() { stop.Store(true); <-done }()
			deadline := time.Now().Add(300 * time.Millisecond)
			for n := 0; time.Now().Before(deadline); n++ {
				v, err := tt.load(m, a)
				if err != nil {
					t.Fatal(err)
				}
				if v != 0xff && v != 0x100 && v != 0 {
					t.Fatalf("read %#04x: not a value stored but bytes of two (after %d reads)", v, n)
				}
			}
		})
	}
}

func TestLoad16Store16(t *testing.T) {
	m := twoRegions(t)
	for _, tt := range []struct {
		name string
		a    Addr
		ok   bool
	}{
		{"first region", 0x0, true},
		{"inside", 0x1ffe, true},
		{"second region", 0x10ffe, true},
		{"odd", 0x11, false},
		{"past the end", 0x2000, false},
		{"hole", 0x8000, false},
		{"top", ^Addr(1), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := m.Store16(tt.a, 0xbeef)
			if (err == nil) != tt.ok {
				t.Fatalf("Store16(%#x): %v, want ok=%v", tt.a, err, tt.ok)
			}
			v, err := m.Load16(tt.a)
			if (err == nil) != tt.ok {
				t.Fatalf("Load16(%#x): %v, want ok=%v", tt.a, err, tt.ok)
			}
			if !tt.ok {
				return
			}
			var b [2]byte
			if err := m.Read(tt.a, b[:]); err != nil {
				t.Fatal(err)
			}
			if v != 0xbeef || b != [2]byte{0xef, 0xbe} {
				t.Fatalf("Load16 %#x, bytes % x: want 0xbeef little-endian", v, b)
			}
		})
	}
}
