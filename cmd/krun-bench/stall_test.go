package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// silentBlk is a virtio-blk device of 1 MiB that takes requests and never
// completes them, as a back-end whose ring failed looks to a front-end.
type silentBlk struct {
	mu    sync.Mutex
	taken []*backend.Request
	// onTake, if set, runs (once) when the first request is taken.
	onTake func()
}

func (*silentBlk) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 2, NumQueues: 1, MaxQueueSize: 256, ProtocolFeatures: vhostuser.ProtocolConfig}
}
func (*silentBlk) ReadConfig(off uint32, p []byte) error {
	var c [64]byte
	binary.LittleEndian.PutUint64(c[:], 2048) // sectors
	clear(p)
	if int(off) < len(c) {
		copy(p, c[off:])
	}
	return nil
}
func (*silentBlk) WriteConfig(uint32, []byte) error { return errors.New("read-only") }
func (*silentBlk) SetFeatures(uint64) error         { return nil }
func (*silentBlk) Reset()                           {}
func (d *silentBlk) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d}, nil
}
func (d *silentBlk) Handle(req *backend.Request) {
	d.mu.Lock()
	d.taken = append(d.taken, req)
	f := d.onTake
	d.onTake = nil
	d.mu.Unlock()
	if f != nil {
		f()
	}
}

// completeTaken completes what the device took, so that a stopping
// server's wait for requests in flight ends.
func (d *silentBlk) completeTaken() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.taken {
		r.Complete(0)
	}
	d.taken = nil
}

// TestBenchBlkStalledBackend: a back-end that stops completing requests
// ends the bench with one line naming the stall, instead of a wait
// without end and without a word (found by a plugin author whose plugin's
// ring failed under krun-bench, helper-138).
func TestBenchBlkStalledBackend(t *testing.T) {
	defer func(d time.Duration) { blkStallTimeout = d }(blkStallTimeout)
	blkStallTimeout = 300 * time.Millisecond
	dev := &silentBlk{}
	srv, err := backend.NewServer(dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "blk.sock")
	backendtest.Serve(t, srv, sock)
	// Before the server's stop (cleanups run last first), which waits
	// for the requests in flight.
	t.Cleanup(dev.completeTaken)

	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.1", "--workloads", "randread-4k-qd1"}, &out, &errb)
	}()
	select {
	case code := <-done:
		msg := errb.String()
		if code != 1 || !strings.Contains(msg, "the back-end stopped answering: no request completed for 300ms") {
			t.Fatalf("exit %d, stderr %q; want 1 and the stall named", code, msg)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("krun-bench blk still waiting on a back-end that completes nothing after 20s")
	}
}

// TestBenchBlkBackendHangsUp: a back-end that closes its vhost-user socket
// with requests in flight (a crashed plugin, a failed ring that restarts
// it) ends the bench at once with one line, not after the stall
// watchdog's 30 s: the rings' waits notice the hang-up
// (testguest.Options.EndWaitsOnHangup).
func TestBenchBlkBackendHangsUp(t *testing.T) {
	if blkStallTimeout < 30*time.Second {
		t.Fatalf("stall timeout %v: this test needs the default, to tell the two apart", blkStallTimeout)
	}
	dev := &silentBlk{}
	srv, err := backend.NewServer(dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "blk.sock")
	ln := backendtest.Listen(t, sock)
	ctx, cancel := context.WithCancel(context.Background())
	dev.onTake = cancel // the server closes the connection on its stop
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		dev.completeTaken()
		select {
		case <-served:
		case <-time.After(10 * time.Second):
			t.Error("the back-end's Serve did not return")
		}
	})

	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- benchCommand([]string{"blk", "--socket", sock, "--seconds", "1", "--workloads", "randread-4k-qd1"}, &out, &errb)
	}()
	select {
	case code := <-done:
		msg := errb.String()
		if code != 1 || !strings.Contains(msg, "the vhost-user back-end closed its socket, with 1 requests in flight") {
			t.Fatalf("exit %d, stderr %q; want 1 and the hang-up named", code, msg)
		}
		if n := strings.Count(strings.TrimSpace(msg), "\n"); n != 0 {
			t.Errorf("stderr has %d lines, want one: %q", n+1, msg)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("krun-bench blk still waiting 10s after its back-end closed the connection")
	}
}
