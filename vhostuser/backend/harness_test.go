package backend_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"github.com/krun-core/krun-core/virtq"
)

// event records a ServeQueue start or return.
type event struct {
	idx   int
	start bool
}

// testDevice is a device whose queues echo: every chain's readable bytes
// are written back into its writable buffers. A request starting with
// "fail" makes the handler return an error; "panic" panics.
type testDevice struct {
	info backend.DeviceInfo
	mode string // "echo" (default), "block" (wait for ctx), "return" (return at once)

	mu       sync.Mutex
	config   [64]byte
	features []uint64
	resets   int

	events chan event
}

func newTestDevice(queues int) *testDevice {
	d := &testDevice{
		info: backend.DeviceInfo{
			Type:             0x7f,
			NumQueues:        queues,
			MaxQueueSize:     256,
			Features:         1 << 3,
			ProtocolFeatures: vhostuser.ProtocolConfig,
		},
		events: make(chan event, 1000),
	}
	for i := range d.config {
		d.config[i] = byte(i)
	}
	return d
}

func (d *testDevice) Info() backend.DeviceInfo { return d.info }

func (d *testDevice) ReadConfig(off uint32, p []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if uint64(off)+uint64(len(p)) > uint64(len(d.config)) {
		return fmt.Errorf("config read %d+%d beyond %d", off, len(p), len(d.config))
	}
	copy(p, d.config[off:])
	return nil
}

func (d *testDevice) WriteConfig(off uint32, p []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if uint64(off)+uint64(len(p)) > uint64(len(d.config)) {
		return fmt.Errorf("config write %d+%d beyond %d", off, len(p), len(d.config))
	}
	copy(d.config[off:], p)
	return nil
}

func (d *testDevice) SetFeatures(f uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.features = append(d.features, f)
	return nil
}

func (d *testDevice) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.resets++
}

func (d *testDevice) resetCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.resets
}

func (d *testDevice) ServeQueue(ctx context.Context, idx int, vr *backend.Vring) error {
	d.events <- event{idx, true}
	defer func() { d.events <- event{idx, false} }()
	switch d.mode {
	case "block":
		<-ctx.Done()
		return nil
	case "return":
		return errors.New("device gave up")
	}
	return vr.Run(ctx, echo)
}

func echo(c *virtq.Chain) (uint32, error) {
	in := make([]byte, c.ReadableLen())
	if err := c.ReadFull(in); err != nil {
		return 0, err
	}
	switch {
	case bytes.HasPrefix(in, []byte("panic")):
		panic("device bug")
	case bytes.HasPrefix(in, []byte("fail")):
		return 0, errors.New("request refused")
	}
	n, err := c.Write(in)
	return uint32(n), err
}

// expect waits for the next ServeQueue event and checks it.
func (d *testDevice) expect(t *testing.T, want event) {
	t.Helper()
	select {
	case got := <-d.events:
		if got != want {
			t.Fatalf("ServeQueue event %+v, want %+v", got, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no ServeQueue event, want %+v", want)
	}
}

// expectNone checks that no ServeQueue event arrives for a while.
func (d *testDevice) expectNone(t *testing.T) {
	t.Helper()
	select {
	case got := <-d.events:
		t.Fatalf("unexpected ServeQueue event %+v", got)
	case <-time.After(50 * time.Millisecond):
	}
}

// syncBuffer is a log sink tests can read while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness runs a Server on one end of a socketpair; client is the other
// end.
type harness struct {
	t      *testing.T
	dev    *testDevice
	srv    *backend.Server
	client *frontend.Client
	logs   *syncBuffer
	done   chan error
	cancel context.CancelFunc
}

func newLogger(buf *syncBuffer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "backend", Output: buf, Level: hclog.Debug})
}

func newHarness(t *testing.T, dev *testDevice) *harness {
	t.Helper()
	logs := &syncBuffer{}
	srv, err := backend.NewServer(dev, newLogger(logs))
	if err != nil {
		t.Fatal(err)
	}
	fa, fb, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, dev: dev, srv: srv, logs: logs, done: make(chan error, 1), cancel: cancel}
	go func() {
		h.done <- srv.Serve(ctx, fa)
		fa.Close()
	}()
	h.client, err = frontend.NewFromFile(fb)
	fb.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.client.Close()
		cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return")
		}
		if t.Failed() {
			t.Logf("back-end log:\n%s", logs.String())
		}
	})
	return h
}

// serveResult waits for Serve to return.
func (h *harness) serveResult() error {
	h.t.Helper()
	select {
	case err := <-h.done:
		h.done <- err // for Cleanup
		return err
	case <-time.After(5 * time.Second):
		h.t.Fatal("Serve did not return")
		return nil
	}
}

// echoOnce posts one request on ring r and waits for its completion.
func echoOnce(t *testing.T, g *testguest.Guest, r *testguest.Ring, msg string) (testguest.Completion, []byte) {
	t.Helper()
	in, out := postEcho(t, g, r, msg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done, err := r.Wait(ctx)
	if err != nil {
		t.Fatalf("wait for %q: %v", msg, err)
	}
	if len(done) != 1 {
		t.Fatalf("%d completions, want 1", len(done))
	}
	got, _ := g.Mem.Bytes(out, uint64(len(msg)))
	res := append([]byte(nil), got...)
	g.Mem.Free(in)
	g.Mem.Free(out)
	return done[0], res
}

// postEcho posts a request without waiting; it returns the buffers.
func postEcho(t *testing.T, g *testguest.Guest, r *testguest.Ring, msg string) (uint64, uint64) {
	t.Helper()
	in, out, err := tryPostEcho(g, r, msg)
	if err != nil {
		t.Fatal(err)
	}
	return in, out
}

func tryPostEcho(g *testguest.Guest, r *testguest.Ring, msg string) (uint64, uint64, error) {
	in, err := g.Mem.Alloc(uint64(len(msg)), 8)
	if err != nil {
		return 0, 0, err
	}
	out, err := g.Mem.Alloc(uint64(len(msg)), 8)
	if err != nil {
		return 0, 0, err
	}
	b, _ := g.Mem.Bytes(in, uint64(len(msg)))
	copy(b, msg)
	// Two readable segments and one writable, to exercise chains.
	half := uint32(len(msg) / 2)
	segs := []testguest.Segment{
		{Addr: in, Len: half},
		{Addr: in + uint64(half), Len: uint32(len(msg)) - half},
		{Addr: out, Len: uint32(len(msg)), Writable: true},
	}
	if _, err := r.Post(segs, msg); err != nil {
		g.Mem.Free(in)
		g.Mem.Free(out)
		return 0, 0, err
	}
	if _, err := r.Kick(); err != nil {
		return 0, 0, err
	}
	return in, out, nil
}

func logContains(t *testing.T, h *harness, s string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(h.logs.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log has no %q:\n%s", s, h.logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
