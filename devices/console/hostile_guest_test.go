package console

// Hostile-guest review (helper-137): control messages out of order,
// repeated, with bad ids and events; control and port chains of the wrong
// shape; a guest that never takes the host's output.

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// ctrl is one control message from the driver.
type ctrl struct {
	id           uint32
	event, value uint16
}

// sent lists the events of the control messages the device queued.
func sent(d *Device) []uint16 {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ev []uint16
	for _, m := range d.ctrlOut {
		ev = append(ev, binary.LittleEndian.Uint16(m[4:]))
	}
	return ev
}

// TestHostileControlSequence: whatever order, repetition, id or event the
// driver sends, the device adds the port once, names and opens it once
// and only after adding it, counts what it refuses, and opens the port for
// the guest only on PORT_OPEN for port 0.
func TestHostileControlSequence(t *testing.T) {
	add, name, open := uint16(evDeviceAdd), uint16(evPortName), uint16(evPortOpen)
	for _, tc := range []struct {
		name      string
		msgs      []ctrl
		want      []uint16 // events the device queued, in order
		bad       uint64
		guestOpen bool
	}{
		{"PORT_READY before DEVICE_READY", []ctrl{{0, evPortReady, 1}}, nil, 1, false},
		{"DEVICE_READY three times", []ctrl{{0, evDeviceReady, 1}, {0, evDeviceReady, 1}, {9, evDeviceReady, 1}}, []uint16{add}, 0, false},
		{"DEVICE_READY 0 then 1", []ctrl{{0, evDeviceReady, 0}, {0, evDeviceReady, 1}}, []uint16{add}, 1, false},
		{"DEVICE_READY value 2", []ctrl{{0, evDeviceReady, 2}}, nil, 1, false},
		{"PORT_READY three times", []ctrl{{0, evDeviceReady, 1}, {0, evPortReady, 1}, {0, evPortReady, 1}, {0, evPortReady, 1}}, []uint16{add, name, open}, 0, false},
		{"PORT_READY for ports 1 and 2^32-1", []ctrl{{0, evDeviceReady, 1}, {1, evPortReady, 1}, {0xffffffff, evPortReady, 1}}, []uint16{add}, 2, false},
		{"PORT_READY 0 then 1", []ctrl{{0, evDeviceReady, 1}, {0, evPortReady, 0}, {0, evPortReady, 1}}, []uint16{add, name, open}, 1, false},
		{"events of the other direction", []ctrl{{0, evDeviceAdd, 0}, {0, evDeviceRemove, 0}, {0, evConsolePort, 1}, {0, evResize, 0}, {0, evPortName, 0}}, nil, 5, false},
		{"unknown events", []ctrl{{0, 8, 1}, {0, 0xffff, 0xffff}}, nil, 2, false},
		{"PORT_OPEN for port 7", []ctrl{{7, evPortOpen, 1}}, nil, 1, false},
		{"PORT_OPEN before set-up", []ctrl{{0, evPortOpen, 1}}, nil, 0, true},
		{"PORT_OPEN 1, 1, 0", []ctrl{{0, evPortOpen, 1}, {0, evPortOpen, 1}, {0, evPortOpen, 0}}, nil, 0, false},
		{"PORT_OPEN value 2 is a close", []ctrl{{0, evPortOpen, 1}, {0, evPortOpen, 2}}, nil, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t)
			for _, m := range tc.msgs {
				d.control(m.id, m.event, m.value)
			}
			if got := sent(d); !equal16(got, tc.want) {
				t.Errorf("device queued events %v, want %v", got, tc.want)
			}
			if got := d.Stats().BadControl.Load(); got != tc.bad {
				t.Errorf("bad_control %d, want %d", got, tc.bad)
			}
			select {
			case <-d.GuestOpen():
				if !tc.guestOpen {
					t.Error("the port is open for the guest")
				}
			default:
				if tc.guestOpen {
					t.Error("the port is not open for the guest")
				}
			}
		})
	}
}

