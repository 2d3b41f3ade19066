package backend_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"github.com/krun-core/krun-core/virtq"
)

func TestEcho(t *testing.T) {
	tests := []struct {
		name   string
		queues int
		opt    testguest.Options
	}{
		{"defaults", 1, testguest.Options{}},
		{"no event idx, no indirect", 1, testguest.Options{NoEventIdx: true, NoIndirect: true}},
		{"two queues", 2, testguest.Options{NumQueues: 2}},
		{"add mem reg, 5 regions", 1, testguest.Options{UseAddMemReg: true, Regions: 5}},
		{"mem table, 8 regions", 1, testguest.Options{Regions: 8}},
		{"12 regions via slots", 1, testguest.Options{Regions: 12}},
		{"no reply ack", 1, testguest.Options{DropProtocolFeatures: vhostuser.ProtocolReplyAck}},
		{"no protocol features at all", 1, testguest.Options{DropProtocolFeatures: ^uint64(0)}},
		{"polling kick", 1, testguest.Options{PollKick: true}},
		{"polling call", 1, testguest.Options{PollCall: true}},
		{"ring of 4, indirect chains", 1, testguest.Options{QueueSize: 4}},
		{"ring of 4, direct chains", 1, testguest.Options{QueueSize: 4, NoIndirect: true}},
		{"guest memory at 4 GiB", 1, testguest.Options{MemBase: 4 << 30}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev := newTestDevice(tt.queues)
			h := newHarness(t, dev)
			g, err := testguest.Start(h.client, tt.opt)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			for q, r := range g.Rings {
				for i := 0; i < 5; i++ {
					msg := fmt.Sprintf("queue %d message %d", q, i)
					c, got := echoOnce(t, g, r, msg)
					if string(got) != msg || c.Len != uint32(len(msg)) || c.Token != msg {
						t.Fatalf("echo %q: got %q len %d token %v", msg, got, c.Len, c.Token)
					}
				}
				if st := h.srv.Stats()[q]; st.Requests != 5 || st.Malformed != 0 || !st.Running {
					t.Fatalf("queue %d stats %+v", q, st)
				}
			}
			// A batch deeper than the ring, completed in any order.
			r := g.Rings[0]
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			pending := map[string]bool{}
			for i := 0; i < 50; i++ {
				msg := fmt.Sprintf("batch %02d", i)
				for {
					_, _, err := tryPostEcho(g, r, msg)
					if err == nil {
						break
					}
					if !errors.Is(err, testguest.ErrRingFull) {
						t.Fatal(err)
					}
					done, err := r.Wait(ctx)
					if err != nil {
						t.Fatal(err)
					}
					for _, c := range done {
						delete(pending, c.Token.(string))
					}
				}
				pending[msg] = true
			}
			for len(pending) > 0 {
				done, err := r.Wait(ctx)
				if err != nil {
					t.Fatalf("%d requests never completed: %v", len(pending), err)
				}
				for _, c := range done {
					delete(pending, c.Token.(string))
				}
			}
		})
	}
}

