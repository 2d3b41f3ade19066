package blk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// TestHugeIndirectTables sends the chains that used to take a disk plugin
// down: a 16 MiB indirect table whose 2^20 entries all loop back to the
// first, one of 2^20 entries in a line, and one that claims 2^28 entries.
// Each is refused as malformed (completed with nothing written, never seen
// by the device) without the back-end's heap growing, and the device keeps
// serving.
func TestHugeIndirectTables(t *testing.T) {
	for _, workers := range []int{1, blk.DefaultQueueWorkers} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			r := newRig(t, 1<<20, false, 1, workers)
			ring := r.guest.Rings[0]
			mem := r.guest.Mem
			const entries = 1 << 20
			table, err := mem.Alloc(16*entries, 4096)
			if err != nil {
				t.Fatal(err)
			}
			buf, _ := mem.Alloc(4096, 4096)
			hdr, _ := mem.Bytes(buf, 16)
			binary.LittleEndian.PutUint32(hdr, testguest.BlkTIn)
			tb, _ := mem.Bytes(table, 16*entries)
			layout := func(loop bool) {
				for i := 0; i < entries; i++ {
					d := tb[16*i:]
					next := uint16(i + 1)
					if loop {
						next = 0
					}
					binary.LittleEndian.PutUint64(d, buf)
					binary.LittleEndian.PutUint32(d[8:], 16)
					binary.LittleEndian.PutUint16(d[12:], 1) // NEXT
					binary.LittleEndian.PutUint16(d[14:], next)
				}
			}
			tables := []struct {
				name   string
				loop   bool
				length uint32
			}{
				{"16 MiB looping", true, 16 * entries},
				{"2^20 entries in a line", false, 16 * entries},
				{"2^28 entries", false, 1<<32 - 16},
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for _, tt := range tables {
				layout(tt.loop)
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				start := time.Now()
				const rounds = 20
				for i := 0; i < rounds; i++ {
					if _, err := ring.PostIndirect(table, tt.length, tt.name); err != nil {
						t.Fatal(err)
					}
					ring.KickAlways()
					done, err := ring.Wait(ctx)
					if err != nil {
						t.Fatalf("%s: %v", tt.name, err)
					}
					if len(done) != 1 || done[0].Len != 0 || done[0].Token != tt.name {
						t.Fatalf("%s: completions %+v, want one with nothing written", tt.name, done)
					}
				}
				elapsed := time.Since(start)
				runtime.ReadMemStats(&after)
				if grown := after.TotalAlloc - before.TotalAlloc; grown > 1<<20 {
					t.Errorf("%s: %d chains allocated %d bytes", tt.name, rounds, grown)
				}
				t.Logf("%s: %d chains refused in %v", tt.name, rounds, elapsed)
			}
			if s := r.dev.Stats(); s.Reads != 0 {
				t.Fatalf("the device saw %d of the malformed chains", s.Reads)
			}
			// Still serving.
			bk := r.blk(t, 0)
			want := fill(4096, 9)
			if err := bk.Write(ctx, 8, want); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4096)
			if err := bk.Read(ctx, 8, got); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read after the hostile chains: %v", err)
			}
		})
	}
}

// TestTruncatedGuestMemory truncates the guest-memory memfd under a running
// queue (a hostile front-end) and kicks: the queue fails with one log line,
// the plugin stays up and serves the next front-end.
func TestTruncatedGuestMemory(t *testing.T) {
	for _, workers := range []int{1, blk.DefaultQueueWorkers} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(path, fill(1<<20, 5), 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			d, err := raw.Open(f, raw.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			dev, err := blk.New(blk.Config{Disk: d, QueueWorkers: workers})
			if err != nil {
				t.Fatal(err)
			}
			logs := &syncbuf.Buffer{}
			srv, err := backend.NewServer(dev, hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info}))
			if err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(t.TempDir(), "blk.sock")
			backendtest.Serve(t, srv, sock)
			defer func() {
				if t.Failed() {
					t.Logf("plugin log:\n%s", logs.String())
				}
			}()

			g, err := testguest.Dial(sock, testguest.Options{Features: testguest.BlkFeatures})
			if err != nil {
				t.Fatal(err)
			}
			ring := g.Rings[0]
			buf, _ := g.Mem.Alloc(8192, 4096)
			for i := 0; i < 8; i++ {
				segs := []testguest.Segment{{Addr: buf, Len: 16}, {Addr: buf + 4096, Len: 4096, Writable: true}, {Addr: buf + 16, Len: 1, Writable: true}}
				if _, err := ring.Post(segs, i); err != nil {
					t.Fatal(err)
				}
			}
			// From here the test must not touch guest memory.
			if err := g.Mem.File().Truncate(0); err != nil {
				t.Fatal(err)
			}
			ring.KickAlways()
			backendtest.WaitFailed(t, srv, 0)
			g.Close()
			if n := strings.Count(logs.String(), "memory fault"); n != 1 {
				t.Fatalf("%d log lines about the fault, want 1", n)
			}

			// The next front-end is served.
			bk, err := testguest.DialBlk(sock, testguest.Options{Features: testguest.BlkFeatures})
			if err != nil {
				t.Fatal(err)
			}
			defer bk.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			got := make([]byte, 4096)
			if err := bk.Read(ctx, 8, got); err != nil || !bytes.Equal(got, fill(1<<20, 5)[4096:8192]) {
				t.Fatalf("read from the next front-end: %v", err)
			}
		})
	}
}
