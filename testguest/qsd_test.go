package testguest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/vhostuser"
)

// startQSD runs qemu-storage-daemon exporting img as vhost-user-blk on a
// unix socket and returns the socket path once it is listening.
func startQSD(t *testing.T, img string, extra ...string) string {
	t.Helper()
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (Debian package qemu-utils)")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "blk.sock")
	// QEMU option values escape commas by doubling them.
	esc := func(s string) string { return strings.ReplaceAll(s, ",", ",,") }
	export := "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=" + esc(sock) + ",writable=on"
	for _, e := range extra {
		export += "," + e
	}
	opt := daemontest.Options{Name: "qemu-storage-daemon", Socket: sock, Kill: true, Timeout: 10 * time.Second}
	return daemontest.Start(t, opt, qsd, "--blockdev", "driver=file,node-name=f,filename="+esc(img), "--export", export).Socket
}

// retryRefused retries dial while the socket exists but does not listen
// yet (the daemon binds before it listens).
func retryRefused[T any](dial func() (T, error)) (T, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := dial()
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			return v, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pattern returns a recognizable sector for index i.
func pattern(i int) []byte {
	p := bytes.Repeat([]byte(fmt.Sprintf("krun-core sector %08d|", i)), SectorSize/26+1)
	return p[:SectorSize]
}

func makeImage(t *testing.T, sectors int) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.raw")
	var data []byte
	for i := 0; i < sectors; i++ {
		data = append(data, pattern(i)...)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

func TestQemuStorageDaemonBlk(t *testing.T) {
	tests := []struct {
		name   string
		opt    Options
		export []string // extra export options
		queue  int      // ring to drive
	}{
		{"defaults", Options{}, nil, 0},
		{"no event idx no indirect", Options{NoEventIdx: true, NoIndirect: true}, nil, 0},
		{"add mem reg, 3 regions", Options{UseAddMemReg: true, Regions: 3}, nil, 0},
		{"no reply ack", Options{DropProtocolFeatures: vhostuser.ProtocolReplyAck}, nil, 0},
		{"small ring", Options{QueueSize: 4}, nil, 0},
		{"two queues, second one", Options{NumQueues: 2}, []string{"num-queues=2"}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const sectors = 2048
			img := makeImage(t, sectors)
			sock := startQSD(t, img, tt.export...)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			opt := tt.opt
			opt.Features |= BlkFeatures
			g, err := retryRefused(func() (*Guest, error) { return Dial(sock, opt) })
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			b, err := NewBlk(g, tt.queue)
			if err != nil {
				t.Fatal(err)
			}
			if want := uint16(max(1, opt.NumQueues)); g.Features()&BlkFMQ != 0 && b.Config.NumQueues != want {
				t.Errorf("config num_queues %d, want %d", b.Config.NumQueues, want)
			}
			if b.Config.Capacity != sectors {
				t.Errorf("capacity %d sectors, want %d", b.Config.Capacity, sectors)
			}
			got := make([]byte, SectorSize)
			if err := b.Read(ctx, 0, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pattern(0)) {
				t.Fatalf("sector 0 = %q, want %q", got[:40], pattern(0)[:40])
			}
			// Write sector 7 and read it back, plus a multi-sector read
			// spanning it.
			want := bytes.Repeat([]byte{0xa5, 0x5a}, SectorSize/2)
			if err := b.Write(ctx, 7, want); err != nil {
				t.Fatal(err)
			}
			if err := b.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			big := make([]byte, 4*SectorSize)
			if err := b.Read(ctx, 6, big); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(big[:SectorSize], pattern(6)) || !bytes.Equal(big[SectorSize:2*SectorSize], want) ||
				!bytes.Equal(big[2*SectorSize:3*SectorSize], pattern(8)) {
				t.Fatal("read back after write does not match")
			}
			// A batch deeper than a small ring.
			var reqs []*BlkRequest
			for i := 0; i < 40; i++ {
				reqs = append(reqs, &BlkRequest{Type: BlkTIn, Sector: uint64(100 + i), Data: make([]byte, SectorSize)})
			}
			if err := b.Do(ctx, reqs); err != nil {
				t.Fatal(err)
			}
			for i, r := range reqs {
				if r.Err != nil || !bytes.Equal(r.Data, pattern(100+i)) {
					t.Fatalf("batch request %d: err %v data %q", i, r.Err, r.Data[:30])
				}
			}
			// A read beyond the end fails with a status, not a hang.
			if err := b.Read(ctx, sectors, got); err == nil {
				t.Fatal("read beyond capacity succeeded")
			}
			// The image on disk has the write.
			disk, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(disk[7*SectorSize:8*SectorSize], want) {
				t.Fatal("write not in the image file")
			}
			if id, err := b.GetID(ctx); err != nil && !strings.Contains(err.Error(), "status") {
				t.Fatalf("get id: %q %v", id, err)
			}
			// Stopping the ring reports how many requests it took.
			base, err := g.StopQueue(tt.queue)
			if err != nil {
				t.Fatal(err)
			}
			if want := uint32(b.ring.AvailIdx()); base != want {
				t.Fatalf("GET_VRING_BASE = %d, want %d", base, want)
			}
		})
	}
}
