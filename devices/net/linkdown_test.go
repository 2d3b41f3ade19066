package net

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	stdnet "net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// TestCutStreamEndsPasstsStream: a tx ring stopped while its write to
// passt is blocked longer than txStopGrace cuts passt's stream in the
// middle of a frame, and the device marks the link down for good. It must
// then end its half of the stream: passt (one-off with --fd) exits on the
// end, and the host starts a new passt and plugin (HelperExited in
// core/vmm and cmd/krun-core serve). Kept open, passt would wait for the
// rest of the frame, alive, and the guest would have no network until the
// VM ends (from review).
func TestCutStreamEndsPasstsStream(t *testing.T) {
	rg := newRig(t, 65520, features)
	const n, size = 15, 60000 // far more than the socket pair buffers
	for i := 0; i < n; i++ {
		rg.send(uint16(i), 12, frame(size, byte(i)))
	}
	time.Sleep(100 * time.Millisecond) // the device is now blocked writing
	rg.stop()                          // returns after txStopGrace: the write is cut
	if rg.dev.LinkUp() {
		t.Fatal("link still up after a write cut by the ring stop")
	}
	// passt's side: whatever was written, then the end of the stream.
	rg.passt.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := io.Copy(io.Discard, rg.passt)
	if err != nil {
		t.Fatalf("passt's stream was cut mid-frame and the device went link-down for good, "+
			"but passt sees no end of stream (read: %v): it waits for the rest of the frame, alive, "+
			"and nothing restarts it", err)
	}
}

// TestBrokenTxRingSendsWhatItCompleted: a tx ring that fails on a broken
// available ring (an entry naming a descriptor past the queue) still
// writes the frames it gathered in that round: their used elements are
// published, so the guest was told they were sent. Left in the batch,
// they would go out only with a later ring's, after the device's reset,
// ahead of the new driver's traffic (from review).
func TestBrokenTxRingSendsWhatItCompleted(t *testing.T) {
	dev, passt, r, q := bareRing(t, txBase)
	mem := r.mem
	// Slot 0: a good frame (header + data); slot 1: a head past the queue.
	fr := frame(100, 5)
	h, d := r.alloc(12), r.alloc(uint32(len(fr)))
	mem.Write(h, make([]byte, 12))
	mem.Write(d, fr)
	r.setDesc(0, h, 12, virtq.DescFNext, 1)
	r.setDesc(1, d, uint32(len(fr)), 0, 0)
	r.w16(r.availA()+4, 0)
	r.w16(r.availA()+6, qSize+5)
	r.w16(r.availA()+2, 2)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := dev.Queue(ctx, txQueue)
	if err != nil {
		t.Fatal(err)
	}
	err = backend.RunQueue(ctx, q, r.kick, r.call, qc, nil)
	if err == nil || !errors.Is(err, virtq.ErrQueueBroken) {
		t.Fatalf("tx ring returned %v, want the broken-ring error", err)
	}
	if r.used() != 1 {
		t.Fatalf("used index %d, want 1 (the good frame completed)", r.used())
	}
	passt.SetReadDeadline(time.Now().Add(time.Second))
	var l [4]byte
	if _, err := io.ReadFull(passt, l[:]); err != nil {
		t.Fatalf("the guest's frame was completed (used index 1) but passt got nothing (%v); %d bytes wait in txBatch for a later ring",
			err, len(dev.txBatch))
	}
	got := make([]byte, binary.BigEndian.Uint32(l[:]))
	if _, err := io.ReadFull(passt, got); err != nil || !bytes.Equal(got, fr) {
		t.Fatalf("passt got %d bytes (%v), not the frame", len(got), err)
	}
}

// TestCloseIsNotALostLink: closing the device (the plugin's Shutdown)
// is not passt going away: no "passt connection lost" warning, no
// link_down count (from review).
func TestCloseIsNotALostLink(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(fds[1]), "passt")
	defer passt.Close()
	logs := &syncbuf.Buffer{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, Conn: os.NewFile(uintptr(fds[0]), "dev"), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	dev.Close()
	if strings.Contains(logs.String(), "passt connection lost") || dev.Counters()["link_down"] != 0 {
		t.Fatalf("an orderly Close reported as a lost passt (link_down %d):\n%s", dev.Counters()["link_down"], logs.String())
	}
}
