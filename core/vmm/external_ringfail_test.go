package vmm

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// panicFirstDevice is a blk device whose handlers panic on the first
// request (panicked set), as a plugin's bug would.
type panicFirstDevice struct {
	*blk.Device
	panicked *atomic.Bool
}

func (p panicFirstDevice) Queue(ctx context.Context, i int) (backend.QueueConfig, error) {
	qc, err := p.Device.Queue(ctx, i)
	if err != nil || qc.Handler == nil {
		return qc, err
	}
	qc.Handler = panicFirstHandler{Handler: qc.Handler, panicked: p.panicked}
	return qc, nil
}

type panicFirstHandler struct {
	backend.Handler
	panicked *atomic.Bool
}

func (h panicFirstHandler) Handle(req *backend.Request) {
	if h.panicked.CompareAndSwap(false, true) {
		panic("the test's panic")
	}
	h.Handler.Handle(req)
}

// TestExternalRingFailureReconnects (from review): an external back-end
// with reconnect= whose ring fails on its own and which is then replaced
// (another krun-core serve: its plugin's ring panics, the plugin reports
// itself failed and signals the ring's error eventfd, and serve restarts
// it, which ends the connection) is reconnected and the request replayed,
// as before the error eventfds: its signal must not make the device need
// a reset at once, which would outlive the reconnection (no ring is live
// to hand the new back-end) and leave a Linux guest, which does not reset
// on DEVICE_NEEDS_RESET, with a dead disk.
func TestExternalRingFailureReconnects(t *testing.T) {
	dir := shortDir(t)
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")

	// The first back-end: its ring panics; like serve, it goes away a
	// moment later (serve notices at its next health check) and a new
	// one listens on the same socket.
	var panicked atomic.Bool
	dev := panicFirstDevice{Device: blkTestDevice(t, img), panicked: &panicked}
	srv, err := backend.NewServer(dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(sock)
	ln := backendtest.Listen(t, sock)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	replaced := make(chan struct{})
	srv.RingFailed = func(int, error) {
		go func() {
			time.Sleep(300 * time.Millisecond)
			cancel()
			ln.Close()
			<-done
			startTestServer(t, sock, blkTestDevice(t, img))
			close(replaced)
		}()
	}
	go func() {
		defer close(done)
		srv.Serve(ctx, ln)
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		<-done
	})

	d, drv, logs := reconnectRig(t, "type=blk,reconnect=0.05,socket="+sock)
	if d.inflight == nil {
		t.Fatal("no inflight region from a back-end that offers INFLIGHT_SHMFD")
	}
	drv.start()
	a := bytes.Repeat([]byte{0xc3}, 512)
	drv.post(0, 0, a) // the first back-end panics on it; the second serves it
	select {
	case <-replaced:
	case <-time.After(20 * time.Second):
		t.Fatal("the first back-end's ring did not fail")
	}
	waitLog(t, d, logs, reconnected, 1)
	if st := drv.rd(mmio.RegStatus); st&mmio.StatusDeviceNeedsRst != 0 {
		t.Fatalf("status %#x: a back-end's own failure made the device need a reset across its replacement", st)
	}
	drv.wait(1, 0, 10*time.Second)
	drv.readBack(1, 0, 2, a, 10*time.Second)
	imageHolds(t, img, map[uint64][]byte{0: a})
}

// TestExternalGuestBrokenRingNeedsReset: an external back-end that stops a
// ring the guest broke (its available index moved by more than the
// queue's size) and signals its error eventfd, and stays connected: the
// device needs a reset, at once without reconnect=, after the back-end's
// grace with it (TestExternalRingFailureReconnects).
func TestExternalGuestBrokenRingNeedsReset(t *testing.T) {
	defer func(g time.Duration) { externalQueueErrorGrace = g }(externalQueueErrorGrace)
	externalQueueErrorGrace = 500 * time.Millisecond
	for _, tc := range []struct {
		name string
		opts string
		min  time.Duration
	}{
		{"without reconnect", "", 0},
		{"with reconnect", "reconnect=0.05,", externalQueueErrorGrace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			img := filepath.Join(dir, "disk.raw")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, "blk.sock")
			startTestServer(t, sock, blkTestDevice(t, img))
			d, drv, _ := reconnectRig(t, "type=blk,"+tc.opts+"socket="+sock)
			drv.start()
			a := bytes.Repeat([]byte{0x5a}, 512)
			drv.post(0, 0, a)
			drv.wait(1, 0, 10*time.Second)

			drv.setIdx(rdAvail+2, drv.avail+3*rdQueueSize)
			broken := time.Now()
			drv.reg(mmio.RegQueueNotify, 0)
			for drv.rd(mmio.RegStatus)&mmio.StatusDeviceNeedsRst == 0 {
				if time.Since(broken) > 20*time.Second {
					t.Fatalf("status %#x 20 s after the guest broke its ring: no DEVICE_NEEDS_RESET", drv.rd(mmio.RegStatus))
				}
				time.Sleep(5 * time.Millisecond)
			}
			if took := time.Since(broken); took < tc.min {
				t.Errorf("DEVICE_NEEDS_RESET after %v, before the back-end's grace (%v)", took, tc.min)
			}
			if err := d.dev.Failed(); err != nil {
				t.Fatalf("device failed: %v", err)
			}
			// The driver's reset clears it.
			drv.put(rdAvail, make([]byte, 4+2*rdQueueSize))
			drv.put(rdUsed, make([]byte, 4+8*rdQueueSize))
			drv.avail = 0
			drv.start()
			drv.readBack(1, 0, 1, a, 10*time.Second)
		})
	}
}
