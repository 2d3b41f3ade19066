package net

import (
	"context"
	"encoding/binary"
	stdnet "net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/guestmem/guestmemtest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// walkRing is an rx ring of size entries laid out at 0 (descriptors),
// 0x4000 (available), 0x8000 (used) whose every head is an indirect
// chain of ind device-writable buffers of bufLen bytes (one shared table,
// every buffer at the same address).
type walkRing struct {
	mem  *guestmem.Memory
	q    *virtq.Queue
	size uint16
}

func newWalkRing(t *testing.T, size, ind uint16, bufLen uint32) *walkRing {
	t.Helper()
	mem := guestmemtest.Memory(t, "net-walk", memSize)
	const desc, avail, used, table = 0, 0x4000, 0x8000, 0x10000
	q, err := virtq.NewQueue(mem, virtq.Config{Size: size, DescTable: desc, AvailRing: avail, UsedRing: used,
		EventIdx: true, Indirect: true, MaxChain: MaxQueueSize})
	if err != nil {
		t.Fatal(err)
	}
	put := func(at guestmem.Addr, addr uint64, n uint32, flags, next uint16) {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[0:], addr)
		binary.LittleEndian.PutUint32(b[8:], n)
		binary.LittleEndian.PutUint16(b[12:], flags)
		binary.LittleEndian.PutUint16(b[14:], next)
		mem.Write(at, b[:])
	}
	for i := uint16(0); i < ind; i++ {
		fl := uint16(virtq.DescFWrite)
		if i+1 < ind {
			fl |= virtq.DescFNext
		}
		put(table+16*guestmem.Addr(i), 0x20000, bufLen, fl, i+1)
	}
	for h := uint16(0); h < size; h++ {
		put(desc+16*guestmem.Addr(h), table, 16*uint32(ind), virtq.DescFIndirect, 0)
		mem.Store16(avail+4+2*guestmem.Addr(h), h)
	}
	mem.Store16(avail+2, size)
	return &walkRing{mem: mem, q: q, size: size}
}

// TestRxWalkPerFrameBounded: a guest posts its whole rx ring once, each
// head an indirect chain of 1024 zero-length writable buffers (a 16 KiB
// table all heads share). Every frame passt sends made deliver take up to
// 256 heads, walk all their buffers (Take checks the whole chain), find no
// room, give them back and drop the frame: 256 x 1024 descriptor steps
// per frame, repeated for each frame without the guest doing anything
// more (it can have passt send frames with cheap tx frames of its own:
// ARP, pings to the gateway), 1.2 ms of the plugin's CPU a frame here
// against 20 us for 256 one-buffer chains (found in review, helper-151).
// deliver now stops taking chains once it has walked maxRxBuffers buffers
// for the frame: at most that many and one chain more (MaxQueueSize).
func TestRxWalkPerFrameBounded(t *testing.T) {
	for _, ind := range []uint16{1, MaxQueueSize} {
		dev, passt, _, _ := bareRxRing(t)
		r := newWalkRing(t, 256, ind, 0)
		kick, call := newEventfd(t), newEventfd(t)
		ctx, cancel := context.WithCancel(context.Background())
		qc, err := dev.Queue(ctx, rxQueue)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- backend.RunQueue(ctx, r.q, kick, call, qc, nil) }()
		const frames = 50
		fr := frame(1000, 1)
		b := make([]byte, 4+len(fr))
		binary.BigEndian.PutUint32(b, uint32(len(fr)))
		copy(b[4:], fr)
		for i := 0; i < frames; i++ {
			passt.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := passt.Write(b); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(60 * time.Second)
		for dev.stats.RxNoRoom.Load()+dev.stats.RxQueueFull.Load() < frames {
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d frames dropped after 60 s", dev.stats.RxNoRoom.Load(), frames)
			}
			time.Sleep(100 * time.Microsecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		walked, dropped := dev.stats.RxWalked.Load(), dev.stats.RxNoRoom.Load()
		if limit := uint64(maxRxBuffers + MaxQueueSize); dropped == 0 || walked/dropped > limit {
			t.Errorf("chains of %d buffers: %d buffers walked for %d frames dropped, want at most %d a frame", ind, walked, dropped, limit)
		}
		t.Logf("chains of %d zero-length buffers: %d buffers walked for %d frames dropped", ind, walked, dropped)
	}
}

// TestRxMergedMultiBufferChains: the bound on buffers walked per
// frame still lets a large frame merge over chains of two buffers each
// (64 chains, 128 buffers).
func TestRxMergedMultiBufferChains(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(fds[1]), "passt")
	defer passt.Close()
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, Conn: os.NewFile(uintptr(fds[0]), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	dev.SetFeatures(features)
	r := newWalkRing(t, 256, 2, 512)
	kick, call := newEventfd(t), newEventfd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	qc, err := dev.Queue(ctx, rxQueue)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- backend.RunQueue(ctx, r.q, kick, call, qc, nil) }()
	fr := frame(65000, 1) // 12+65000 bytes: 64 chains of 2 x 512
	b := make([]byte, 4+len(fr))
	binary.BigEndian.PutUint32(b, uint32(len(fr)))
	copy(b[4:], fr)
	passt.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := passt.Write(b); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for dev.stats.RxFrames.Load()+dev.stats.RxNoRoom.Load()+dev.stats.RxOversize.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("frame neither delivered nor dropped")
		}
		time.Sleep(time.Millisecond)
	}
	if got := dev.stats.RxFrames.Load(); got != 1 {
		t.Fatalf("frame not delivered over 2-buffer chains (no_room %d, oversize %d)", dev.stats.RxNoRoom.Load(), dev.stats.RxOversize.Load())
	}
	if used, _ := r.mem.Load16(0x8000 + 2); used != 64 {
		t.Fatalf("used index %d, want 64 chains of 1024 bytes for 12+65000 bytes", used)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
