package backend_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

func hdr(req vhostuser.Request, flags, size uint32) []byte {
	b := make([]byte, vhostuser.HeaderSize)
	vhostuser.Header{Request: req, Flags: flags, Size: size}.Encode(b)
	return b
}

// rawMsg sends bytes and descriptors on the harness connection, bypassing
// all client-side checks.
func rawMsg(t *testing.T, h *harness, b []byte, files ...*os.File) {
	t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := h.client.Conn().UnixConn().WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func msg(req vhostuser.Request, flags uint32, payload []byte) []byte {
	return append(hdr(req, flags, uint32(len(payload))), payload...)
}

func TestHostileMessages(t *testing.T) {
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	memFile := mem.File()
	region := func(g, size, u, off uint64) vhostuser.MemRegion {
		return vhostuser.MemRegion{GuestAddr: g, Size: size, UserAddr: u, MmapOffset: off}
	}
	table := func(rs ...vhostuser.MemRegion) []byte { return vhostuser.EncodeMemTable(rs) }
	nfiles := func(n int) []*os.File {
		fs := make([]*os.File, n)
		for i := range fs {
			fs[i] = memFile
		}
		return fs
	}
	const V = vhostuser.Version
	tests := []struct {
		name    string
		owner   bool // send SET_OWNER first
		data    []byte
		files   []*os.File
		wantLog string
	}{
		{"unknown request", true, msg(200, V, nil), nil, "unknown request"},
		{"unsupported request", true, msg(vhostuser.SetLogBase, V, make([]byte, 8)), nil, "unknown request"},
		{"wrong size SET_FEATURES", true, msg(vhostuser.SetFeatures, V, make([]byte, 4)), nil, "wrong payload size"},
		{"payload on GET_FEATURES", true, msg(vhostuser.GetFeatures, V, make([]byte, 8)), nil, "wrong payload size"},
		{"wrong size SET_VRING_ADDR", true, msg(vhostuser.SetVringAddr, V, make([]byte, 32)), nil, "wrong payload size"},
		{"payload too big", true, hdr(vhostuser.SetMemTable, V, 1<<20), nil, "payload too large"},
		{"bad version", true, msg(vhostuser.SetOwner, 2, nil), nil, "bad message header"},
		{"reply flag on request", true, msg(vhostuser.SetOwner, V|vhostuser.FlagReply, nil), nil, "reply flag"},
		{"too many fds", true, msg(vhostuser.SetOwner, V, nil), nfiles(9), "too many file descriptors"},
		{"fd on SET_OWNER", true, msg(vhostuser.SetOwner, V, nil), nfiles(1), "unexpected file descriptor"},
		{"kick fd missing", true, msg(vhostuser.SetVringKick, V, vhostuser.EncodeU64(0)), nil, "file descriptor missing"},
		{"kick reserved bits", true, msg(vhostuser.SetVringKick, V, vhostuser.EncodeU64(1<<12)), nfiles(1), "reserved bits"},
		{"kick ring out of range", true, msg(vhostuser.SetVringKick, V, vhostuser.EncodeU64(7)), nfiles(1), "ring index out of range"},
		{"mem table fd missing", true, msg(vhostuser.SetMemTable, V, table(region(0, 4096, 0x7f0000000000, 0))), nil, "file descriptor missing"},
		{"mem table zero region", true, msg(vhostuser.SetMemTable, V, table(region(0, 0, 0x7f0000000000, 0))), nfiles(1), "empty memory region"},
		{"mem table overflow", true, msg(vhostuser.SetMemTable, V, table(region(^uint64(0)-4095, 8192, 0x1000, 0))), nfiles(1), "overflows"},
		{"mem table overlap", true, msg(vhostuser.SetMemTable, V, table(region(0, 8192, 0x10000, 0), region(4096, 4096, 0x20000, 0))), nfiles(2), "overlap"},
		{"mem table user overlap", true, msg(vhostuser.SetMemTable, V, table(region(0, 8192, 0x10000, 0), region(0x100000, 4096, 0x11000, 0))), nfiles(2), "overlap"},
		{"mem table beyond file", true, msg(vhostuser.SetMemTable, V, table(region(0, 1<<40, 0x10000, 0))), nfiles(1), "beyond the end of its file"},
		{"mem table offset wraps", true, msg(vhostuser.SetMemTable, V, table(region(0, 4096, 0x10000, ^uint64(0)-4095))), nfiles(1), "beyond the end of its file"},
		{"mem table count", true, msg(vhostuser.SetMemTable, V, append([]byte{9, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 9*32)...)), nfiles(8), "regions"},
		{"mem table before owner", false, msg(vhostuser.SetMemTable, V, table(region(0, 4096, 0x7f0000000000, 0))), nfiles(1), "SET_OWNER has not been received"},
		{"vring num before owner", false, msg(vhostuser.SetVringNum, V, vhostuser.VringState{Num: 16}.Encode()), nil, "SET_OWNER"},
		{"add mem reg without slots", true, msg(vhostuser.AddMemReg, V, vhostuser.EncodeSingleMemRegion(region(0, 4096, 0x1000, 0))), nfiles(1), "not negotiated"},
		{"vring addr without memory", true, append(msg(vhostuser.SetVringNum, V, vhostuser.VringState{Num: 16}.Encode()),
			msg(vhostuser.SetVringAddr, V, vhostuser.VringAddr{Desc: 0x7f0000000000, Avail: 0x7f0000001000, Used: 0x7f0000002000}.Encode())...), nil, "no memory table"},
		{"truncated header", true, []byte{1, 0, 0}, nil, "unexpected EOF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev := newTestDevice(2)
			h := newHarness(t, dev)
			if tt.owner {
				if err := h.client.SetOwner(); err != nil {
					t.Fatal(err)
				}
			}
			before := openFDs(t)
			rawMsg(t, h, tt.data, tt.files...)
			if tt.name == "truncated header" {
				h.client.Conn().UnixConn().CloseWrite()
			}
			if err := h.serveResult(); err == nil {
				t.Fatal("Serve returned nil after a hostile message")
			}
			logContains(t, h, tt.wantLog)
			if n := strings.Count(h.logs.String(), "\n"); n > 3 {
				t.Errorf("%d log lines for one bad message:\n%s", n, h.logs.String())
			}
			// The connection is closed: the client sees EOF.
			if _, err := h.client.GetFeatures(); err == nil {
				t.Fatal("connection still open")
			}
			if dev.resetCount() != 1 {
				t.Fatalf("device reset %d times", dev.resetCount())
			}
			if after := openFDs(t); after > before {
				t.Errorf("descriptor leak: %d -> %d", before, after)
			}
		})
	}
}