func TestFeaturesAndConfig(t *testing.T) {
	dev := newTestDevice(3)
	h := newHarness(t, dev)
	c := h.client
	f, err := c.GetFeatures()
	if err != nil {
		t.Fatal(err)
	}
	want := dev.info.Features | vhostuser.FeatureVersion1 | vhostuser.FeatureRingIndirectDesc |
		vhostuser.FeatureRingEventIdx | vhostuser.FeatureProtocolFeatures
	if f != want {
		t.Fatalf("features %#x, want %#x", f, want)
	}
	p, err := c.GetProtocolFeatures()
	if err != nil {
		t.Fatal(err)
	}
	wantP := vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots | vhostuser.ProtocolConfig |
		vhostuser.ProtocolInflightSHMFD | vhostuser.ProtocolResetDevice
	if p != wantP {
		t.Fatalf("protocol features %#x, want %#x", p, wantP)
	}
	if err := c.SetProtocolFeatures(p); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if n, err := c.GetQueueNum(); err != nil || n != 3 {
		t.Fatalf("GET_QUEUE_NUM = %d, %v", n, err)
	}
	if n, err := c.GetMaxMemSlots(); err != nil || n != vhostuser.MaxMemSlots {
		t.Fatalf("GET_MAX_MEM_SLOTS = %d, %v", n, err)
	}
	if err := c.SetFeatures(vhostuser.FeatureVersion1 | 1<<3); err != nil {
		t.Fatal(err)
	}
	dev.mu.Lock()
	got := dev.features
	dev.mu.Unlock()
	if len(got) != 1 || got[0] != vhostuser.FeatureVersion1|1<<3 {
		t.Fatalf("device saw features %#x", got)
	}
	// Features not offered are refused (with REPLY_ACK: a nack).
	if err := c.SetFeatures(1 << 5); !errors.Is(err, frontend.ErrNacked) {
		t.Fatalf("SET_FEATURES with unoffered bit: %v", err)
	}
	cfg, err := c.GetConfig(4, 8)
	if err != nil || string(cfg) != "\x04\x05\x06\x07\x08\x09\x0a\x0b" {
		t.Fatalf("GET_CONFIG = %x, %v", cfg, err)
	}
	if err := c.SetConfig(6, vhostuser.ConfigFlagWritable, []byte{0xaa, 0xbb}); err != nil {
		t.Fatal(err)
	}
	if cfg, err := c.GetConfig(5, 4); err != nil || string(cfg) != "\x05\xaa\xbb\x08" {
		t.Fatalf("GET_CONFIG after SET_CONFIG = %x, %v", cfg, err)
	}
	// The device refuses an access beyond its 64 bytes: an empty reply.
	if _, err := c.GetConfig(60, 8); !errors.Is(err, vhostuser.ErrBadPayload) {
		t.Fatalf("GET_CONFIG beyond config space: %v", err)
	}
	if err := c.SetConfig(60, 0, make([]byte, 8)); !errors.Is(err, frontend.ErrNacked) {
		t.Fatalf("SET_CONFIG beyond config space: %v", err)
	}
	// The connection is still fine.
	if _, err := c.GetFeatures(); err != nil {
		t.Fatal(err)
	}
}

func TestNotNegotiated(t *testing.T) {
	// Without protocol features: GET_QUEUE_NUM, GET_CONFIG, ADD_MEM_REG
	// and SET_VRING_ENABLE are refused. Without REPLY_ACK the back-end can
	// only close the connection (GET_CONFIG excepted: an empty reply).
	tests := []struct {
		name string
		call func(c *frontend.Client) error
	}{
		{"GET_QUEUE_NUM", func(c *frontend.Client) error { _, err := c.GetQueueNum(); return err }},
		{"GET_MAX_MEM_SLOTS", func(c *frontend.Client) error { _, err := c.GetMaxMemSlots(); return err }},
		{"SET_VRING_ENABLE", func(c *frontend.Client) error { return c.SetVringEnable(0, true) }},
		{"GET_CONFIG", func(c *frontend.Client) error { _, err := c.GetConfig(0, 4); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newTestDevice(1))
			c := h.client
			if err := c.SetOwner(); err != nil {
				t.Fatal(err)
			}
			if err := c.SetFeatures(vhostuser.FeatureVersion1); err != nil {
				t.Fatal(err)
			}
			// Requests without a reply body cannot fail visibly here.
			if err := tt.call(c); err == nil && tt.name != "SET_VRING_ENABLE" {
				t.Fatal("accepted without negotiation")
			}
			logContains(t, h, "required feature not negotiated")
			if tt.name == "GET_CONFIG" {
				if _, err := c.GetFeatures(); err != nil {
					t.Fatalf("connection closed after GET_CONFIG failure: %v", err)
				}
			} else if err := h.serveResult(); err == nil {
				t.Fatal("Serve returned no error after a protocol violation")
			}
		})
	}
}

