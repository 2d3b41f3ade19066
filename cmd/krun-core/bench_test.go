package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

func TestBenchUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 1, "usage"},
		{[]string{"net"}, 1, "unknown device kind"},
		{[]string{"blk"}, 2, "--socket is required"},
		{[]string{"blk", "--socket", "/x", "--seconds", "0"}, 2, "--seconds"},
		{[]string{"blk", "--socket", "/x", "--size", "12Q"}, 2, "--size"},
		{[]string{"blk", "--socket", "/x", "--workloads", "randread-4k-qd1,bogus"}, 2, "unknown workload"},
		{[]string{"blk", "--socket", "/x", "extra"}, 2, "unexpected argument"},
		{[]string{"blk", "--socket", filepath.Join(os.TempDir(), "krun-no-such-socket"), "--seconds", "0.1"}, 1, "connect"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		if code := benchCommand(tc.args, &out, &errb); code != tc.code {
			t.Errorf("bench %q: exit %d, want %d (%s)", tc.args, code, tc.code, errb.String())
		}
		if !strings.Contains(errb.String(), tc.msg) {
			t.Errorf("bench %q: stderr %q lacks %q", tc.args, errb.String(), tc.msg)
		}
	}
}

// TestBenchBlk runs every workload briefly against an in-process virtio-blk
// back-end on a listening socket, the way `krun-core serve` offers one.
func TestBenchBlk(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(f, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	dev, err := blk.New(blk.Config{Disk: d})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	lf, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- backend.Serve(ctx, lf, dev, nil) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()

	var out, errb bytes.Buffer
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.2", "--size", "16M", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench exit %d: %s", code, errb.String())
	}
	var results []blkResult
	if err := json.Unmarshal(out.Bytes(), &results); err != nil {
		t.Fatalf("bad JSON %q: %v", out.String(), err)
	}
	if len(results) != len(blkWorkloads) {
		t.Fatalf("%d results, want %d", len(results), len(blkWorkloads))
	}
	for i, r := range results {
		if r.Workload != blkWorkloads[i].Name || r.Requests == 0 || r.IOPS <= 0 || r.P50us <= 0 || r.P99us < r.P50us {
			t.Errorf("implausible result %+v", r)
		}
	}
	st := dev.Stats()
	if st.Reads == 0 || st.Writes == 0 || st.IOErrors+st.OutOfRange != 0 {
		t.Fatalf("device stats %+v", st)
	}
	// All traffic stayed inside --size.
	fi, _ := os.Stat(img)
	if fi.Size() != 64<<20 {
		t.Fatalf("image size changed to %d", fi.Size())
	}
	buf := make([]byte, 1<<20)
	if _, err := d.ReadAt(buf, 32<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, make([]byte, len(buf))) {
		t.Fatal("bench wrote beyond --size")
	}

	// Read-only: only the read workloads run.
	out.Reset()
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.1", "--read-only", "--workloads", "randread-4k-qd1,randwrite-4k-qd1"}, &out, &errb); code != 0 {
		t.Fatalf("bench exit %d: %s", code, errb.String())
	}
	if !strings.Contains(out.String(), "randread-4k-qd1") || strings.Contains(out.String(), "randwrite") {
		t.Fatalf("read-only table:\n%s", out.String())
	}
}
