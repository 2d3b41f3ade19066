package backend_test

// Front-ends that stall the back-end or use more than it can hold (from a
// review of the back-end's handling of front-end messages).

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestHandshakeDeadlineCoversUnreadReplies: docs/ARCHITECTURE.md and
// Server.HandshakeTimeout promise that an accepted front-end that does not
// send SET_OWNER within HandshakeTimeout is dropped, "so one that connects
// and stalls cannot keep the next waiting". The deadline covers writes
// too: a front-end that sends requests with replies (GET_FEATURES) and
// never reads them had held the back-end in Conn.Send for good.
func TestHandshakeDeadlineCoversUnreadReplies(t *testing.T) {
	const timeout = 200 * time.Millisecond
	tests := []struct {
		name string
		req  vhostuser.Request
	}{
		{"GET_FEATURES never read", vhostuser.GetFeatures},
		{"GET_PROTOCOL_FEATURES never read", vhostuser.GetProtocolFeatures},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev := newTestDevice(1)
			logs := &syncbuf.Buffer{}
			srv, err := backend.NewServer(dev, newLogger(logs))
			if err != nil {
				t.Fatal(err)
			}
			srv.HandshakeTimeout, srv.MessageTimeout = timeout, timeout
			sock := filepath.Join(t.TempDir(), "be.sock")
			backendtest.Serve(t, srv, sock)

			first, err := vhostuser.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer first.Close() // unblocks the back-end at the end
			go func() {
				first.UnixConn().SetWriteDeadline(time.Now().Add(5 * time.Second))
				for i := 0; i < 100000; i++ {
					if first.Send(tt.req, vhostuser.Version, nil, nil) != nil {
						return
					}
				}
			}()
			time.Sleep(4 * timeout) // well past the handshake deadline

			second, err := frontend.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer second.Close()
			got := make(chan error, 1)
			go func() {
				_, err := second.GetFeatures()
				got <- err
			}()
			select {
			case err := <-got:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(15 * timeout):
				t.Fatalf("a front-end that never sent SET_OWNER (and never read its replies) still holds the back-end %v after connecting; HandshakeTimeout is %v", 19*timeout, timeout)
			}
		})
	}
}

// ccDevice is a test device whose config space changes on its own.
type ccDevice struct {
	*testDevice
	ch chan struct{}
}

func (d *ccDevice) ConfigChanges() <-chan struct{} { return d.ch }

// TestConfigChangeSendDoesNotBlockDisconnect: the goroutine that forwards
// config changes on the back-end request channel (SET_BACKEND_REQ_FD) may
// block in Send on a front-end that does not read that channel. When the
// front-end disconnects, the session closes the channel before waiting for
// that goroutine; before, session.close waited first, so Serve never
// returned (not even after its context was cancelled) and a listening
// back-end never accepted another front-end.
func TestConfigChangeSendDoesNotBlockDisconnect(t *testing.T) {
	dev, c, done := ccBackend(t)
	defer c.Close()

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours := os.NewFile(uintptr(fds[0]), "ours")
	theirs := os.NewFile(uintptr(fds[1]), "theirs")
	if err := c.SetBackendReqFD(theirs); err != nil {
		t.Fatal(err)
	}
	// Fill the channel through our copy of the back-end's end: the
	// back-end's next message on it cannot be queued.
	fillSocket(t, fds[1])
	dev.ch <- struct{}{}               // the device's config changes
	time.Sleep(200 * time.Millisecond) // the back-end is now in Send

	c.Close() // the front-end goes away
	select {
	case <-done:
		ours.Close()
		theirs.Close()
	case <-time.After(3 * time.Second):
		// Unblock the stuck Send so the goroutines end.
		ours.Close()
		theirs.Close()
		<-done
		t.Fatal("Serve did not return within 3 s of the front-end's disconnect: session.close waits for the config-change sender, blocked on a full back-end request channel")
	}
}

// TestMemSlotsWithinOpenFileLimit: each memory slot keeps a descriptor
// open, and the sandbox runs plugins with RLIMIT_NOFILE
// sandbox.DefaultOpenFiles. GET_MAX_MEM_SLOTS offers what that limit
// allows (before, 509: the kernel then dropped the descriptor of about the
// 240th ADD_MEM_REG and the session was closed); every slot offered can be
// added, and one more is refused with REPLY_ACK on a session that goes on.
func TestMemSlotsWithinOpenFileLimit(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	c := h.client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}

	// The plugin's limit, as the sandbox sets it (soft = hard there; only
	// the soft limit is lowered here, and restored before the harness
	// ends the session).
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = sandbox.DefaultOpenFiles
	if lim.Cur > old.Max {
		t.Skipf("hard RLIMIT_NOFILE %d is below the sandbox's %d", old.Max, lim.Cur)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_NOFILE, &old) })

	max, err := c.GetMaxMemSlots()
	if err != nil {
		t.Fatal(err)
	}
	if max >= lim.Cur || max < vhostuser.MaxMemTableRegions {
		t.Fatalf("GET_MAX_MEM_SLOTS = %d with RLIMIT_NOFILE %d", max, lim.Cur)
	}
	const page = 4096
	n := max + 1
	mem, err := guestmem.NewMemfd("slots", n*page)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	region := func(i uint64) frontend.MemRegion {
		return frontend.MemRegion{
			MemRegion: vhostuser.MemRegion{GuestAddr: i * page, Size: page, UserAddr: 0x10000000 + i*page, MmapOffset: i * page},
			File:      mem,
		}
	}
	for i := uint64(0); i < max; i++ {
		if err := c.AddMemReg(region(i)); err != nil {
			t.Fatalf("ADD_MEM_REG %d of the %d offered (RLIMIT_NOFILE %d): %v", i+1, max, lim.Cur, err)
		}
	}
	if err := c.AddMemReg(region(max)); err == nil {
		t.Fatalf("ADD_MEM_REG beyond the %d slots offered accepted", max)
	}
	if _, err := c.GetFeatures(); err != nil {
		t.Fatalf("session closed after a refused ADD_MEM_REG: %v", err)
	}
	if !strings.Contains(h.logs.String(), "all "+strconv.FormatUint(max, 10)+" slots in use") {
		t.Errorf("refusal not logged:\n%s", h.logs.String())
	}
}

// ccBackend serves a device that reports config changes on a socket pair
// and returns it with a front-end that negotiated BACKEND_REQ and owns the
// back-end, and the channel Serve's result arrives on.
func ccBackend(t *testing.T) (*ccDevice, *frontend.Client, <-chan error) {
	t.Helper()
	dev := &ccDevice{testDevice: newTestDevice(1), ch: make(chan struct{}, 1)}
	srv, err := backend.NewServer(dev, newLogger(&syncbuf.Buffer{}))
	if err != nil {
		t.Fatal(err)
	}
	fa, fb, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fa.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, fa) }()
	c, err := frontend.NewFromFile(fb)
	fb.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetProtocolFeatures(vhostuser.ProtocolBackendReq | vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	return dev, c, done
}

// fillSocket writes into the socket fd until its peer's buffer is full.
func fillSocket(t *testing.T, fd int) {
	t.Helper()
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for {
		if _, err := unix.Write(fd, buf); err != nil {
			return // EAGAIN: full
		}
	}
}