// setupRing does the manual sequence up to (not including) the kick: it
// returns the guest memory, a ring and the client.
func setupRing(t *testing.T, h *harness, features uint64, protocol uint64) (*testguest.Memory, *testguest.Ring) {
	t.Helper()
	c := h.client
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if features&vhostuser.FeatureProtocolFeatures != 0 {
		if err := c.SetProtocolFeatures(protocol); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.SetFeatures(features); err != nil {
		t.Fatal(err)
	}
	mem, err := testguest.NewMemory(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	if err := c.SetMemTable(mem.Regions(1)); err != nil {
		t.Fatal(err)
	}
	r, err := testguest.NewRing(mem, 0, testguest.RingOptions{Size: 16, EventIdx: features&vhostuser.FeatureRingEventIdx != 0})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	qs := r.Setup()
	if err := c.SetVringNum(0, uint32(qs.Size)); err != nil {
		t.Fatal(err)
	}
	if err := c.SetVringBase(0, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.SetVringAddr(vhostuser.VringAddr{Index: 0, Desc: qs.Desc, Avail: qs.Avail, Used: qs.Used}); err != nil {
		t.Fatal(err)
	}
	if err := c.SetVringCall(0, qs.Call); err != nil {
		t.Fatal(err)
	}
	return mem, r
}

func TestRingStates(t *testing.T) {
	const proto = vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures
	t.Run("protocol features: started disabled, enabled by SET_VRING_ENABLE", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		_, r := setupRing(t, h, proto, vhostuser.ProtocolReplyAck)
		dev.expectNone(t) // configured, no kick yet: stopped
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		dev.expectNone(t) // started but disabled
		if err := h.client.SetVringEnable(0, true); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
		if err := h.client.SetVringEnable(0, false); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, false})
		if err := h.client.SetVringEnable(0, true); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
		if ack := rawAck(t, h.client, vhostuser.SetVringEnable, vhostuser.VringState{Index: 0, Num: 2}.Encode(), nil); ack == 0 {
			t.Fatal("SET_VRING_ENABLE 2 accepted")
		}
	})
	t.Run("no protocol features: enabled on kick", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		_, r := setupRing(t, h, vhostuser.FeatureVersion1, 0)
		dev.expectNone(t)
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
	})
	t.Run("enable before kick", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		_, r := setupRing(t, h, proto, vhostuser.ProtocolReplyAck)
		if err := h.client.SetVringEnable(0, true); err != nil {
			t.Fatal(err)
		}
		dev.expectNone(t) // enabled but stopped
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
	})
	t.Run("GET_VRING_BASE stops the ring and returns the next avail index", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		mem, r := setupRing(t, h, proto|vhostuser.FeatureRingEventIdx, vhostuser.ProtocolReplyAck)
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		if err := h.client.SetVringEnable(0, true); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
		g := &testguest.Guest{Mem: mem}
		for i := 0; i < 3; i++ {
			echoOnce(t, g, r, fmt.Sprintf("before stop %d", i))
		}
		base, err := h.client.GetVringBase(0)
		if err != nil || base != 3 {
			t.Fatalf("GET_VRING_BASE = %d, %v; want 3", base, err)
		}
		dev.expect(t, event{0, false})
		// Stopped: a new request is not processed.
		postEcho(t, g, r, "while stopped")
		r.KickAlways()
		time.Sleep(50 * time.Millisecond)
		if c := r.Reap(); len(c) != 0 || r.UsedIdx() != 3 {
			t.Fatalf("stopped ring processed a request: %+v, used idx %d", c, r.UsedIdx())
		}
		// Restart at the returned base: the pending request completes.
		if err := h.client.SetVringBase(0, base); err != nil {
			t.Fatal(err)
		}
		if err := h.client.SetVringCall(0, r.CallFile()); err != nil {
			t.Fatal(err)
		}
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true}) // still enabled
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done, err := r.Wait(ctx)
		if err != nil || len(done) != 1 || done[0].Token != "while stopped" {
			t.Fatalf("after restart: %+v %v", done, err)
		}
		// GET_VRING_BASE on a stopped ring reports the same index.
		if base, err = h.client.GetVringBase(0); err != nil || base != 4 {
			t.Fatalf("GET_VRING_BASE = %d, %v; want 4", base, err)
		}
		if base, err = h.client.GetVringBase(0); err != nil || base != 4 {
			t.Fatalf("second GET_VRING_BASE = %d, %v; want 4", base, err)
		}
	})
	t.Run("configuration refused while started", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		_, r := setupRing(t, h, proto, vhostuser.ProtocolReplyAck)
		if err := h.client.SetVringKick(0, r.KickFile()); err != nil {
			t.Fatal(err)
		}
		for name, call := range map[string]func() error{
			"SET_VRING_NUM":  func() error { return h.client.SetVringNum(0, 8) },
			"SET_VRING_BASE": func() error { return h.client.SetVringBase(0, 5) },
			"SET_VRING_ADDR": func() error { return h.client.SetVringAddr(vhostuser.VringAddr{Index: 0, Desc: 0x7f0000000000}) },
			"SET_FEATURES":   func() error { return h.client.SetFeatures(proto | vhostuser.FeatureRingEventIdx) },
		} {
			if err := call(); !errors.Is(err, frontend.ErrNacked) {
				t.Errorf("%s on a started ring: %v", name, err)
			}
		}
	})
	t.Run("polling kick", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		mem, r := setupRing(t, h, vhostuser.FeatureVersion1, 0)
		if err := h.client.SetVringKick(0, nil); err != nil {
			t.Fatal(err)
		}
		dev.expect(t, event{0, true})
		g := &testguest.Guest{Mem: mem}
		// No kick is ever sent (the ring has no kick file either way).
		in, out := postEcho(t, g, r, "polled")
		_, _ = in, out
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if done, err := r.Wait(ctx); err != nil || len(done) != 1 {
			t.Fatalf("polled request: %+v %v", done, err)
		}
	})
}

