package main

import (
	"context"
	"os"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/fs"
)

func TestConfigure(t *testing.T) {
	tests := []struct {
		name    string
		opts    map[string]string
		files   func(d *os.File) map[string]*os.File
		wantErr string
	}{
		{name: "defaults", opts: map[string]string{"tag": "root"}},
		{name: "everything", opts: map[string]string{"tag": "t", "readonly": "on", "uidmap": "0:1000:1", "gidmap": "0:1000:1/1:100000:65536", "cache": "0", "xattr": "off", "workers": "1"}},
		{name: "no tag", opts: map[string]string{}, wantErr: "tag= is required"},
		{name: "long tag", opts: map[string]string{"tag": strings.Repeat("t", 37)}, wantErr: "1 to 36 bytes"},
		{name: "unknown option", opts: map[string]string{"tag": "t", "dax": "on"}, wantErr: "unknown option"},
		{name: "bad readonly", opts: map[string]string{"tag": "t", "readonly": "yes"}, wantErr: "want on or off"},
		{name: "bad uidmap", opts: map[string]string{"tag": "t", "uidmap": "0:1000"}, wantErr: "GUEST:HOST:COUNT"},
		{name: "overlapping gidmap", opts: map[string]string{"tag": "t", "gidmap": "0:10:5/2:100:1"}, wantErr: "overlap"},
		{name: "bad cache", opts: map[string]string{"tag": "t", "cache": "-1"}, wantErr: "seconds"},
		{name: "bad workers", opts: map[string]string{"tag": "t", "workers": "0"}, wantErr: "1..256"},
		{name: "no dir", opts: map[string]string{"tag": "t"}, files: func(*os.File) map[string]*os.File { return nil }, wantErr: `no "dir"`},
		{name: "extra file", opts: map[string]string{"tag": "t"}, files: func(d *os.File) map[string]*os.File {
			return map[string]*os.File{"dir": d, "image": d}
		}, wantErr: "unexpected file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := os.Open(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			files := map[string]*os.File{"dir": d}
			if tc.files != nil {
				files = tc.files(d)
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
			fd := dev.(*fs.Device)
			defer fd.Close()
			cfg := make([]byte, fs.ConfigSize)
			if err := fd.ReadConfig(0, cfg); err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimRight(string(cfg[:fs.TagSize]), "\x00"); got != tc.opts["tag"] {
				t.Fatalf("tag %q", got)
			}
		})
	}
}

func TestPolicy(t *testing.T) {
	p := plugin{}.Policy(map[string]int{"dir": 4})
	if p.Syscalls != "fs" || len(p.ReadWriteDirFDs) != 1 || p.ReadWriteDirFDs[0] != 4 {
		t.Fatalf("policy %+v", p)
	}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (plugin{}).Policy(nil).Validate(); err != nil {
		t.Fatalf("policy before Configure: %v", err)
	}
}
