package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/devopts"
)

func image(t *testing.T, ro bool) *os.File {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	mode := os.O_RDWR
	if ro {
		mode = os.O_RDONLY
	}
	f, err := os.OpenFile(p, mode, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestConfigure(t *testing.T) {
	tests := []struct {
		name    string
		opts    map[string]string
		ro      bool
		files   func(f *os.File) map[string]*os.File
		wantErr string
		queues  int
	}{
		{name: "defaults", opts: map[string]string{"format": "raw"}, queues: defaultQueues},
		{name: "read-only", opts: map[string]string{"format": "raw", "readonly": "on"}, ro: true, queues: defaultQueues},
		{name: "queues and path", opts: map[string]string{"queues": "2", "path": "/images/a.raw"}, queues: 2},
		{name: "qcow2 format", opts: map[string]string{"format": "qcow2"}, wantErr: "raw images only"},
		{name: "unknown option", opts: map[string]string{"cache": "none"}, wantErr: "unknown option"},
		{name: "bad readonly", opts: map[string]string{"readonly": "yes"}, wantErr: "want on or off"},
		{name: "zero queues", opts: map[string]string{"queues": "0"}, wantErr: "want 1..64"},
		{name: "many queues", opts: map[string]string{"queues": "65"}, wantErr: "want 1..64"},
		{name: "no image", opts: nil, files: func(*os.File) map[string]*os.File { return nil }, wantErr: `no "image"`},
		{name: "backing file", opts: nil, files: func(f *os.File) map[string]*os.File {
			return map[string]*os.File{"image": f, "backing.0": f}
		}, wantErr: "unexpected files"},
		{name: "read-only fd without readonly=on", opts: nil, ro: true, wantErr: "read-only"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := image(t, tc.ro)
			files := map[string]*os.File{"image": f}
			if tc.files != nil {
				files = tc.files(f)
			}
			dev, err := plugin{}.Configure(context.Background(), tc.opts, files, hclog.NewNullLogger())
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
			info := b.Info()
			if info.NumQueues != tc.queues || b.Capacity() != 2048 {
				t.Fatalf("info %+v capacity %d", info, b.Capacity())
			}
			if ro := info.Features&(1<<blk.FeatureRO) != 0; ro != (tc.opts["readonly"] == "on") {
				t.Fatalf("RO feature %v", ro)
			}
			if err := b.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
		})
	}
}

func TestPolicy(t *testing.T) {
	p := plugin{}.Policy(nil)
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(p.ReadWriteDirFDs)+len(p.ReadOnlyDirFDs) != 0 {
		t.Fatal("a raw disk plugin needs no directory access")
	}
}

// TestQueueLimitsAgree: the host checks queues= against devopts's limit,
// the device against its own: they are the same number.
func TestQueueLimitsAgree(t *testing.T) {
	if devopts.MaxDiskQueues != blk.MaxQueues {
		t.Fatalf("devopts.MaxDiskQueues %d, blk.MaxQueues %d", devopts.MaxDiskQueues, blk.MaxQueues)
	}
}