func TestReplyAck(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	c := h.client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil { // acked with 0
		t.Fatal(err)
	}
	// Failures come back as nacks and the connection stays up.
	fails := map[string]func() error{
		"ring index":         func() error { return c.SetVringNum(5, 16) },
		"ring size":          func() error { return c.SetVringNum(0, 3) },
		"ring too big":       func() error { return c.SetVringNum(0, 512) },
		"addr before num":    func() error { return c.SetVringAddr(vhostuser.VringAddr{}) },
		"protocol not offer": func() error { return c.SetProtocolFeatures(vhostuser.ProtocolLogSHMFD) },
		"rem unknown region": func() error { return c.RemMemReg(vhostuser.MemRegion{Size: 4096}) },
		"base too big":       func() error { return c.SetVringBase(0, 0x10000) },
	}
	for name, call := range fails {
		if err := call(); !errors.Is(err, frontend.ErrNacked) {
			t.Errorf("%s: %v, want a nack", name, err)
		}
	}
	if _, err := c.GetFeatures(); err != nil {
		t.Fatal(err)
	}
}

func TestMemoryTableChangeWhileRunning(t *testing.T) {
	dev := newTestDevice(1)
	h, g, r := startGuest(t, dev, testguest.Options{Regions: 2})
	echoOnce(t, g, r, "first")
	dev.expect(t, event{0, true})
	// A new table (same memory, 4 regions, new descriptors): the worker
	// stops, the ring moves, the worker restarts.
	if err := h.client.SetMemTable(g.Mem.Regions(4)); err != nil {
		t.Fatal(err)
	}
	dev.expect(t, event{0, false})
	dev.expect(t, event{0, true})
	if _, got := echoOnce(t, g, r, "after change"); string(got) != "after change" {
		t.Fatalf("got %q", got)
	}
	// Slots: remove the region holding the rings; the ring pauses.
	regs := g.Mem.Regions(4)
	for _, reg := range regs {
		if err := h.client.RemMemReg(reg.MemRegion); err != nil {
			t.Fatal(err)
		}
	}
	for {
		ev := <-dev.events
		if !ev.start {
			break
		}
	}
	logContains(t, h, "ring not covered by the new memory table")
	postEcho(t, g, r, "while unmapped")
	for _, reg := range regs {
		if err := h.client.AddMemReg(reg); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if done, err := r.Wait(ctx); err != nil || len(done) != 1 || done[0].Token != "while unmapped" {
		t.Fatalf("after re-adding memory: %+v %v", done, err)
	}
}

func TestMalformedChain(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	// A buffer far outside guest memory.
	if _, err := r.Post([]testguest.Segment{{Addr: 1 << 40, Len: 64}, {Addr: 0x1000, Len: 16, Writable: true}}, "bad"); err != nil {
		t.Fatal(err)
	}
	r.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done, err := r.Wait(ctx)
	if err != nil || len(done) != 1 || done[0].Len != 0 || done[0].Token != "bad" {
		t.Fatalf("malformed chain: %+v %v", done, err)
	}
	// A request the handler refuses is completed and counted too.
	echoOnce(t, g, r, "fail this one")
	if _, got := echoOnce(t, g, r, "still working"); string(got) != "still working" {
		t.Fatalf("got %q", got)
	}
	st := h.srv.Stats()[0]
	if st.Malformed != 2 || st.Requests != 2 || st.Failures != 0 {
		t.Fatalf("stats %+v", st)
	}
	logContains(t, h, "malformed request")
}

func TestRingFailures(t *testing.T) {
	t.Run("panic in device", func(t *testing.T) {
		dev := newTestDevice(1)
		failed := make(chan error, 1)
		errFD := newEventfd(t)
		var early atomic.Bool
		h := newHarness(t, dev, func(s *backend.Server) {
			s.RingFailed = func(q int, err error) {
				// The owner hears before the front-end is woken
				// (krun-core then asks the plugin's health).
				var b [8]byte
				if n, _ := unix.Read(int(errFD.Fd()), b[:]); n == 8 {
					early.Store(true)
					unix.Write(int(errFD.Fd()), b[:]) // for waitEventfd
				}
				failed <- fmt.Errorf("queue %d: %w", q, err)
			}
		})
		g, err := testguest.Start(h.client, testguest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if err := h.client.SetVringErr(0, errFD); err != nil {
			t.Fatal(err)
		}
		postEcho(t, g, g.Rings[0], "panic now")
		waitEventfd(t, errFD)
		logContains(t, h, "panic in ring processing")
		select {
		case err := <-failed:
			if !strings.Contains(err.Error(), "queue 0: ") {
				t.Errorf("RingFailed got %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("RingFailed was not called for the failed ring")
		}
		if early.Load() {
			t.Error("the error eventfd was signalled before RingFailed was called")
		}
		if st := h.srv.Stats()[0]; st.Failures != 1 || st.Running {
			t.Fatalf("stats %+v", st)
		}
		// The back-end is alive; a restart of the ring works.
		if _, err := h.client.GetVringBase(0); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("device returns", func(t *testing.T) {
		dev := newTestDevice(1)
		dev.mode = "return"
		h := newHarness(t, dev)
		g, err := testguest.Start(h.client, testguest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		dev.expect(t, event{0, true})
		dev.expect(t, event{0, false})
		logContains(t, h, "device gave up")
		dev.expectNone(t) // not restarted
	})
	t.Run("guest breaks its ring", func(t *testing.T) {
		// An available index moved by more than the queue's size: the
		// ring fails with virtq.ErrQueueBroken (pluginsdk then leaves the
		// plugin serving), the error eventfd says so, and the front-end
		// starts the ring again on the same connection.
		dev := newTestDevice(1)
		failed := make(chan error, 1)
		h := newHarness(t, dev, func(s *backend.Server) {
			s.RingFailed = func(q int, err error) { failed <- err }
		})
		g, err := testguest.Start(h.client, testguest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		r := g.Rings[0]
		echoOnce(t, g, r, "before")
		errFD := newEventfd(t)
		if err := h.client.SetVringErr(0, errFD); err != nil {
			t.Fatal(err)
		}
		_, avail, _ := r.Addrs()
		idx, err := g.Mem.Bytes(avail+2, 2)
		if err != nil {
			t.Fatal(err)
		}
		saved := binary.LittleEndian.Uint16(idx)
		binary.LittleEndian.PutUint16(idx, 0x3030) // text where the ring was
		if err := r.KickAlways(); err != nil {
			t.Fatal(err)
		}
		waitEventfd(t, errFD)
		select {
		case err := <-failed:
			if !errors.Is(err, virtq.ErrQueueBroken) {
				t.Errorf("RingFailed got %v, want virtq.ErrQueueBroken", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("RingFailed was not called for the broken ring")
		}
		// One WARN line that blames the guest, no ERROR (the back-end
		// did not fail).
		logContains(t, h, "the guest broke a queue")
		if strings.Contains(h.logs.String(), "[ERROR]") {
			t.Errorf("a ring the guest broke logged as the back-end's error:\n%s", h.logs.String())
		}
		if _, err := h.client.GetVringBase(0); err != nil {
			t.Fatal(err)
		}
		binary.LittleEndian.PutUint16(idx, saved)
		qs := r.Setup()
		qs.Base = r.UsedIdx()
		if err := h.client.SetupQueue(qs, true); err != nil {
			t.Fatal(err)
		}
		if _, got := echoOnce(t, g, r, "after"); string(got) != "after" {
			t.Fatalf("after the ring's restart: got %q", got)
		}
	})
	t.Run("guest memory truncated (SIGBUS)", func(t *testing.T) {
		dev := newTestDevice(1)
		h := newHarness(t, dev)
		g, err := testguest.Start(h.client, testguest.Options{NoEventIdx: true})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		echoOnce(t, g, g.Rings[0], "before truncation")
		errFD := newEventfd(t)
		if err := h.client.SetVringErr(0, errFD); err != nil {
			t.Fatal(err)
		}
		// From here the test must not touch guest memory itself.
		if err := g.Mem.File().Truncate(0); err != nil {
			t.Fatal(err)
		}
		if err := g.Rings[0].KickAlways(); err != nil {
			t.Fatal(err)
		}
		waitEventfd(t, errFD)
		logContains(t, h, "memory fault")
		if st := h.srv.Stats()[0]; st.Failures != 1 {
			t.Fatalf("stats %+v", st)
		}
		if _, err := h.client.GetFeatures(); err != nil {
			t.Fatalf("back-end unusable after a fault: %v", err)
		}
	})
}

// rawAck sends a request with need_reply on the client's connection (idle,
// REPLY_ACK negotiated) and returns the ack status.
func rawAck(t *testing.T, c *frontend.Client, req vhostuser.Request, payload []byte, files []*os.File) uint64 {
	t.Helper()
	if err := c.Conn().Send(req, vhostuser.Version|vhostuser.FlagNeedReply, payload, files); err != nil {
		t.Fatal(err)
	}
	m, err := c.Conn().Recv()
	if err != nil {
		t.Fatalf("%v: no ack: %v", req, err)
	}
	v, err := vhostuser.ParseReply(req, true, m)
	if err != nil {
		t.Fatal(err)
	}
	return v.(uint64)
}

// newEventfd returns a non-blocking eventfd in Go's poller (the back-end
// sets O_NONBLOCK on descriptors it receives anyway).
func newEventfd(t *testing.T) *os.File {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	t.Cleanup(func() { f.Close() })
	return f
}

func waitEventfd(t *testing.T, f *os.File) {
	t.Helper()
	f.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [8]byte
	if _, err := f.Read(b[:]); err != nil {
		t.Fatalf("eventfd not signalled: %v", err)
	}
}

func TestNewServerRejectsBadInfo(t *testing.T) {
	tests := []backend.DeviceInfo{
		{Type: 4, NumQueues: 0},
		{Type: 4, NumQueues: 257},
		{Type: 4, NumQueues: 1, MaxQueueSize: 100},
		{Type: 4, NumQueues: 1, MaxQueueSize: 65536},
		{Type: 4, NumQueues: 1, ProtocolFeatures: vhostuser.ProtocolLogSHMFD},
		{Type: 4, NumQueues: 1, Features: vhostuser.FeatureRingPacked},
		// From review (helper-79): no device, and transport features
		// the framework does not implement (ACCESS_PLATFORM, bit 40
		// RING_RESET) offered to the guest as the device's.
		{Type: 0, NumQueues: 1},
		{Type: 4, NumQueues: 1, Features: vhostuser.FeatureAccessPlatform},
		{Type: 4, NumQueues: 1, Features: 1 << 40},
	}
	for _, info := range tests {
		d := newTestDevice(1)
		d.info = info
		if _, err := backend.NewServer(d, nil); err == nil {
			t.Errorf("NewServer accepted %+v", info)
		}
	}
	// What a device may offer: its own bits (0 to 23, 42 and up) and the
	// framework's.
	for _, f := range []uint64{1 << 0, 1 << 23, 1 << 42, vhostuser.FeatureRingEventIdx | vhostuser.FeatureVersion1} {
		d := newTestDevice(1)
		d.info = backend.DeviceInfo{Type: 4, NumQueues: 1, Features: f}
		if _, err := backend.NewServer(d, nil); err != nil {
			t.Errorf("features %#x refused: %v", f, err)
		}
	}
}

func TestResetOwner(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	echoOnce(t, g, g.Rings[0], "before reset")
	dev.expect(t, event{0, true})
	if err := h.client.ResetOwner(); err != nil {
		t.Fatal(err)
	}
	dev.expect(t, event{0, false})
	if dev.resetCount() != 1 {
		t.Fatalf("device reset %d times", dev.resetCount())
	}
	// Ownership is gone: ring set-up is refused until SET_OWNER.
	if err := h.client.SetVringNum(0, 16); !errors.Is(err, frontend.ErrNacked) {
		t.Fatalf("SET_VRING_NUM after RESET_OWNER: %v", err)
	}
	if err := h.client.SetOwner(); err != nil {
		t.Fatal(err)
	}
	// The ring restarts where it stopped.
	qs := g.Rings[0].Setup()
	qs.Base = 1
	if err := h.client.SetupQueue(qs, true); err != nil {
		t.Fatal(err)
	}
	dev.expect(t, event{0, true})
	if _, got := echoOnce(t, g, g.Rings[0], "after reset"); string(got) != "after reset" {
		t.Fatalf("got %q", got)
	}
}

// TestResetDevice: RESET_DEVICE (the guest reset the device) stops every
// ring and resets the device, and the front-end keeps ownership and its
// memory table: the ring is set up again without SET_OWNER.
func TestResetDevice(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	echoOnce(t, g, g.Rings[0], "before reset")
	dev.expect(t, event{0, true})
	if err := h.client.ResetDevice(); err != nil {
		t.Fatal(err)
	}
	dev.expect(t, event{0, false})
	if dev.resetCount() != 1 {
		t.Fatalf("device reset %d times", dev.resetCount())
	}
	qs := g.Rings[0].Setup()
	qs.Base = 1
	if err := h.client.SetupQueue(qs, true); err != nil {
		t.Fatalf("ring set-up after RESET_DEVICE: %v", err)
	}
	dev.expect(t, event{0, true})
	if _, got := echoOnce(t, g, g.Rings[0], "after reset"); string(got) != "after reset" {
		t.Fatalf("got %q", got)
	}
}

// TestResetDeviceNeedsProtocolFeature: without
// VHOST_USER_PROTOCOL_F_RESET_DEVICE the request is refused (NACK), and
// nothing is reset.
func TestResetDeviceNeedsProtocolFeature(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	if err := h.client.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if err := h.client.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if err := h.client.ResetDevice(); !errors.Is(err, frontend.ErrNacked) {
		t.Fatalf("RESET_DEVICE without the protocol feature: %v, want a NACK", err)
	}
	if dev.resetCount() != 0 {
		t.Fatalf("device reset %d times", dev.resetCount())
	}
}

func TestMaxMemSlots(t *testing.T) {
	dev := newTestDevice(1)
	h := newHarness(t, dev)
	c := h.client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	mem, err := testguest.NewMemory(0, (vhostuser.MaxMemSlots+1)*4096)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	regs := mem.Regions(vhostuser.MaxMemSlots + 1)
	if len(regs) != vhostuser.MaxMemSlots+1 {
		t.Fatalf("%d regions", len(regs))
	}
	for i, r := range regs[:vhostuser.MaxMemSlots] {
		if err := c.AddMemReg(r); err != nil {
			t.Fatalf("region %d: %v", i, err)
		}
	}
	if err := c.AddMemReg(regs[vhostuser.MaxMemSlots]); !errors.Is(err, frontend.ErrNacked) {
		t.Fatalf("region %d: %v, want a nack", vhostuser.MaxMemSlots, err)
	}
	logContains(t, h, "too many memory regions")
	if err := c.RemMemReg(regs[0].MemRegion); err != nil {
		t.Fatal(err)
	}
	if err := c.AddMemReg(regs[vhostuser.MaxMemSlots]); err != nil {
		t.Fatal(err)
	}
	// SET_MEM_TABLE replaces all of them.
	if err := c.SetMemTable(mem.Regions(1)); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkEchoRoundTrip measures one request through the back-end and
// back (post, kick, ring worker, call, reap) over a socketpair.
func BenchmarkEchoRoundTrip(b *testing.B) {
	for _, depth := range []int{1, 32} {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			dev := newTestDevice(1)
			srv, err := backend.NewServer(dev, nil)
			if err != nil {
				b.Fatal(err)
			}
			fa, fb, err := vhostuser.SocketPair()
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go srv.Serve(ctx, fa)
			client, err := frontend.NewFromFile(fb)
			if err != nil {
				b.Fatal(err)
			}
			g, err := testguest.Start(client, testguest.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			r := g.Rings[0]
			in, _ := g.Mem.Alloc(512, 64)
			out, _ := g.Mem.Alloc(512, 64)
			segs := []testguest.Segment{{Addr: in, Len: 512}, {Addr: out, Len: 512, Writable: true}}
			b.SetBytes(512)
			b.ResetTimer()
			inflight := 0
			for i := 0; i < b.N; {
				for inflight < depth && i < b.N {
					if _, err := r.Post(segs, nil); err != nil {
						b.Fatal(err)
					}
					inflight++
					i++
				}
				r.Kick()
				done, err := r.Wait(ctx)
				if err != nil {
					b.Fatal(err)
				}
				inflight -= len(done)
			}
			for inflight > 0 {
				done, err := r.Wait(ctx)
				if err != nil {
					b.Fatal(err)
				}
				inflight -= len(done)
			}
		})
	}
}

// TestEnableBeforeSetFeatures follows QEMU's vhost-user-net order: protocol
// features are negotiated, then SET_VRING_ENABLE arrives before SET_FEATURES
// acks VHOST_USER_F_PROTOCOL_FEATURES. The back-end must accept it.
func TestEnableBeforeSetFeatures(t *testing.T) {
	h := newHarness(t, newTestDevice(2))
	c := h.client
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	for i := uint32(0); i < 2; i++ {
		if err := c.SetVringEnable(i, false); err != nil {
			t.Fatalf("SET_VRING_ENABLE %d before SET_FEATURES: %v", i, err)
		}
	}
	if err := c.SetFeatures(vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetFeatures(); err != nil {
		t.Fatalf("connection lost: %v", err)
	}
}
