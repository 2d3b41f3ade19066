package net

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	stdnet "net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/guestmem/guestmemtest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// ring layout for one test queue of size 64 at base
const (
	qSize    = 64
	memSize  = 4 << 20
	rxBase   = 0x1000
	txBase   = 0x10000
	dataBase = 0x100000
)

type testRing struct {
	t          *testing.T
	mem        *guestmem.Memory
	q          *virtq.Queue
	base       guestmem.Addr
	avail      uint16
	kick, call *os.File // eventfds: the device waits on kick and signals call
	notifs     atomic.Int64
	nextBuf    guestmem.Addr
}

func newEventfd(t *testing.T) *os.File {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// countCalls adds the device's interrupts to notifs until the call
// eventfd is closed.
func (r *testRing) countCalls() {
	var b [8]byte
	for {
		if _, err := r.call.Read(b[:]); err != nil {
			return
		}
		r.notifs.Add(int64(binary.LittleEndian.Uint64(b[:])))
	}
}

func (r *testRing) desc() guestmem.Addr   { return r.base }
func (r *testRing) availA() guestmem.Addr { return r.base + 16*qSize }
func (r *testRing) usedA() guestmem.Addr  { return r.base + 0x1000 }

// w16 and r16 write and read a ring index with one 16-bit access
// (guestmem Store16, Load16): the device reads and writes them while the
// test runs, and a byte-wise copy can be seen half-way (helper-146).
func (r *testRing) w16(a guestmem.Addr, v uint16) {
	r.mem.Store16(a, v)
}

func (r *testRing) r16(a guestmem.Addr) uint16 {
	v, _ := r.mem.Load16(a)
	return v
}

func (r *testRing) setDesc(i uint16, addr guestmem.Addr, n uint32, flags, next uint16) {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], uint64(addr))
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	r.mem.Write(r.desc()+16*guestmem.Addr(i), b[:])
}

// offer publishes head and kicks, if the device's avail_event asks for it
// (EVENT_IDX), like a driver does.
func (r *testRing) offer(head uint16) {
	r.w16(r.availA()+4+2*guestmem.Addr(r.avail%qSize), head)
	old := r.avail
	r.avail++
	r.w16(r.availA()+2, r.avail)
	event := r.r16(r.usedA() + 4 + 8*qSize)
	if uint16(r.avail-event-1) >= uint16(r.avail-old) {
		return // the device did not ask for a kick
	}
	r.kick.Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
}

func (r *testRing) used() uint16 { return r.r16(r.usedA() + 2) }

func (r *testRing) usedElem(i uint16) (uint32, uint32) {
	var b [8]byte
	r.mem.Read(r.usedA()+4+8*guestmem.Addr(i%qSize), b[:])
	return binary.LittleEndian.Uint32(b[:]), binary.LittleEndian.Uint32(b[4:])
}

