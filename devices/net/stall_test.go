package net

import (
	"context"
	stdnet "net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCheckFindsHungPasst: a passt that stops reading (hung, stopped with
// SIGSTOP) held the guest's transmissions for good and never exited, so
// nothing restarted it. Check (pluginsdk.Checker) reports it once a write
// has waited longer than txStallLimit, and a link that went down; it says
// nothing while passt reads, after an orderly Close, or before the limit.
func TestCheckFindsHungPasst(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(fds[1]), "passt") // never read: a hung passt
	defer passt.Close()
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, Conn: os.NewFile(uintptr(fds[0]), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	dev.txStallLimit = 200 * time.Millisecond
	if err := dev.Check(); err != nil {
		t.Fatalf("Check of an idle device: %v", err)
	}

	wrote := writeBatches(t, dev)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := dev.Check()
		if err != nil {
			if !strings.Contains(err.Error(), "passt has not read") {
				t.Fatalf("Check: %v, want a hung passt", err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Check found nothing 10 s into a write that passt does not read")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// passt reads again: the stall is over.
	go func() {
		b := make([]byte, 1<<20)
		for {
			if _, err := passt.Read(b); err != nil {
				return
			}
		}
	}()
	select {
	case <-wrote:
	case <-time.After(10 * time.Second):
		t.Fatal("the writes did not finish once passt read")
	}
	if err := dev.Check(); err != nil {
		t.Fatalf("Check once passt reads again: %v", err)
	}

	// A link that went down cannot come back: reported.
	dev.setLinkDown(os.ErrClosed)
	if err := dev.Check(); err == nil || !strings.Contains(err.Error(), "link down") {
		t.Fatalf("Check with the link down: %v", err)
	}
}

// TestCheckAfterClose: an orderly Close is not a lost passt for Check.
func TestCheckAfterClose(t *testing.T) {
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
	dev.Close()
	if err := dev.Check(); err != nil {
		t.Fatalf("Check after Close: %v", err)
	}
}

// TestCheckNotAfterAGap: checks further apart than txCheckGap mean the
// process did not run in between (a paused container, a suspended host):
// a write seen across such a gap is counted again from the later check,
// so a pause longer than txStallLimit is not taken for a hung passt.
func TestCheckNotAfterAGap(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(fds[1]), "passt") // not read until the end
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, Conn: os.NewFile(uintptr(fds[0]), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	dev.txStallLimit, dev.txCheckGap = 100*time.Millisecond, 50*time.Millisecond
	wrote := writeBatches(t, dev)
	for dev.txWrites.Load()%2 == 0 || dev.txWrites.Load() < 5 {
		time.Sleep(10 * time.Millisecond) // until a write blocks
	}
	for range 8 {
		time.Sleep(120 * time.Millisecond) // every check after a gap
		if err := dev.Check(); err != nil {
			t.Fatalf("Check after a gap: %v", err)
		}
	}
	passt.Close() // the writes end (EPIPE)
	<-wrote
}

// writeBatches writes 64 batches of 64 KiB to passt, as the tx ring's
// goroutine (the only writer) does, until one blocks on a full socket that
// passt does not read; the channel is closed once all are written.
func writeBatches(t *testing.T, dev *Device) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := 0; i < 64 && ctx.Err() == nil; i++ {
			dev.txBatch = append(dev.txBatch[:0], make([]byte, 64<<10)...)
			dev.txBatchFrames = 1
			dev.flushTx(ctx)
		}
	}()
	return wrote
}
