package main

import (
	"context"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
)

func socketEnd(t *testing.T) *os.File {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "peer")
	t.Cleanup(func() { peer.Close() })
	return os.NewFile(uintptr(fds[0]), "passt")
}

func TestConfigure(t *testing.T) {
	tests := []struct {
		name    string
		opts    map[string]string
		noFile  bool
		wantErr string
	}{
		{name: "ok", opts: map[string]string{"mac": "52:54:00:12:34:56"}},
		{name: "ok with mtu", opts: map[string]string{"mac": "52:54:00:12:34:56", "mtu": "1500"}},
		{name: "bad mac", opts: map[string]string{"mac": "zz"}, wantErr: "48-bit MAC"},
		{name: "multicast mac", opts: map[string]string{"mac": "01:00:5e:00:00:01"}, wantErr: "not a unicast"},
		{name: "broadcast mac", opts: map[string]string{"mac": "ff:ff:ff:ff:ff:ff"}, wantErr: "not a unicast"},
		{name: "all-zero mac", opts: map[string]string{"mac": "00:00:00:00:00:00"}, wantErr: "not a unicast"},
		{name: "no mac", opts: map[string]string{}, wantErr: "48-bit MAC"},
		{name: "mtu too small", opts: map[string]string{"mac": "52:54:00:12:34:56", "mtu": "67"}, wantErr: "68..65521"},
		{name: "mtu over passt's frame limit", opts: map[string]string{"mac": "52:54:00:12:34:56", "mtu": "65522"}, wantErr: "68..65521"},
		{name: "mtu not a number", opts: map[string]string{"mac": "52:54:00:12:34:56", "mtu": "big"}, wantErr: "68..65521"},
		{name: "unknown option", opts: map[string]string{"mac": "52:54:00:12:34:56", "vhost": "on"}, wantErr: "vhost"},
		{name: "no passt socket", opts: map[string]string{"mac": "52:54:00:12:34:56"}, noFile: true, wantErr: "socket was passed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := map[string]*os.File{}
			if !tt.noFile {
				files[devopts.FilePasst] = socketEnd(t)
			}
			dev, err := plugin{}.Configure(context.Background(), tt.opts, files, nil)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Configure = %v, want error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if info := dev.Info(); info.Type != 1 || info.NumQueues != 2 {
				t.Fatalf("Info = %+v", info)
			}
			dev.(interface{ Close() error }).Close()
		})
	}
}
