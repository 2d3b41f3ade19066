package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestFileSizeLimit: under the file size limit its sandbox sets
// (RLIMIT_FSIZE, devspec.Opened.FileBytes), a write that would grow the
// image past it fails: the guest gets VIRTIO_BLK_S_IOERR, a line is
// logged, the plugin lives on (the Go runtime ignores SIGXFSZ) and keeps
// serving reads. (The failed write was a durable one, the pool's
// extension: like a failed sync, it makes the image refuse further writes
// until it is opened again, by a restarted plugin.)
func TestFileSizeLimit(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "8M")
	f := open(t, p, true)
	log := &syncbuf.Buffer{}
	dev, err := plugin{}.Configure(context.Background(), map[string]string{"path": p}, map[string]*os.File{"image": f},
		hclog.New(&hclog.LoggerOptions{Output: log}))
	if err != nil {
		t.Fatal(err)
	}
	b := dev.(*blk.Device)
	defer b.Close()
	h := b.NewHandler()
	req := func(typ uint32, sector uint64, data []byte) byte {
		t.Helper()
		hdr := make([]byte, blk.HeaderSize)
		binary.LittleEndian.PutUint32(hdr, typ)
		binary.LittleEndian.PutUint64(hdr[8:], sector)
		status := []byte{0xff}
		var err error
		if typ == blk.TypeIn {
			_, err = h.Handle([][]byte{hdr}, [][]byte{data, status})
		} else {
			_, err = h.Handle([][]byte{append(hdr, data...)}, [][]byte{status})
		}
		if err != nil {
			t.Fatal(err)
		}
		return status[0]
	}
	cluster := bytes.Repeat([]byte{0xab}, 4096)
	if s := req(blk.TypeOut, 0, cluster); s != blk.StatusOK {
		t.Fatalf("first write: status %d", s)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	// The limit: what the file holds now and a little more, well short
	// of the 2048 clusters the disk has. The test process stands for
	// the plugin (soft limit only: the hard one stays for the others).
	limit := uint64(st.Size()) + 64<<10
	var old unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_FSIZE, nil, &old); err != nil {
		t.Fatal(err)
	}
	if err := unix.Prlimit(0, unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: limit, Max: old.Max}, nil); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			unix.Prlimit(0, unix.RLIMIT_FSIZE, &old, nil)
		}
	}
	defer restore()
	failed := -1
	for i := 1; i < 2048; i++ {
		if s := req(blk.TypeOut, uint64(i)*8, cluster); s != blk.StatusOK {
			if s != blk.StatusIOErr {
				t.Fatalf("write %d past the limit: status %d, want VIRTIO_BLK_S_IOERR", i, s)
			}
			failed = i
			break
		}
	}
	if failed < 0 {
		t.Fatalf("the image grew past its limit of %d bytes", limit)
	}
	got := make([]byte, 4096)
	if s := req(blk.TypeIn, uint64(failed-1)*8, got); s != blk.StatusOK || got[0] != 0xab {
		t.Errorf("read after the failure: status %d, byte %#x", s, got[0])
	}
	st, _ = f.Stat()
	restore()
	if uint64(st.Size()) > limit {
		t.Errorf("image file of %d bytes, past its limit of %d", st.Size(), limit)
	}
	if !strings.Contains(log.String(), "disk write failed") || !strings.Contains(log.String(), "file too large") {
		t.Errorf("no log line for the failed write:\n%s", log.String())
	}
}
