package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestRetriedWriteAfterFailedL2WriteSurvivesKill: an allocating qcow2 write
// whose L2 entry write fails (one pwrite64 returns EIO; the data write
// before it succeeded) completes with IOERR, but the new entry stays in
// the plugin's L2 cache. The guest retries the same write: the cluster now
// looks allocated, so the write goes in place, writes no metadata and is
// acknowledged OK. Nothing puts the entry on the file until a later flush
// or allocating write; a plugin killed before that (serve restarts it, the
// guest reconnects) reads the L2 entry from the file, where the cluster is
// unallocated: the acknowledged retry reads back as zeroes.
//
// From review, helper-101; fixed: after a failed metadata write the image
// takes the exclusive path for every write, whose persist writes each
// dirty table first (disk/qcow2 TestRetriedWriteAfterFailedL2Write).
//
// The failing pwrite64 is injected with strace (inject=pwrite64:error=EIO:
// when=2: the request's second pwrite64 on its thread, the L2 sector after
// the data); an attempt where the two writes ran on different threads (no
// injection, or the data write hit) moves on to the next cluster.
func TestRetriedWriteAfterFailedL2WriteSurvivesKill(t *testing.T) {
	needTools(t, "qemu-img", "strace")
	bin := buildServeBinaries(t, "blk-qcow2")
	si := serveImage(t, bin, "qcow2", ",queues=1")
	b := si.blk
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The first write makes the L2 table; the later ones only change
	// entries in it (one 512-byte sector write after the data).
	if err := b.Write(ctx, 0, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xc3}, 4096)
	sector := uint64(0)
	for attempt := 1; ; attempt++ {
		if attempt > 20 {
			t.Fatal("the injection never hit the L2 sector write")
		}
		sector = uint64(attempt) * (65536 / 512)
		trace := filepath.Join(si.dir, "trace"+strconv.Itoa(attempt))
		detach := injectFaults(t, si.pid, "-o", trace, "-e", "trace=pwrite64", "-e", "inject=pwrite64:error=EIO:when=2")
		werr := b.Write(ctx, sector, data)
		detach()
		tr, _ := os.ReadFile(trace)
		hitL2 := false
		for _, l := range strings.Split(string(tr), "\n") {
			if strings.Contains(l, "INJECTED") && strings.Contains(l, ", 512, ") {
				hitL2 = true
			}
		}
		if hitL2 && werr != nil {
			t.Logf("attempt %d: the L2 sector write failed, the request got %v", attempt, werr)
			break
		}
		t.Logf("attempt %d: not the L2 write (request error %v)\n%s", attempt, werr, tr)
	}
	// The guest retries the write that failed: acknowledged OK.
	if err := b.Write(ctx, sector, data); err != nil {
		t.Fatalf("retried write: %v", err)
	}
	got := make([]byte, 4096)
	if err := b.Read(ctx, sector, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back before the kill: %v, equal %v", err, bytes.Equal(got, data))
	}
	// The plugin dies; serve restarts it; the guest reconnects.
	killPlugin(t, si.serve, si.pid, 1)
	c, err := frontend.Dial(si.sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Guest().Reconnect(c); err != nil {
		t.Fatal(err)
	}
	if err := b.Read(ctx, sector, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("after the plugin was killed and restarted, the acknowledged write at sector %d reads %#x... (want %#x...): its L2 entry, set in the killed plugin's cache when the first try's L2 write failed, never reached the file", sector, got[:4], data[:4])
	}
}