// With REPLY_ACK, the same hostile messages get a failure ack and the
// connection survives.
func TestHostileMessagesWithReplyAck(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	c := h.client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	good := mem.Regions(1)[0]
	if err := c.AddMemReg(good); err != nil {
		t.Fatal(err)
	}
	const NR = vhostuser.Version | vhostuser.FlagNeedReply
	cases := []struct {
		name  string
		req   vhostuser.Request
		data  []byte
		files []*os.File
	}{
		{"unknown", 99, nil, nil},
		{"wrong size", vhostuser.SetFeatures, make([]byte, 3), nil},
		{"missing fd", vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(good.MemRegion), nil},
		{"overlapping add", vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(good.MemRegion), []*os.File{mem.File()}},
		{"zero add", vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(vhostuser.MemRegion{GuestAddr: 1 << 30}), []*os.File{mem.File()}},
		{"overflowing add", vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(vhostuser.MemRegion{GuestAddr: 1 << 63, UserAddr: 1 << 63, Size: 1 << 63, MmapOffset: 1 << 63}), []*os.File{mem.File()}},
		// The test device reports no config changes: BACKEND_REQ is
		// neither offered nor negotiated.
		{"backend req not negotiated", vhostuser.SetBackendReqFD, nil, []*os.File{mem.File()}},
		{"backend req without fd", vhostuser.SetBackendReqFD, nil, nil},
	}
	for _, tc := range cases {
		if err := c.Conn().Send(tc.req, NR, tc.data, tc.files); err != nil {
			t.Fatal(err)
		}
		m, err := c.Conn().Recv()
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		v, err := vhostuser.ParseReply(tc.req, true, m)
		if err != nil || v.(uint64) == 0 {
			t.Fatalf("%s: ack %v %v, want failure", tc.name, v, err)
		}
	}
	// Still serving, and the good region is still there.
	if err := c.RemMemReg(good.MemRegion); err != nil {
		t.Fatal(err)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestReconnect(t *testing.T) {
	dev := newTestDevice(1)
	logs := &syncbuf.Buffer{}
	srv, err := backend.NewServer(dev, newLogger(logs))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "be.sock")
	lf := backendtest.Listen(t, sock)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lf) }()
	defer func() {
		if t.Failed() {
			t.Logf("back-end log:\n%s", logs.String())
		}
	}()

	for round := 1; round <= 3; round++ {
		g, err := testguest.Dial(sock, testguest.Options{})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i := 0; i < 4; i++ {
			if _, got := echoOnce(t, g, g.Rings[0], "hello again"); string(got) != "hello again" {
				t.Fatalf("round %d: got %q", round, got)
			}
		}
		dev.expect(t, event{0, true})
		g.Close() // disconnect without stopping anything
		dev.expect(t, event{0, false})
		deadline := time.Now().Add(5 * time.Second)
		for dev.resetCount() != round {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: device reset %d times", round, dev.resetCount())
			}
			time.Sleep(5 * time.Millisecond)
		}
		if st := srv.Stats()[0]; st.Requests != uint64(4*round) || st.Running {
			t.Fatalf("round %d: stats %+v", round, st)
		}
	}

	// A front-end that violates the protocol is dropped; the next one is
	// served.
	c, err := vhostuser.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Send(250, vhostuser.Version, nil, nil)
	if _, err := c.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("hostile front-end: %v, want EOF", err)
	}
	c.Close()
	cl, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	cl.Close()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}

