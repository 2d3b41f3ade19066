package backend_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// crashChildEnv makes the test binary a back-end that a test kills (see
// runCrashChild): its value is the socket path to listen on.
const crashChildEnv = "KRUN_BACKEND_CRASH_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(crashChildEnv); path != "" {
		os.Exit(runCrashChild(path))
	}
	os.Exit(m.Run())
}

// crashDevice serves requests by their first byte: 'C' completes, 'H' is
// held for ever (taken, marked, never completed), 'A' completes and stops
// the back-end right after its used element is added (before the used
// index is published), 'P' completes and stops it right after the used
// index is published (before the region is cleared). It reports what it
// does on out: "held HEAD" once a held request reached the device, "ready"
// once it stopped at a hook.
type crashDevice struct {
	out   io.Writer
	outMu sync.Mutex
	armed atomic.Value // string: the hook point to stop at
	held  chan *backend.Request
}

func (d *crashDevice) say(format string, args ...any) {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.out, format+"\n", args...)
}

func (d *crashDevice) hook(point string) {
	if d.armed.CompareAndSwap(point, "") {
		d.say("ready")
		select {} // until killed
	}
}

func (d *crashDevice) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 0x7f, NumQueues: 1, MaxQueueSize: 64}
}
func (d *crashDevice) ReadConfig(uint32, []byte) error  { return nil }
func (d *crashDevice) WriteConfig(uint32, []byte) error { return nil }
func (d *crashDevice) SetFeatures(uint64) error         { return nil }
func (d *crashDevice) Reset()                           {}
func (d *crashDevice) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d, Workers: 4}, nil
}

func (d *crashDevice) Handle(req *backend.Request) {
	var cmd [1]byte
	req.Chain().ReadFull(cmd[:])
	switch cmd[0] {
	case 'H':
		d.held <- req // never completed
		d.say("held %d", req.Chain().Head)
		return
	case 'A':
		d.armed.Store("added")
	case 'P':
		d.armed.Store("published")
	}
	n, _ := req.Chain().Write([]byte{cmd[0] + 32})
	req.Complete(uint32(n))
}

func runCrashChild(path string) int {
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dev := &crashDevice{out: os.Stdout, held: make(chan *backend.Request, 64)}
	dev.armed.Store("")
	srv, err := backend.NewServer(dev, hclog.New(&hclog.LoggerOptions{Output: os.Stderr, Level: hclog.Debug}))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	backend.SetTestHook(srv, dev.hook)
	dev.say("listening")
	if err := srv.Serve(context.Background(), f); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// recorder is the back-end that takes over: it completes everything, in
// order on the ring goroutine, and records what it served.
type recorder struct {
	mu     sync.Mutex
	served []uint16 // heads
}

func (d *recorder) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 0x7f, NumQueues: 1, MaxQueueSize: 64}
}
func (d *recorder) ReadConfig(uint32, []byte) error  { return nil }
func (d *recorder) WriteConfig(uint32, []byte) error { return nil }
func (d *recorder) SetFeatures(uint64) error         { return nil }
func (d *recorder) Reset()                           {}
func (d *recorder) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d}, nil
}

func (d *recorder) Handle(req *backend.Request) {
	var cmd [1]byte
	req.Chain().ReadFull(cmd[:])
	d.mu.Lock()
	d.served = append(d.served, req.Chain().Head)
	d.mu.Unlock()
	n, _ := req.Chain().Write([]byte{cmd[0] + 32})
	req.Complete(uint32(n))
}

func (d *recorder) heads() []uint16 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.served)
}

// TestCrashResubmitsInFlight kills a back-end process (SIGKILL) at three
// points of a request's life: after the device took it (marked in the
// inflight region, not completed), after its used element was added but
// before the used index was published, and after the used index was
// published but before the region was cleared. A new back-end that gets
// the region must resubmit exactly the requests the driver has not seen
// completed, in the order they were taken, once each, and then serve new
// requests: every request completes exactly once.
func TestCrashResubmitsInFlight(t *testing.T) {
	if testing.Short() {
		t.Skip("starts back-end processes")
	}
	for _, tc := range []struct {
		name, reqs string // one request per byte, posted in order
		ready      bool   // the child stops at a hook ("ready")
	}{
		{"taken not completed", "CHCHHC", false},
		{"added not published", "HCHA", true},
		{"published not cleared", "CHHCP", true},
	} {
		t.Run(tc.name, func(t *testing.T) { crashOnce(t, tc.reqs, tc.ready) })
	}
}

