package net

import (
	"bytes"
	"encoding/binary"
	"io"
	stdnet "net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// TestTruncatedGuestMemory: a front-end posts receive buffers and a frame
// to send, truncates the guest-memory memfd under both rings, and kicks
// them while passt has a frame for the guest. Both rings fail; the plugin
// logs one line and serves the next front-end.
func TestTruncatedGuestMemory(t *testing.T) {
	pfds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Non-blocking, so the test's end honours read deadlines.
	if err := unix.SetNonblock(pfds[1], true); err != nil {
		t.Fatal(err)
	}
	passt := os.NewFile(uintptr(pfds[1]), "passt")
	t.Cleanup(func() { passt.Close() })
	dev, err := New(Config{MAC: stdnet.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, MTU: 1500, Conn: os.NewFile(uintptr(pfds[0]), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	logs := &syncbuf.Buffer{}
	srv, err := backend.NewServer(dev, hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // after the server's stop
		if t.Failed() {
			t.Logf("plugin log:\n%s", logs.String())
		}
	})
	sock := filepath.Join(t.TempDir(), "net.sock")
	backendtest.Serve(t, srv, sock)

	opt := testguest.Options{NumQueues: 2, Features: testguest.NetFeatures, NoIndirect: true}
	g, err := testguest.Dial(sock, opt)
	if err != nil {
		t.Fatal(err)
	}
	rx, tx := g.Rings[0], g.Rings[1]
	buf, _ := g.Mem.Alloc(8192, 4096)
	for i := 0; i < 4; i++ {
		if _, err := rx.Post([]testguest.Segment{{Addr: buf, Len: 2048, Writable: true}}, i); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tx.Post([]testguest.Segment{{Addr: buf + 4096, Len: 12}, {Addr: buf + 4096, Len: 60}}, "tx"); err != nil {
		t.Fatal(err)
	}
	// From here the test must not touch guest memory.
	if err := g.Mem.File().Truncate(0); err != nil {
		t.Fatal(err)
	}
	fr := frame(100, 7)
	b := make([]byte, 4+len(fr))
	binary.BigEndian.PutUint32(b, uint32(len(fr)))
	copy(b[4:], fr)
	if _, err := passt.Write(b); err != nil {
		t.Fatal(err)
	}
	rx.KickAlways()
	tx.KickAlways()
	backendtest.WaitFailed(t, srv, 0, 1)
	g.Close()
	if n := strings.Count(logs.String(), "memory fault"); n != 1 {
		t.Fatalf("%d log lines about the fault, want 1", n)
	}

	// The next front-end is served: a frame goes out to passt.
	n, err := testguest.DialNet(sock, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	out := frame(200, 9)
	if err := n.WriteFrame(out); err != nil {
		t.Fatal(err)
	}
	if err := n.Flush(); err != nil {
		t.Fatal(err)
	}
	passt.SetReadDeadline(time.Now().Add(5 * time.Second))
	var l [4]byte
	if _, err := io.ReadFull(passt, l[:]); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, binary.BigEndian.Uint32(l[:]))
	if _, err := io.ReadFull(passt, got); err != nil || !bytes.Equal(got, out) {
		t.Fatalf("passt got %d bytes (%v), not the frame sent", len(got), err)
	}
}