func equal16(a, b []uint16) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzControl drives the control state machine with arbitrary driver
// messages and resets: the device never queues more than its three
// messages (DEVICE_ADD, PORT_NAME, PORT_OPEN) between resets, never names
// the port before adding it, and its port is open for the guest exactly
// when the last PORT_OPEN for port 0 said 1.
func FuzzControl(f *testing.F) {
	msg := func(ms ...ctrl) []byte {
		var b []byte
		for _, m := range ms {
			b = binary.LittleEndian.AppendUint32(b, m.id)
			b = binary.LittleEndian.AppendUint16(b, m.event)
			b = binary.LittleEndian.AppendUint16(b, m.value)
		}
		return b
	}
	f.Add(msg(ctrl{0, evDeviceReady, 1}, ctrl{0, evPortReady, 1}, ctrl{0, evPortOpen, 1}))
	f.Add(msg(ctrl{0, evPortReady, 1}, ctrl{0, evDeviceReady, 1}, ctrl{0, evDeviceReady, 1}, ctrl{1, evPortReady, 1}, ctrl{0, evPortReady, 1}))
	f.Add(msg(ctrl{0, evDeviceReady, 1}, ctrl{0xffffffff, 0xffff, 0}, ctrl{0, evPortReady, 1}, ctrl{0, evPortOpen, 0}))
	f.Fuzz(func(t *testing.T, in []byte) {
		d, err := New(Config{Name: "krun.stdio"})
		if err != nil {
			t.Fatal(err)
		}
		open := false
		for len(in) >= controlLen {
			id, ev, val := binary.LittleEndian.Uint32(in), binary.LittleEndian.Uint16(in[4:]), binary.LittleEndian.Uint16(in[6:])
			in = in[controlLen:]
			if id == 0xdeadbeef { // a reset between messages
				d.Reset()
				open = false
				continue
			}
			d.control(id, ev, val)
			if ev == evPortOpen && id == 0 {
				open = val == 1
			}
			got := sent(d)
			want := []uint16{evDeviceAdd, evPortName, evPortOpen}
			if len(got) > len(want) || !equal16(got, want[:len(got)]) {
				t.Fatalf("device queued %v; want a prefix of %v", got, want)
			}
			select {
			case <-d.GuestOpen():
				if !open {
					t.Fatal("port open for the guest without its PORT_OPEN 1")
				}
			default:
				if open {
					t.Fatal("port closed for the guest after its PORT_OPEN 1")
				}
			}
		}
	})
}

// post posts one chain on ring r of the guest and waits for the device to
// hand it back; it returns the length the device wrote.
func post(t *testing.T, g *testguest.Guest, r int, segs []testguest.Segment) uint32 {
	t.Helper()
	ring := g.Rings[r]
	token := segs[0].Addr // the console harness's tokens are addresses
	if _, err := ring.Post(segs, token); err != nil {
		t.Fatal(err)
	}
	if err := ring.KickAlways(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		done, err := ring.Wait(ctx)
		if err != nil {
			t.Fatalf("ring %d: the hostile chain was not handed back: %v", r, err)
		}
		for _, d := range done {
			if d.Token == token {
				return d.Len
			}
		}
	}
}

// seg puts p in guest memory as one device-readable (or, write, device-
// writable) descriptor.
func seg(t *testing.T, g *testguest.Guest, p []byte, write bool) testguest.Segment {
	t.Helper()
	addr, err := g.Mem.Alloc(uint64(max(len(p), 4096)), 8)
	if err != nil {
		t.Fatal(err)
	}
	b, err := g.Mem.Bytes(addr, uint64(len(p)))
	if err != nil {
		t.Fatal(err)
	}
	copy(b, p)
	return testguest.Segment{Addr: addr, Len: uint32(len(p)), Writable: write}
}

// TestHostileChains: control and port chains of the wrong shape are
// handed back empty and counted, a control message split across
// descriptors is read whole, and the port goes on working.
func TestHostileChains(t *testing.T) {
	openMsg := make([]byte, controlLen)
	binary.LittleEndian.PutUint16(openMsg[4:], evPortOpen)
	binary.LittleEndian.PutUint16(openMsg[6:], 1)
	for _, tc := range []struct {
		name       string
		ring       int
		segs       func(g *testguest.Guest) []testguest.Segment
		bad, malf  uint64
		guestOpens uint64
	}{
		{"control: 7 bytes", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, openMsg[:7], false)}
		}, 1, 0, 0},
		{"control: empty descriptor", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, nil, false)}
		}, 1, 0, 0},
		{"control: with a writable descriptor", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, openMsg, false), seg(t, g, make([]byte, 8), true)}
		}, 1, 0, 0},
		{"control: only writable", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, make([]byte, 8), true)}
		}, 1, 0, 0},
		{"control: split 1+3+4 bytes", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, openMsg[:1], false), seg(t, g, openMsg[1:4], false), seg(t, g, nil, false), seg(t, g, openMsg[4:], false)}
		}, 0, 0, 1},
		{"control: 64 KiB of trailing bytes", controlTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, append(append([]byte{}, openMsg...), make([]byte, 64<<10)...), false)}
		}, 0, 0, 1},
		{"port: data with a writable descriptor", portTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, []byte("lost"), false), seg(t, g, make([]byte, 8), true)}
		}, 0, 1, 0},
		{"port: empty chain", portTx, func(g *testguest.Guest) []testguest.Segment {
			return []testguest.Segment{seg(t, g, nil, false)}
		}, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t)
			c := serve(t, d)
			g := c.Guest()
			if n := post(t, g, tc.ring, tc.segs(g)); n != 0 {
				t.Errorf("the device wrote %d bytes into a transmit chain", n)
			}
			if got := d.Stats().BadControl.Load(); got != tc.bad {
				t.Errorf("bad_control %d, want %d", got, tc.bad)
			}
			if got := d.Stats().Malformed.Load(); got != tc.malf {
				t.Errorf("malformed %d, want %d", got, tc.malf)
			}
			if got := d.Stats().GuestOpens.Load(); got != tc.guestOpens {
				t.Errorf("guest opens %d, want %d", got, tc.guestOpens)
			}
			if n := d.Stats().TxBytes.Load(); n != 0 {
				t.Errorf("%d bytes of a hostile chain reached the port", n)
			}
			// The port still works both ways.
			if err := c.Open(); err != nil {
				t.Fatal(err)
			}
			go c.Write([]byte("still works"))
			got := make([]byte, 11)
			if _, err := io.ReadFull(d, got); err != nil || string(got) != "still works" {
				t.Fatalf("guest to host after the hostile chain: %q, %v", got, err)
			}
			go d.Write([]byte("and back"))
			back := make([]byte, 8)
			if _, err := io.ReadFull(c, back); err != nil || string(back) != "and back" {
				t.Fatalf("host to guest after the hostile chain: %q, %v", back, err)
			}
		})
	}
}