func crashOnce(t *testing.T, reqs string, ready bool) {
	dir := t.TempDir()
	path := filepath.Join(dir, "be.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
	var stderr syncbuf.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("first back-end's log:\n%s", stderr.String())
		}
	})
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	next := func(what string) string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("back-end exited while waiting for %s", what)
			}
			return l
		case <-time.After(10 * time.Second):
			t.Fatalf("back-end did not say %s", what)
		}
		return ""
	}
	if l := next("listening"); l != "listening" {
		t.Fatalf("back-end said %q", l)
	}

	g, err := testguest.Dial(path, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	type posted struct {
		cmd  byte
		head uint16
		out  uint64
	}
	var all []*posted
	byHead := map[uint16]*posted{}
	post := func(cmd byte) *posted {
		t.Helper()
		in, _ := g.Mem.Alloc(1, 8)
		out, _ := g.Mem.Alloc(1, 8)
		b, _ := g.Mem.Bytes(in, 1)
		b[0] = cmd
		p := &posted{cmd: cmd, out: out}
		head, err := r.Post([]testguest.Segment{{Addr: in, Len: 1}, {Addr: out, Len: 1, Writable: true}}, p)
		if err != nil {
			t.Fatal(err)
		}
		p.head = head
		all = append(all, p)
		byHead[head] = p
		return p
	}
	for i := range len(reqs) {
		post(reqs[i])
	}
	if err := r.KickAlways(); err != nil {
		t.Fatal(err)
	}

	// Wait until every held request reached the device and, with a hook,
	// the back-end stopped there; then kill it.
	holds := strings.Count(reqs, "H")
	for holds > 0 || ready {
		l := next("held/ready")
		switch {
		case strings.HasPrefix(l, "held "):
			holds--
		case l == "ready":
			ready = false
		default:
			t.Fatalf("back-end said %q", l)
		}
	}
	completions := map[*posted]int{}
	count := func(done []testguest.Completion) {
		for _, c := range done {
			p, ok := c.Token.(*posted)
			if !ok {
				t.Fatalf("completion of head %d that is not in flight (%v)", c.Head, c.Token)
			}
			completions[p]++
			if got, _ := g.Mem.Bytes(p.out, 1); got[0] != p.cmd+32 || c.Len != 1 {
				t.Fatalf("request %c: device wrote %q (%d bytes)", p.cmd, got[0], c.Len)
			}
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	killed = true
	count(r.Reap())

	// What the driver has not seen completed is what must come again,
	// in the order it was posted (and so taken).
	var want []uint16
	for _, p := range all {
		if completions[p] == 0 {
			want = append(want, p.head)
		}
	}
	for _, p := range all {
		if p.cmd == 'H' && completions[p] != 0 {
			t.Fatalf("held request (head %d) completed before the crash", p.head)
		}
	}

	rec := &recorder{}
	srv, err := backend.NewServer(rec, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	fa, fb, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, fa) }()
	defer func() {
		cancel()
		<-done
		fa.Close()
	}()
	c, err := frontend.NewFromFile(fb)
	fb.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reconnect(c); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(completions) < len(all) {
		if time.Now().After(deadline) {
			t.Fatalf("after the restart %d of %d requests completed (used index %d); served %v, want %v", len(completions), len(all), r.UsedIdx(), rec.heads(), want)
		}
		wctx, wcancel := context.WithTimeout(context.Background(), time.Second)
		done, _ := r.Wait(wctx)
		wcancel()
		count(done)
	}
	if got := rec.heads(); !slices.Equal(got, want) {
		t.Fatalf("new back-end served heads %v, want %v (in flight, in order)", got, want)
	}
	for _, p := range all {
		if completions[p] != 1 {
			t.Fatalf("request %c (head %d) completed %d times", p.cmd, p.head, completions[p])
		}
	}
	if st := srv.Stats()[0]; st.Resubmitted != uint64(len(want)) {
		t.Fatalf("resubmitted counter %d, want %d", st.Resubmitted, len(want))
	}

	// New requests are taken after the resubmitted ones.
	p := post('C')
	r.KickAlways()
	wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer wcancel()
	for completions[p] == 0 {
		done, err := r.Wait(wctx)
		if err != nil {
			t.Fatalf("new request after the restart: %v", err)
		}
		count(done)
	}
	if got := rec.heads(); len(got) != len(want)+1 || got[len(got)-1] != p.head {
		t.Fatalf("served %v after a new request with head %d", got, p.head)
	}
}

// TestReconnectSameBackend: a front-end that disconnects from a back-end
// that lives on (a listening socket) and connects again with the same
// inflight region finds nothing to resubmit (the rings stopped with every
// request completed), and its rings go on from where they were.
func TestReconnectSameBackend(t *testing.T) {
	path := filepath.Join(t.TempDir(), "be.sock")
	rec := &recorder{}
	srv, err := backend.NewServer(rec, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	backendtest.Serve(t, srv, path)
	g, err := testguest.Dial(path, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Rings[0]
	request := func(i int) {
		t.Helper()
		in, _ := g.Mem.Alloc(1, 8)
		out, _ := g.Mem.Alloc(1, 8)
		b, _ := g.Mem.Bytes(in, 1)
		b[0] = 'C'
		if _, err := r.Post([]testguest.Segment{{Addr: in, Len: 1}, {Addr: out, Len: 1, Writable: true}}, i); err != nil {
			t.Fatal(err)
		}
		r.KickAlways()
		wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer wcancel()
		c, err := r.Wait(wctx)
		if err != nil || len(c) != 1 || c[0].Token != i {
			t.Fatalf("request %d: %v %v", i, c, err)
		}
	}
	for i := range 5 {
		request(i)
	}
	for round := range 3 {
		c, err := frontend.Dial(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := g.Reconnect(c); err != nil {
			t.Fatalf("reconnect %d: %v", round, err)
		}
		for i := range 5 {
			request(100*(round+1) + i)
		}
	}
	if st := srv.Stats()[0]; st.Resubmitted != 0 || st.Requests != 20 {
		t.Fatalf("stats %+v: want 20 requests, none resubmitted", st)
	}
	if n := len(rec.heads()); n != 20 {
		t.Fatalf("device served %d requests, want 20", n)
	}
}
