package backend_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"github.com/krun-core/krun-core/virtq"
)

// event records a ring start (Device.Queue) or stop (its context done).
type event struct {
	idx   int
	start bool
}

// testDevice is a device whose queues echo: every chain's readable bytes
// are written back into its writable buffers. A request starting with
// "fail" makes the handler return an error; "panic" panics.
type testDevice struct {
	info backend.DeviceInfo
	// mode: "echo" (default), "block" (serve nothing until the ring
	// stops), "return" (refuse to serve), "status" (write one byte,
	// allocating nothing), "async" (echo, completed later from another
	// goroutine)
	mode        string
	workers     int // QueueConfig.Workers
	maxInFlight int // QueueConfig.MaxInFlight
	// held receives the requests of mode "hold", which the test completes.
	held chan *backend.Request
	// workerOf records, in mode "inline", the worker that served each
	// message.
	workerOf sync.Map
	// producer serves the rings in mode "produce".
	producer backend.Producer
	// gate holds, in mode "gate", every request Inline kept on the ring's
	// goroutine until the test closes it.
	gate chan struct{}
	// longMost is, in mode "long", how many long requests were in Handle
	// at once at most.
	longMost, longNow atomic.Int32

	mu       sync.Mutex
	config   [64]byte
	features []uint64
	resets   int

	events  chan event
	stopped map[int]chan struct{} // per ring: closed once its stop event is sent
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
		events:  make(chan event, 1000),
		held:    make(chan *backend.Request, 256),
		stopped: map[int]chan struct{}{},
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

func (d *testDevice) Queue(ctx context.Context, idx int) (backend.QueueConfig, error) {
	// Events in order: the previous stop of this ring before this start.
	d.mu.Lock()
	prev := d.stopped[idx]
	stopped := make(chan struct{})
	d.stopped[idx] = stopped
	d.mu.Unlock()
	if prev != nil {
		<-prev
	}
	d.events <- event{idx, true}
	context.AfterFunc(ctx, func() {
		d.events <- event{idx, false}
		close(stopped)
	})
	switch d.mode {
	case "block":
		return backend.QueueConfig{Producer: blocker{}}, nil
	case "produce":
		return backend.QueueConfig{Producer: d.producer}, nil
	case "return":
		return backend.QueueConfig{}, errors.New("device gave up")
	case "hold":
		return backend.QueueConfig{Handler: holdHandler{d.held}, Workers: d.workers}, nil
	case "inline":
		return backend.QueueConfig{Handler: inlineHandler{&d.workerOf}, Workers: d.workers}, nil
	case "offload":
		return backend.QueueConfig{Handler: offloadHandler{inlineHandler{&d.workerOf}}, Workers: d.workers}, nil
	case "gate":
		return backend.QueueConfig{Handler: gateHandler{d.gate}, Workers: d.workers}, nil
	case "long":
		return backend.QueueConfig{Handler: &longHandler{short: d.gate, now: &d.longNow, most: &d.longMost}, Workers: d.workers}, nil
	case "inline-panic":
		return backend.QueueConfig{Handler: panicInliner{}, Workers: d.workers}, nil
	case "status":
		return backend.QueueConfig{Handler: statusHandler{}, Workers: d.workers, MaxInFlight: d.maxInFlight}, nil
	case "async":
		h := asyncHandler{reqs: make(chan *backend.Request, 16)}
		go h.run(ctx)
		return backend.QueueConfig{Handler: h, Workers: d.workers, MaxInFlight: d.maxInFlight}, nil
	}
	return backend.QueueConfig{Handler: echoHandler{}, Workers: d.workers, MaxInFlight: d.maxInFlight}, nil
}

// inlineHandler echoes; it asks for requests of at most 8 bytes to be
// served on the ring's goroutine (backend.Inliner), serves longer ones
// slowly (so that workers are busy and chains wait in the ring), and
// records which worker served each message.
type inlineHandler struct{ workerOf *sync.Map }

func (h inlineHandler) Inline(req *backend.Request) bool { return req.Chain().ReadableLen() <= 8 }

func (h inlineHandler) Handle(req *backend.Request) {
	c := req.Chain()
	if c.ReadableLen() > 8 {
		time.Sleep(200 * time.Microsecond)
	}
	msg := make([]byte, c.ReadableLen())
	if err := c.ReadFull(msg); err != nil {
		req.Malformed(err)
		req.Complete(0)
		return
	}
	h.workerOf.Store(string(msg), req.Worker())
	n, _ := c.Write(msg)
	req.Complete(uint32(n))
}

// offloadHandler is inlineHandler, except that it sends requests of more
// than 8 bytes to a worker even alone on an idle ring (backend.Offloader).
type offloadHandler struct{ inlineHandler }

func (h offloadHandler) Offload(req *backend.Request) bool { return req.Chain().ReadableLen() > 8 }

// gateHandler echoes; requests of at most 8 bytes are served on the ring's
// goroutine (backend.Inliner), each once gate is closed; longer ones on
// workers, at once.
type gateHandler struct{ gate chan struct{} }

func (h gateHandler) Inline(req *backend.Request) bool { return req.Chain().ReadableLen() <= 8 }

func (h gateHandler) Handle(req *backend.Request) {
	if req.Chain().ReadableLen() <= 8 {
		<-h.gate
	}
	echoHandler{}.Handle(req)
}

// longHandler echoes. Requests of more than 8 bytes are long
// (backend.Offloader): each waits (5 s at most) until a short request was
// served, and is completed with nothing written if none was; it records
// how many long requests were in Handle at once at most (most).
type longHandler struct {
	short     chan struct{} // closed by the first short request
	once      sync.Once
	now, most *atomic.Int32
}

func (h *longHandler) Offload(req *backend.Request) bool { return req.Chain().ReadableLen() > 8 }

func (h *longHandler) Handle(req *backend.Request) {
	if req.Chain().ReadableLen() <= 8 {
		h.once.Do(func() { close(h.short) })
		echoHandler{}.Handle(req)
		return
	}
	n := h.now.Add(1)
	defer h.now.Add(-1)
	for m := h.most.Load(); n > m && !h.most.CompareAndSwap(m, n); m = h.most.Load() {
	}
	select {
	case <-h.short:
		echoHandler{}.Handle(req)
	case <-time.After(5 * time.Second):
		req.Complete(0)
	}
}

// panicInliner echoes, but its Inline panics, as a fault on guest memory
// there (a front-end that truncated it) unwinds the ring goroutine.
type panicInliner struct{ echoHandler }

func (panicInliner) Inline(*backend.Request) bool { panic("Inline looked at unusable guest memory") }

// holdHandler hands every request to the test.
type holdHandler struct{ held chan *backend.Request }

func (h holdHandler) Handle(req *backend.Request) { h.held <- req }

// statusHandler writes one byte (a status) and completes.
type statusHandler struct{}

func (statusHandler) Handle(req *backend.Request) {
	var st [1]byte
	n, _ := req.Chain().Write(st[:])
	req.Complete(uint32(n))
}

// asyncHandler completes each request later, on a goroutine of its own
// (under Protect, as a device must).
type asyncHandler struct{ reqs chan *backend.Request }

func (h asyncHandler) Handle(req *backend.Request) { h.reqs <- req }

func (h asyncHandler) run(ctx context.Context) {
	backend.Protect(func() error {
		for {
			select {
			case req := <-h.reqs:
				n, err := echo(req.Chain())
				if err != nil {
					req.Malformed(err)
				}
				req.Complete(n)
			case <-ctx.Done():
				// The ring waits for requests in flight: drain.
				for {
					select {
					case req := <-h.reqs:
						n, _ := echo(req.Chain())
						req.Complete(n)
					case <-time.After(time.Second):
						return nil
					}
				}
			}
		}
	})
}

// blocker serves nothing until the ring stops.
type blocker struct{}

func (blocker) Produce(ctx context.Context, _ *backend.Buffers) error {
	<-ctx.Done()
	return nil
}

// echoHandler answers every request with echo.
type echoHandler struct{}

func (echoHandler) Handle(req *backend.Request) {
	n, err := echo(req.Chain())
	if err != nil {
		req.Malformed(err)
	}
	req.Complete(n)
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

// expect waits for the next ring start or stop event and checks it.
func (d *testDevice) expect(t *testing.T, want event) {
	t.Helper()
	select {
	case got := <-d.events:
		if got != want {
			t.Fatalf("ring event %+v, want %+v", got, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no ring event, want %+v", want)
	}
}

// expectNone checks that no ring event arrives for a while.
func (d *testDevice) expectNone(t *testing.T) {
	t.Helper()
	select {
	case got := <-d.events:
		t.Fatalf("unexpected ring event %+v", got)
	case <-time.After(50 * time.Millisecond):
	}
}

// harness runs a Server on one end of a socketpair; client is the other
// end.
type harness struct {
	t      testing.TB
	dev    *testDevice
	srv    *backend.Server
	client *frontend.Client
	logs   *syncbuf.Buffer
	done   chan error
	cancel context.CancelFunc
}

func newLogger(buf *syncbuf.Buffer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "backend", Output: buf, Level: hclog.Debug})
}

// newHarness serves dev over a socket pair; configure, when given, sets
// the server up before it serves.
func newHarness(t *testing.T, dev *testDevice, configure ...func(*backend.Server)) *harness {
	return newHarnessTB(t, dev, configure...)
}

// startGuest serves dev through a harness and starts a test guest on it
// with opts; the guest is closed when the test ends. It returns the
// guest's first ring too.
func startGuest(t *testing.T, dev *testDevice, opts testguest.Options) (*harness, *testguest.Guest, *testguest.Ring) {
	t.Helper()
	h := newHarness(t, dev)
	g, err := testguest.Start(h.client, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return h, g, g.Rings[0]
}

func newHarnessTB(t testing.TB, dev *testDevice, configure ...func(*backend.Server)) *harness {
	t.Helper()
	logs := &syncbuf.Buffer{}
	srv, err := backend.NewServer(dev, newLogger(logs))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range configure {
		f(srv)
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

// postThenKick posts one chain per message (the message to read, as many
// bytes to write), makes them available at once and kicks, so that the
// ring's goroutine finds them all in one round (it may be looking already).
func postThenKick(t *testing.T, g *testguest.Guest, r *testguest.Ring, msgs ...string) {
	t.Helper()
	r.HoldAvail()
	for _, msg := range msgs {
		n := uint64(len(msg))
		in, err := g.Mem.Alloc(n, 8)
		if err != nil {
			t.Fatal(err)
		}
		out, err := g.Mem.Alloc(n, 8)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := g.Mem.Bytes(in, n)
		copy(b, msg)
		if _, err := r.Post([]testguest.Segment{{Addr: in, Len: uint32(n)}, {Addr: out, Len: uint32(n), Writable: true}}, msg); err != nil {
			t.Fatal(err)
		}
	}
	r.ReleaseAvail()
	if err := r.KickAlways(); err != nil {
		t.Fatal(err)
	}
}

// waitWithin waits at most d for completions on r.
func waitWithin(ctx context.Context, r *testguest.Ring, d time.Duration) ([]testguest.Completion, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return r.Wait(ctx)
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