func (r *testRing) waitUsed(n uint16) {
	r.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for r.used() < n {
		if time.Now().After(deadline) {
			r.t.Fatalf("used index %d, waiting for %d", r.used(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func (r *testRing) alloc(n uint32) guestmem.Addr {
	a := r.nextBuf
	r.nextBuf += guestmem.Addr((n + 15) &^ 15)
	return a
}

type rig struct {
	dev    *Device
	passt  *os.File // the far end, standing in for passt
	rx, tx *testRing
	cancel context.CancelFunc
	done   chan error
}

func newRig(t *testing.T, mtu uint16, features uint64) *rig {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Non-blocking, so the test's end honours read deadlines.
	if err := unix.SetNonblock(fds[1], true); err != nil {
		t.Fatal(err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "dev"), os.NewFile(uintptr(fds[1]), "passt")
	t.Cleanup(func() { theirs.Close() })
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}, MTU: mtu, Conn: ours})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	dev.SetFeatures(features)
	mem := guestmemtest.Memory(t, "net-test", memSize)
	mk := func(base, data guestmem.Addr) *testRing {
		r := &testRing{t: t, mem: mem, base: base, kick: newEventfd(t), call: newEventfd(t), nextBuf: data}
		go r.countCalls()
		q, err := virtq.NewQueue(mem, virtq.Config{Size: qSize, DescTable: r.desc(), AvailRing: r.availA(), UsedRing: r.usedA(), EventIdx: true})
		if err != nil {
			t.Fatal(err)
		}
		r.q = q
		return r
	}
	rg := &rig{dev: dev, passt: theirs, rx: mk(rxBase, dataBase), tx: mk(txBase, dataBase+memSize/2), done: make(chan error, 2)}
	ctx, cancel := context.WithCancel(context.Background())
	rg.cancel = cancel
	serve := func(idx int, r *testRing) error {
		qc, err := dev.Queue(ctx, idx)
		if err != nil {
			return err
		}
		return backend.RunQueue(ctx, r.q, r.kick, r.call, qc, nil)
	}
	go func() { rg.done <- serve(0, rg.rx) }()
	go func() { rg.done <- serve(1, rg.tx) }()
	t.Cleanup(rg.stop)
	return rg
}

// stop cancels both rings and checks that they return promptly.
func (rg *rig) stop() {
	if rg.cancel == nil {
		return
	}
	rg.cancel()
	rg.cancel = nil
	for i := 0; i < 2; i++ {
		select {
		case err := <-rg.done:
			if err != nil {
				panic("ring returned " + err.Error())
			}
		case <-time.After(5 * time.Second):
			panic("ring did not stop within 5 s of cancellation")
		}
	}
}

func frame(n int, seed byte) []byte {
	f := make([]byte, n)
	for i := range f {
		f[i] = seed + byte(i*7)
	}
	return f
}

// send posts hdr+frame on the tx ring as two descriptors at index slot.
func (rg *rig) send(slot uint16, hdrLen int, fr []byte) {
	r := rg.tx
	h := r.alloc(uint32(hdrLen))
	d := r.alloc(uint32(len(fr)))
	r.mem.Write(h, make([]byte, hdrLen))
	r.mem.Write(d, fr)
	r.setDesc(2*slot, h, uint32(hdrLen), virtq.DescFNext, 2*slot+1)
	r.setDesc(2*slot+1, d, uint32(len(fr)), 0, 0)
	r.offer(2 * slot)
}

func (rg *rig) readPasst(t *testing.T) []byte {
	t.Helper()
	rg.passt.SetReadDeadline(time.Now().Add(5 * time.Second))
	var l [4]byte
	if _, err := io.ReadFull(rg.passt, l[:]); err != nil {
		t.Fatalf("read frame length from device: %v", err)
	}
	b := make([]byte, binary.BigEndian.Uint32(l[:]))
	if _, err := io.ReadFull(rg.passt, b); err != nil {
		t.Fatalf("read frame from device: %v", err)
	}
	return b
}

func (rg *rig) writePasst(t *testing.T, fr []byte) {
	t.Helper()
	b := make([]byte, 4+len(fr))
	binary.BigEndian.PutUint32(b, uint32(len(fr)))
	copy(b[4:], fr)
	if _, err := rg.passt.Write(b); err != nil {
		t.Fatal(err)
	}
}

// postRx offers n receive buffers of size each, one descriptor per chain.
func (rg *rig) postRx(first uint16, n int, size uint32) []guestmem.Addr {
	var addrs []guestmem.Addr
	for i := 0; i < n; i++ {
		a := rg.rx.alloc(size)
		idx := first + uint16(i)
		rg.rx.setDesc(idx, a, size, virtq.DescFWrite, 0)
		rg.rx.offer(idx)
		addrs = append(addrs, a)
	}
	return addrs
}

const features = 1<<virtq.FeatureVersion1 | 1<<FeatureMrgRxbuf

func TestTransmit(t *testing.T) {
	rg := newRig(t, 1500, features)
	fr := frame(1000, 1)
	rg.send(0, 12, fr)
	if got := rg.readPasst(t); !bytes.Equal(got, fr) {
		t.Fatal("passt received a different frame")
	}
	rg.tx.waitUsed(1)
	// The device counts a frame once its write to passt has returned,
	// which may be after passt has read it.
	deadline := time.Now().Add(5 * time.Second)
	for rg.dev.stats.TxFrames.Load() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("tx frames counted: %d, want 1", rg.dev.stats.TxFrames.Load())
		}
		time.Sleep(time.Millisecond)
	}
}

func TestTransmitOversizeAndMalformed(t *testing.T) {
	rg := newRig(t, 1500, features)
	rg.send(0, 12, frame(1500+ethHeaderLen+vlanLen+1, 2)) // one byte over
	// a chain with only 4 bytes: no room for the header
	h := rg.tx.alloc(4)
	rg.tx.setDesc(2, h, 4, 0, 0)
	rg.tx.offer(2)
	good := frame(60, 3)
	rg.send(2, 12, good)
	if got := rg.readPasst(t); !bytes.Equal(got, good) {
		t.Fatal("the frame after the bad ones did not arrive intact")
	}
	rg.tx.waitUsed(3)
	if rg.dev.stats.TxOversize.Load() != 1 || rg.dev.stats.TxMalformed.Load() != 1 {
		t.Fatalf("counters: oversize %d malformed %d", rg.dev.stats.TxOversize.Load(), rg.dev.stats.TxMalformed.Load())
	}
}

func TestReceive(t *testing.T) {
	rg := newRig(t, 1500, features)
	bufs := rg.postRx(0, 4, 2048)
	fr := frame(1514, 9)
	rg.writePasst(t, fr)
	rg.rx.waitUsed(1)
	id, n := rg.rx.usedElem(0)
	if id != 0 || n != uint32(12+len(fr)) {
		t.Fatalf("used elem %d len %d", id, n)
	}
	got := make([]byte, n)
	rg.mem(t).Read(bufs[0], got)
	if binary.LittleEndian.Uint16(got[10:]) != 1 {
		t.Fatalf("num_buffers = %d", binary.LittleEndian.Uint16(got[10:]))
	}
	if !bytes.Equal(got[12:], fr) {
		t.Fatal("frame content differs")
	}
}

func (rg *rig) mem(t *testing.T) *guestmem.Memory { return rg.rx.mem }

func TestReceiveMergeable(t *testing.T) {
	rg := newRig(t, 1500, features)
	bufs := rg.postRx(0, 8, 256)
	fr := frame(1000, 5) // 12+1000 = 1012 bytes: 4 buffers of 256
	rg.writePasst(t, fr)
	rg.rx.waitUsed(4)
	var all []byte
	for i := uint16(0); i < 4; i++ {
		id, n := rg.rx.usedElem(i)
		b := make([]byte, n)
		rg.rx.mem.Read(bufs[id], b)
		all = append(all, b...)
	}
	if binary.LittleEndian.Uint16(all[10:]) != 4 {
		t.Fatalf("num_buffers = %d, want 4", binary.LittleEndian.Uint16(all[10:]))
	}
	if !bytes.Equal(all[12:], fr) {
		t.Fatal("merged frame differs")
	}
}

func TestReceiveWaitsForBuffers(t *testing.T) {
	rg := newRig(t, 1500, features)
	fr := frame(500, 7)
	rg.writePasst(t, fr)
	time.Sleep(50 * time.Millisecond)
	if rg.rx.used() != 0 {
		t.Fatal("delivered without buffers")
	}
	// Too small a buffer: not enough room yet, nothing consumed.
	rg.postRx(0, 1, 128)
	time.Sleep(50 * time.Millisecond)
	if rg.rx.used() != 0 {
		t.Fatal("delivered a frame into too little room")
	}
	rg.postRx(1, 3, 256)
	rg.rx.waitUsed(3)
	if rg.dev.stats.RxFrames.Load() != 1 {
		t.Fatal("frame not delivered after buffers arrived")
	}
}

func TestReceiveNonMergeableTooSmall(t *testing.T) {
	rg := newRig(t, 1500, 1<<virtq.FeatureVersion1)
	rg.postRx(0, 1, 100)
	rg.writePasst(t, frame(500, 1)) // cannot fit one 100-byte buffer: dropped
	good := frame(60, 2)
	rg.writePasst(t, good)
	rg.rx.waitUsed(1)
	if _, n := rg.rx.usedElem(0); n != uint32(12+len(good)) {
		t.Fatalf("used len %d", n)
	}
	if rg.dev.stats.RxNoRoom.Load() != 1 {
		t.Fatal("drop not counted")
	}
}

func TestReceiveOversizeFromPasst(t *testing.T) {
	rg := newRig(t, 1500, features)
	rg.postRx(0, 8, 2048)
	rg.writePasst(t, frame(4000, 1))
	rg.writePasst(t, frame(8, 1)) // shorter than an Ethernet header
	good := frame(100, 4)
	rg.writePasst(t, good)
	rg.rx.waitUsed(1)
	if rg.dev.stats.RxOversize.Load() != 2 || rg.dev.stats.RxFrames.Load() != 1 {
		t.Fatalf("oversize %d frames %d", rg.dev.stats.RxOversize.Load(), rg.dev.stats.RxFrames.Load())
	}
}

func TestPasstExitsMidFrame(t *testing.T) {
	rg := newRig(t, 1500, features)
	b := make([]byte, 4+100)
	binary.BigEndian.PutUint32(b, 1000) // promises 1000 bytes, sends 100
	rg.passt.Write(b)
	rg.passt.Close()
	deadline := time.Now().Add(5 * time.Second)
	for rg.dev.LinkUp() {
		if time.Now().After(deadline) {
			t.Fatal("link still up after passt went away")
		}
		time.Sleep(time.Millisecond)
	}
	var st [2]byte
	if err := rg.dev.ReadConfig(6, st[:]); err != nil || binary.LittleEndian.Uint16(st[:])&StatusLinkUp != 0 {
		t.Fatalf("config status %v, %v", st, err)
	}
	// tx keeps completing requests (dropping frames) and the rings still stop.
	rg.send(0, 12, frame(60, 1))
	rg.tx.waitUsed(1)
	rg.stop()
}

func TestConfigSpace(t *testing.T) {
	rg := newRig(t, 9000, features)
	var cfg [12]byte
	if err := rg.dev.ReadConfig(0, cfg[:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cfg[:6], []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}) {
		t.Fatalf("mac % x", cfg[:6])
	}
	if binary.LittleEndian.Uint16(cfg[6:]) != StatusLinkUp || binary.LittleEndian.Uint16(cfg[8:]) != 1 || binary.LittleEndian.Uint16(cfg[10:]) != 9000 {
		t.Fatalf("config % x", cfg)
	}
	for _, tt := range []struct{ off, n uint32 }{{12, 1}, {10, 4}, {0xffffffff, 2}} {
		if err := rg.dev.ReadConfig(tt.off, make([]byte, tt.n)); err == nil {
			t.Errorf("ReadConfig(%d, %d) succeeded", tt.off, tt.n)
		}
	}
	if err := rg.dev.WriteConfig(0, []byte{1}); err == nil {
		t.Error("WriteConfig succeeded")
	}
}

func TestNewRejects(t *testing.T) {
	if _, err := New(Config{MAC: stdnet.HardwareAddr{1, 2, 3}}); err == nil {
		t.Error("short MAC accepted")
	}
	if _, err := New(Config{MAC: stdnet.HardwareAddr{1, 2, 3, 4, 5, 6}}); err == nil {
		t.Error("missing connection accepted")
	}
}

// TestReceiveQueueBounded: with no rx buffers, the device keeps draining
// passt (passt's writes never block) and holds at most rxQueueBytes; the
// rest is dropped and counted. Once buffers come, the held frames arrive,
// the oldest first.
func TestReceiveQueueBounded(t *testing.T) {
	rg := newRig(t, 65520, features)
	const size = 65000
	n := rxQueueBytes/size + 40
	fillRxQueue(t, rg, n, size)
	if q := rg.dev.rxQueued.Load(); q > rxQueueBytes {
		t.Fatalf("%d bytes queued, more than %d", q, rxQueueBytes)
	}
	if dropped := rg.dev.stats.RxQueueFull.Load(); dropped < 40 {
		t.Fatalf("%d frames dropped, want at least 40", dropped)
	}
	// The first frame is the oldest.
	addrs := rg.postRx(0, 2, 65536)
	rg.rx.waitUsed(1)
	got := make([]byte, size)
	if err := rg.mem(t).Read(addrs[0]+12, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, frame(size, 0)) {
		t.Fatal("the first frame delivered is not the first one sent")
	}
}

// fillRxQueue has passt send n frames of size bytes (frame i holds
// frame(size, i)) while the rx ring has no buffers, and returns once each
// is queued or dropped (one may wait in rxPending).
func fillRxQueue(t *testing.T, rg *rig, n, size int) {
	t.Helper()
	wrote := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			b := make([]byte, 4+size)
			binary.BigEndian.PutUint32(b, uint32(size))
			copy(b[4:], frame(size, byte(i)))
			if _, err := rg.passt.Write(b); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("writing to the device blocked while the rx ring was empty")
	}
	deadline := time.Now().Add(20 * time.Second)
	for int(rg.dev.stats.RxQueueFull.Load())+len(rg.dev.rxQueue) < n-1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d queued + %d dropped of %d frames", len(rg.dev.rxQueue), rg.dev.stats.RxQueueFull.Load(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReceiveNeedsMoreBuffers: a frame that needs more buffers than are
// available must not stop the device from handing over the frames it has
// delivered (else a driver that refills as it takes frames waits forever),
// and the device must ask for a kick on the next buffers.
func TestReceiveNeedsMoreBuffers(t *testing.T) {
	rg := newRig(t, 1500, features)
	a, b := frame(400, 1), frame(1400, 2)
	rg.writePasst(t, a)
	rg.writePasst(t, b)
	deadline := time.Now().Add(5 * time.Second)
	for len(rg.dev.rxQueue) == 0 { // a in rxPending (or queued), b queued
		if time.Now().After(deadline) {
			t.Fatal("frames not queued")
		}
		time.Sleep(time.Millisecond)
	}
	rg.postRx(0, 2, 512) // a fits; b needs three
	rg.rx.waitUsed(1)
	for rg.rx.notifs.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the device delivered a frame and never interrupted, waiting for more buffers")
		}
		time.Sleep(time.Millisecond)
	}
	rg.postRx(2, 2, 512)
	rg.rx.waitUsed(4)
	if got := rg.dev.stats.RxFrames.Load(); got != 2 {
		t.Fatalf("%d frames delivered, want 2", got)
	}
}

// TestRingStopFinishesWrite: a tx ring stopped while its write to passt is
// blocked (passt busy) lets the write finish once passt reads: the stream
// stays whole and the link stays up for the next front-end.
func TestRingStopFinishesWrite(t *testing.T) {
	rg := newRig(t, 65520, features)
	const n, size = 15, 60000 // far more than the socket pair buffers; fits the tx data area
	for i := 0; i < n; i++ {
		rg.send(uint16(i), 12, frame(size, byte(i)))
	}
	time.Sleep(100 * time.Millisecond) // the device is now blocked writing
	stopped := make(chan struct{})
	go func() {
		rg.stop()
		close(stopped)
	}()
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < n; i++ {
		if got := rg.readPasst(t); !bytes.Equal(got, frame(size, byte(i))) {
			t.Fatalf("frame %d: %d bytes, not what was sent", i, len(got))
		}
	}
	<-stopped
	if !rg.dev.LinkUp() {
		t.Fatal("link down after a ring stop that passt drained in time")
	}
}
