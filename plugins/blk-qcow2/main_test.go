package main

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed (needed to create test images)")
	}
	if out, err := exec.Command(p, args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func open(t *testing.T, p string, rw bool) *os.File {
	t.Helper()
	mode := os.O_RDONLY
	if rw {
		mode = os.O_RDWR
	}
	f, err := os.OpenFile(p, mode, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestConfigure(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", plain, "8M")
	bk := filepath.Join(dir, "bk.raw")
	if err := os.WriteFile(bk, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	over := filepath.Join(dir, "over.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", bk, "-F", "raw", over, "8M")

	type files = map[string]*os.File
	tests := []struct {
		name    string
		opts    map[string]string
		files   func() files
		wantErr string
		align   uint32
		ro      bool
	}{
		{name: "plain", opts: map[string]string{"format": "qcow2", "path": plain},
			files: func() files { return files{"image": open(t, plain, true)} }, align: 8},
		{name: "plain without path", opts: nil,
			files: func() files { return files{"image": open(t, plain, true)} }, align: 8},
		{name: "read-only", opts: map[string]string{"readonly": "on"},
			files: func() files { return files{"image": open(t, plain, false)} }, align: 8, ro: true},
		{name: "raw backing", opts: map[string]string{"path": over, "backing.0.format": "raw", "backing.0.path": bk},
			files: func() files { return files{"image": open(t, over, true), "backing.0": open(t, bk, false)} }, align: 128},
		{name: "backing path mismatch", opts: map[string]string{"path": over, "backing.0.format": "raw", "backing.0.path": plain},
			files:   func() files { return files{"image": open(t, over, true), "backing.0": open(t, bk, false)} },
			wantErr: "declared backing"},
		{name: "undeclared backing", opts: map[string]string{"path": over},
			files:   func() files { return files{"image": open(t, over, true)} },
			wantErr: "not declared"},
		{name: "backing on an image without one", opts: map[string]string{"backing.0.format": "raw", "backing.0.path": bk},
			files:   func() files { return files{"image": open(t, plain, true), "backing.0": open(t, bk, false)} },
			wantErr: "no backing file"},
		{name: "backing without its path", opts: map[string]string{"path": over, "backing.0.format": "raw"},
			files:   func() files { return files{"image": open(t, over, true), "backing.0": open(t, bk, false)} },
			wantErr: "without option backing.0.path"},
		{name: "backing without format", opts: map[string]string{"path": over},
			files:   func() files { return files{"image": open(t, over, true), "backing.0": open(t, bk, false)} },
			wantErr: "format= is required"},
		{name: "format without backing", opts: map[string]string{"backing.0.format": "raw"},
			files:   func() files { return files{"image": open(t, plain, true)} },
			wantErr: "without its file"},
		{name: "relative path", opts: map[string]string{"path": "plain.qcow2"},
			files:   func() files { return files{"image": open(t, plain, true)} },
			wantErr: "absolute path"},
		{name: "max-size below virtual size", opts: map[string]string{"max-size": "4096"},
			files:   func() files { return files{"image": open(t, plain, true)} },
			wantErr: "exceeds the limit"},
		{name: "raw format", opts: map[string]string{"format": "raw"},
			files:   func() files { return files{"image": open(t, plain, true)} },
			wantErr: "qcow2 images only"},
		{name: "unknown option", opts: map[string]string{"backing.20.format": "raw"},
			files:   func() files { return files{"image": open(t, plain, true)} },
			wantErr: "unknown option"},
		{name: "unknown file", opts: nil,
			files:   func() files { return files{"image": open(t, plain, true), "extra": open(t, bk, false)} },
			wantErr: "unexpected files"},
		{name: "raw bytes as qcow2", opts: nil,
			files:   func() files { return files{"image": open(t, bk, true)} },
			wantErr: "image"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := plugin{}.Configure(context.Background(), tc.opts, tc.files(), hclog.NewNullLogger())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b := dev.(*blk.Device)
			defer b.Close()
			cfg := make([]byte, blk.ConfigSize)
			if err := b.ReadConfig(0, cfg); err != nil {
				t.Fatal(err)
			}
			if b.Capacity() != 8<<20/512 {
				t.Fatalf("capacity %d", b.Capacity())
			}
			ro := b.Info().Features&(1<<blk.FeatureRO) != 0
			if ro != tc.ro {
				t.Fatalf("RO feature %v, want %v", ro, tc.ro)
			}
			if !tc.ro {
				if got := uint32(cfg[44]) | uint32(cfg[45])<<8; got != tc.align {
					t.Fatalf("discard_sector_alignment %d, want %d", got, tc.align)
				}
				// A range is at most maxRangeClusters clusters: 4 KiB
				// clusters (align 8) 256 MiB, 64 KiB ones the default.
				want := uint32(maxRangeClusters) * tc.align
				if tc.align*blk.SectorSize >= 32<<10 {
					want = blk.DefaultMaxSectors
				}
				for _, off := range []int{36, 48} { // max_discard_sectors, max_write_zeroes_sectors
					if got := binary.LittleEndian.Uint32(cfg[off:]); got != want {
						t.Errorf("config field at %d: %d sectors a range, want %d", off, got, want)
					}
				}
			}
		})
	}
}

func TestRangeSectors(t *testing.T) {
	for _, c := range []struct {
		cluster int64
		want    uint32
	}{
		{512, 1 << 16},
		{4096, 1 << 19},
		{16 << 10, 1 << 21},
		{32 << 10, blk.DefaultMaxSectors}, // 2 GiB would pass the default by 8 sectors
		{64 << 10, blk.DefaultMaxSectors},
		{2 << 20, blk.DefaultMaxSectors},
		{0, blk.DefaultMaxSectors},
	} {
		if got := rangeSectors(c.cluster); got != c.want {
			t.Errorf("rangeSectors(%d) = %d, want %d", c.cluster, got, c.want)
		}
	}
}