// TestHostileReceiveBuffers: a receive buffer with a descriptor the
// device may only read is handed back empty and counted; the data goes to
// the good buffers around it, whole and in order.
func TestHostileReceiveBuffers(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	g := c.Guest()
	if err := c.Open(); err != nil {
		t.Fatal(err)
	}
	// The console harness posted 32 good buffers of 4 KiB; the hostile
	// one comes after them, and the harness's reads repost the good ones
	// behind it (the token is an address, as the harness's are).
	bad := []testguest.Segment{seg(t, g, make([]byte, 64), false), seg(t, g, make([]byte, 64), true)}
	if _, err := g.Rings[portRx].Post(bad, bad[0].Addr); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 40*4096+5)
	for i := range want {
		want[i] = byte(i * 7)
	}
	go d.Write(want)
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the data around the hostile buffer arrived changed")
	}
	if m := d.Stats().Malformed.Load(); m != 1 {
		t.Errorf("malformed %d, want 1", m)
	}
}

// TestGuestTakesNoOutput: a guest that opens the port and never takes
// what the host writes (no receive buffers given back) holds the host's
// writer, and the device buffers a bounded amount, not what the writer
// offers.
func TestGuestTakesNoOutput(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	if err := c.Open(); err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	done := make(chan error, 1)
	go func() {
		p := make([]byte, chunkSize)
		for i := 0; i < 256; i++ { // 16 MiB
			if _, err := d.Write(p); err != nil {
				done <- err
				return
			}
			accepted.Add(chunkSize)
		}
		done <- nil
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("16 MiB written to a guest that takes nothing (%v)", err)
	default:
	}
	// The guest's 32 posted buffers of 4 KiB, the queue and the chunk the
	// ring holds.
	bound := int64(32*4096 + (rxChunks+2)*chunkSize)
	if n := accepted.Load(); n > bound {
		t.Errorf("the device took %d bytes from the host, bound about %d", n, bound)
	}
	d.Close()
	if err := <-done; err != io.ErrClosedPipe {
		t.Errorf("blocked Write after Close: %v, want io.ErrClosedPipe", err)
	}
}

// TestTxChainBounded: a transmit chain longer than any a driver makes
// (maxTxChain: a page of the largest size in each descriptor of the
// largest ring) is dropped and counted, not read: its descriptors may all
// point at the same memory, and one such chain made the device copy up
// to 1024 x 4 GiB for the port's reader. A long chain within the bound
// arrives whole.
func TestTxChainBounded(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	g := c.Guest()
	var got atomic.Int64
	go func() {
		b := make([]byte, chunkSize)
		for {
			n, err := d.Read(b)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	const big = 8 << 20
	addr, err := g.Mem.Alloc(big, 4096)
	if err != nil {
		t.Fatal(err)
	}
	huge := make([]testguest.Segment, 64) // 512 MiB, all of it the same 8 MiB
	for i := range huge {
		huge[i] = testguest.Segment{Addr: addr, Len: big}
	}
	post(t, g, portTx, huge)
	if n := d.Stats().TxBytes.Load(); n != 0 {
		t.Errorf("the device read %d bytes of a %d-byte chain (bound %d)", n, 64*big, maxTxChain)
	}
	if m := d.Stats().Malformed.Load(); m != 1 {
		t.Errorf("malformed %d, want 1", m)
	}
	before := got.Load()
	long := make([]testguest.Segment, 64) // 4 MiB of 64 KiB pages
	for i := range long {
		long[i] = testguest.Segment{Addr: addr + uint64(i)*64<<10, Len: 64 << 10}
	}
	post(t, g, portTx, long)
	deadline := time.Now().Add(5 * time.Second)
	for got.Load()-before < 4<<20 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := got.Load() - before; n != 4<<20 {
		t.Errorf("the port's reader got %d bytes of a 4 MiB chain", n)
	}
}