func TestServeCancelConnected(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode = "block"
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	dev.expect(t, event{0, true})
	h.cancel()
	if err := h.serveResult(); err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
	dev.expect(t, event{0, false})
}

func TestServeTwice(t *testing.T) {
	dev := newTestDevice(1)
	dev.mode = "block"
	h := newHarness(t, dev)
	if _, err := h.client.GetFeatures(); err != nil { // Serve is running
		t.Fatal(err)
	}
	fa, fb, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	defer fb.Close()
	if err := h.srv.Serve(context.Background(), fa); err == nil {
		t.Fatal("second concurrent Serve accepted")
	}
}

func TestWaitKickCancel(t *testing.T) {
	// A ring blocked in WaitKick (echo device, idle) stops promptly on
	// SET_VRING_ENABLE 0, many times in a row.
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	if _, err := testguest.Start(h.client, testguest.Options{}); err != nil {
		t.Fatal(err)
	}
	dev.expect(t, event{0, true})
	for i := 0; i < 20; i++ {
		if err := h.client.SetVringEnable(0, false); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, false})
		if err := h.client.SetVringEnable(0, true); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
	}
}

// TestHandshakeDeadline: on a listening socket, a front-end that connects
// and sends nothing, or stops halfway through a message, is dropped after
// the deadline and the next front-end is served; one that claimed the
// back-end may stay idle.
func TestHandshakeDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	tests := []struct {
		name  string
		stall func(t *testing.T, c *vhostuser.Conn) // what the first front-end does
	}{
		{"silent", func(*testing.T, *vhostuser.Conn) {}},
		{"half a header", func(t *testing.T, c *vhostuser.Conn) {
			if _, err := c.UnixConn().Write(hdr(vhostuser.GetFeatures, vhostuser.Version, 0)[:5]); err != nil {
				t.Fatal(err)
			}
		}},
		{"chatty without SET_OWNER", func(t *testing.T, c *vhostuser.Conn) {
			go func() {
				for i := 0; i < 100; i++ {
					if c.Send(vhostuser.GetFeatures, vhostuser.Version, nil, nil) != nil {
						return
					}
					if _, err := c.Recv(); err != nil {
						return
					}
					time.Sleep(timeout / 10)
				}
			}()
		}},
		{"half a message after SET_OWNER", func(t *testing.T, c *vhostuser.Conn) {
			if err := c.Send(vhostuser.SetOwner, vhostuser.Version, nil, nil); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * timeout) // idle after the handshake is fine
			if _, err := c.UnixConn().Write(hdr(vhostuser.SetFeatures, vhostuser.Version, 8)); err != nil {
				t.Fatal(err)
			}
		}},
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
			t.Cleanup(func() { // after the server's stop
				if t.Failed() {
					t.Logf("back-end log:\n%s", logs.String())
				}
			})
			sock := filepath.Join(t.TempDir(), "be.sock")
			backendtest.Serve(t, srv, sock)

			first, err := vhostuser.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer first.Close()
			tt.stall(t, first)
			start := time.Now()
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
			case <-time.After(10 * timeout):
				t.Fatal("the second front-end was not served")
			}
			t.Logf("second front-end served after %v", time.Since(start))
			// The first one was dropped.
			first.UnixConn().SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				if _, err := first.Recv(); err != nil {
					break
				}
			}
		})
	}
}

func TestMisalignedRingAddresses(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	c := h.client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if err := c.SetMemTable(mem.Regions(1)); err != nil {
		t.Fatal(err)
	}
	if err := c.SetVringNum(0, 16); err != nil {
		t.Fatal(err)
	}
	base := mem.UserAddr(0x10000)
	good := vhostuser.VringAddr{Desc: base, Avail: base + 0x1000, Used: base + 0x2000}
	for name, a := range map[string]vhostuser.VringAddr{
		"used +2":  {Desc: good.Desc, Avail: good.Avail, Used: good.Used + 2},
		"used +1":  {Desc: good.Desc, Avail: good.Avail, Used: good.Used + 1},
		"avail +1": {Desc: good.Desc, Avail: good.Avail + 1, Used: good.Used},
		"desc +8":  {Desc: good.Desc + 8, Avail: good.Avail, Used: good.Used},
	} {
		if err := c.SetVringAddr(a); !errors.Is(err, frontend.ErrNacked) {
			t.Errorf("%s: %v, want a nack", name, err)
		}
	}
	logContains(t, h, "not aligned")
	if err := c.SetVringAddr(good); err != nil {
		t.Fatal(err)
	}
}
