package net

import (
	"bytes"
	"context"
	"encoding/binary"
	stdnet "net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestLinkDownReachesFrontEnd: over vhost-user, the config space reads the
// MAC and link up; when passt goes away the status reads down and the
// front-end gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on its back-end
// request channel.
func TestLinkDownReachesFrontEnd(t *testing.T) {
	pfds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(pfds[1]), "passt")
	mac := stdnet.HardwareAddr{0x52, 0x54, 0, 0xab, 0xcd, 0xef}
	dev, err := New(Config{MAC: mac, Conn: os.NewFile(uintptr(pfds[0]), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	devEnd, drvEnd, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- backend.Serve(ctx, devEnd, dev, nil) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	fc, err := frontend.NewFromFile(drvEnd)
	drvEnd.Close()
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Start(fc, testguest.Options{NumQueues: 2, Features: testguest.NetFeatures, NoIndirect: true})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Negotiated.ProtocolFeatures&vhostuser.ProtocolBackendReq == 0 {
		t.Fatalf("BACKEND_REQ not negotiated (protocol features %#x)", g.Negotiated.ProtocolFeatures)
	}
	changes := make(chan struct{}, 4)
	stop, err := fc.BackendRequests(func() { changes <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	status := func() uint16 {
		cfg, err := fc.GetConfig(0, configLen)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(cfg[0:6], mac) {
			t.Fatalf("config MAC %x, want %s", cfg[0:6], mac)
		}
		return binary.LittleEndian.Uint16(cfg[6:])
	}
	if s := status(); s != StatusLinkUp {
		t.Fatalf("status %d with passt connected, want link up", s)
	}
	select {
	case <-changes:
		t.Fatal("config change reported while the link is up")
	case <-time.After(50 * time.Millisecond):
	}
	passt.Close()
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("no config change message after passt went away")
	}
	if s := status(); s != 0 {
		t.Fatalf("status %d after passt went away, want link down", s)
	}
}
