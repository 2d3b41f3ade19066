package pluginsdk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// fakeDevice is a minimal backend.Device with the optional extras.
type fakeDevice struct {
	flushErr, closeErr error
	flushed, closed    bool
	cfg                []byte
	badInfo            bool
}

func (d *fakeDevice) Info() backend.DeviceInfo {
	if d.badInfo {
		return backend.DeviceInfo{Type: 4, NumQueues: 0}
	}
	return backend.DeviceInfo{Type: 4, NumQueues: 2, Features: 1 << 3}
}

func (d *fakeDevice) ReadConfig(off uint32, p []byte) error {
	if int(off)+len(p) > len(d.cfg) {
		return errors.New("beyond config space")
	}
	copy(p, d.cfg[off:])
	return nil
}
func (d *fakeDevice) WriteConfig(uint32, []byte) error { return errors.New("read-only") }
func (d *fakeDevice) SetFeatures(uint64) error         { return nil }
func (d *fakeDevice) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Producer: idle{}}, nil
}
func (d *fakeDevice) Reset()                      {}
func (d *fakeDevice) ConfigSize() int             { return len(d.cfg) }
func (d *fakeDevice) Counters() map[string]uint64 { return map[string]uint64{"widgets": 7} }
func (d *fakeDevice) Flush() error                { d.flushed = true; return d.flushErr }
func (d *fakeDevice) Close() error                { d.closed = true; return d.closeErr }

// idle serves nothing until its ring stops.
type idle struct{}

func (idle) Produce(ctx context.Context, _ *backend.Buffers) error {
	<-ctx.Done()
	return nil
}

// fakePlugin records what Configure got.
type fakePlugin struct {
	dev       *fakeDevice
	err       error
	panicMsg  string
	gotOpts   map[string]string
	gotFiles  map[string]*os.File
	policyFDs map[string]int
}

func (p *fakePlugin) Kind() string { return "fake" }
func (p *fakePlugin) Policy(fds map[string]int) sandbox.Policy {
	p.policyFDs = fds
	return sandbox.Policy{Kind: "fake", Syscalls: sandbox.ProfileMinimal}
}
func (p *fakePlugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, _ hclog.Logger) (backend.Device, error) {
	if p.panicMsg != "" {
		panic(p.panicMsg)
	}
	p.gotOpts, p.gotFiles = opts, files
	if p.err != nil {
		return nil, p.err
	}
	if p.dev == nil {
		return nil, nil
	}
	return p.dev, nil
}

// newTestServer returns a server whose stop only records the call: the
// real one exits the process.
func newTestServer(p Plugin) (*server, *bool) {
	stopped := false
	return &server{p: p, log: hclog.NewNullLogger(), state: pluginpb.HealthResponse_STATE_WAITING,
		stop: func() { stopped = true }}, &stopped
}

// inheritFD dups a new file onto a free fd >= 4 and returns it, as if the
// host had passed it.
func inheritFD(t *testing.T) uint32 {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "res")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, pluginpb.FirstResourceFD)
	if err != nil {
		t.Fatal(err)
	}
	if fd >= pluginpb.FirstResourceFD+maxFiles {
		unix.Close(fd)
		t.Skipf("no free fd below %d in the test process", pluginpb.FirstResourceFD+maxFiles)
	}
	return uint32(fd)
}

func code(err error) codes.Code { return status.Code(err) }

func TestConfigureStatsShutdown(t *testing.T) {
	dev := &fakeDevice{cfg: []byte{1, 2, 3, 4}, flushErr: errors.New("fdatasync: EIO")}
	p := &fakePlugin{dev: dev}
	s, stopped := newTestServer(p)
	fd := inheritFD(t)

	d, err := s.Describe(context.Background(), nil)
	if err != nil || d.Kind != "fake" || d.Configured || d.SdkVersion != Version {
		t.Fatalf("Describe before Configure = %v, %v", d, err)
	}
	if _, err := sandbox.ParsePolicy(d.PolicyJson); err != nil {
		t.Errorf("policy JSON: %v", err)
	}
	if _, err := s.Start(context.Background(), &pluginpb.StartRequest{}); code(err) != codes.FailedPrecondition {
		t.Errorf("Start before Configure: %v", err)
	}

	r, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{
		Options: map[string]string{"a": "b"}, Files: map[string]uint32{"image": fd}, SandboxOff: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	di := r.GetDevice()
	if di.GetDeviceType() != 4 || di.GetNumQueues() != 2 || di.GetMaxQueueSize() != backend.DefaultMaxQueueSize ||
		di.GetFeatures()&(1<<3) == 0 || di.GetFeatures()&backend.FrameworkFeatures != backend.FrameworkFeatures ||
		string(di.GetConfig()) != "\x01\x02\x03\x04" {
		t.Errorf("device %v", di)
	}
	if r.GetSandbox() != "off at the user's request" {
		t.Errorf("sandbox note %q", r.GetSandbox())
	}
	if p.gotOpts["a"] != "b" || p.gotFiles["image"] == nil || int(p.gotFiles["image"].Fd()) != int(fd) {
		t.Errorf("plugin got opts %v files %v", p.gotOpts, p.gotFiles)
	}
	d, err = s.Describe(context.Background(), nil)
	if err != nil || !d.Configured || d.Device.GetNumQueues() != 2 {
		t.Errorf("Describe after Configure = %v, %v", d, err)
	}
	if p.policyFDs["image"] != int(fd) {
		t.Errorf("Policy got fds %v after Configure", p.policyFDs)
	}
	if _, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true}); code(err) != codes.FailedPrecondition {
		t.Errorf("second Configure: %v", err)
	}

	st, err := s.Stats(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := st.GetCounters()
	if c["widgets"] != 7 || c["q1.requests"] != 0 {
		t.Errorf("counters %v", c)
	}
	if _, ok := c["q1.failures"]; !ok {
		t.Errorf("no per-queue back-end counters: %v", c)
	}

	sr, err := s.Shutdown(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !dev.flushed || !dev.closed || !strings.Contains(sr.GetFlushError(), "flush: fdatasync: EIO") {
		t.Errorf("shutdown: flushed %v closed %v error %q", dev.flushed, dev.closed, sr.GetFlushError())
	}
	if !*stopped {
		t.Error("Shutdown did not arrange the exit")
	}
	h, _ := s.Health(context.Background(), nil)
	if h.GetState() != pluginpb.HealthResponse_STATE_STOPPED {
		t.Errorf("health after Shutdown %v", h)
	}
}

func TestConfigureRejects(t *testing.T) {
	tests := []struct {
		name  string
		p     *fakePlugin
		files func(t *testing.T) map[string]uint32
		opts  int
		code  codes.Code
		want  string
	}{
		{name: "plugin error", p: &fakePlugin{err: errors.New(`unknown option "x"`)}, code: codes.InvalidArgument, want: `unknown option "x"`},
		{name: "plugin panics", p: &fakePlugin{panicMsg: "index out of range"}, code: codes.InvalidArgument, want: "internal error (panic): index out of range"},
		{name: "nil device", p: &fakePlugin{}, code: codes.InvalidArgument, want: "plugin returned no device"},
		{name: "stdio fd", p: &fakePlugin{dev: &fakeDevice{}}, files: func(*testing.T) map[string]uint32 { return map[string]uint32{"image": 2} },
			code: codes.InvalidArgument, want: `file "image": fd 2 outside 4..67`},
		{name: "fd not inherited", p: &fakePlugin{dev: &fakeDevice{}}, files: func(*testing.T) map[string]uint32 { return map[string]uint32{"image": 67} },
			code: codes.InvalidArgument, want: "was not inherited"},
		{name: "empty name", p: &fakePlugin{dev: &fakeDevice{}}, files: func(t *testing.T) map[string]uint32 { return map[string]uint32{"": inheritFD(t)} },
			code: codes.InvalidArgument, want: `file name "": want 1 to 64 bytes`},
		{name: "long name", p: &fakePlugin{dev: &fakeDevice{}}, files: func(t *testing.T) map[string]uint32 { return map[string]uint32{strings.Repeat("n", 65): inheritFD(t)} },
			code: codes.InvalidArgument, want: "want 1 to 64 bytes"},
		{name: "same fd twice", p: &fakePlugin{dev: &fakeDevice{}}, files: func(t *testing.T) map[string]uint32 {
			fd := inheritFD(t)
			return map[string]uint32{"a": fd, "b": fd}
		}, code: codes.InvalidArgument, want: "both claim fd"},
		{name: "too many options", p: &fakePlugin{dev: &fakeDevice{}}, opts: maxOptions + 1, code: codes.InvalidArgument, want: "options, at most"},
		{name: "bad device info", p: &fakePlugin{dev: &fakeDevice{badInfo: true}}, code: codes.Internal, want: "device: 0 queues"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newTestServer(tc.p)
			defer func() {
				// A device the SDK could not serve is closed (it holds the
				// files), and its error says "device:" once (from review).
				if d := tc.p.dev; d != nil && d.badInfo && !d.closed {
					t.Error("the device the SDK refused was not closed")
				}
			}()
			req := &pluginpb.ConfigureRequest{SandboxOff: true, Options: map[string]string{}}
			if tc.files != nil {
				req.Files = tc.files(t)
			}
			for i := 0; i < tc.opts; i++ {
				req.Options[strings.Repeat("k", i+1)] = "v"
			}
			_, err := s.Configure(context.Background(), req)
			if msg := status.Convert(err).Message(); strings.Contains(msg, "device: device:") {
				t.Errorf("Configure's error repeats its prefix: %q", msg)
			}
			if code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.want) {
				t.Fatalf("Configure = %v, want code %v containing %q", err, tc.code, tc.want)
			}
			h, _ := s.Health(context.Background(), nil)
			if h.GetState() != pluginpb.HealthResponse_STATE_FAILED || h.GetError() == "" {
				t.Errorf("health after a failed Configure: %v", h)
			}
		})
	}
}

func TestSandboxRestrictFailureStops(t *testing.T) {
	// Without KRUN_SANDBOX (no launcher-side sandbox) Restrict refuses to
	// run; the SDK reports it and arranges the exit. Restrict fails before
	// it changes anything in this test process.
	t.Setenv("KRUN_SANDBOX", "")
	os.Unsetenv("KRUN_SANDBOX")
	s, stopped := newTestServer(&fakePlugin{dev: &fakeDevice{}})
	_, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{})
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "sandbox") {
		t.Fatalf("Configure without a launcher sandbox: %v", err)
	}
	if !*stopped {
		t.Error("a failed Restrict did not stop the plugin")
	}
}

func TestCheckOptionsAndOnOff(t *testing.T) {
	if err := CheckOptions(map[string]string{"a": "1", "b": "2"}, "a", "b", "c"); err != nil {
		t.Error(err)
	}
	if err := CheckOptions(map[string]string{"z": "1", "d": "2"}, "a", "b"); err == nil || err.Error() != `unknown option "d" (want a, b)` {
		t.Errorf("CheckOptions = %v", err)
	}
	if err := CheckOptions(map[string]string{"x": ""}); err == nil || !strings.Contains(err.Error(), "takes none") {
		t.Errorf("CheckOptions with nothing allowed = %v", err)
	}
	for _, tc := range []struct {
		v       string
		set     bool
		def     bool
		want    bool
		wantErr bool
	}{
		{"on", true, false, true, false},
		{"off", true, true, false, false},
		{"", false, true, true, false},
		{"yes", true, false, false, true},
		{"", true, false, false, true},
	} {
		opts := map[string]string{}
		if tc.set {
			opts["k"] = tc.v
		}
		got, err := OnOff(opts, "k", tc.def)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("OnOff(%q set=%v def=%v) = %v, %v", tc.v, tc.set, tc.def, got, err)
		}
	}
}

func TestReadConfigSpace(t *testing.T) {
	var buf strings.Builder
	log := hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Warn})
	if got := readConfigSpace(&fakeDevice{cfg: make([]byte, 300)}, log); len(got) != maxConfigSpace {
		t.Errorf("oversized ConfigSize read %d bytes, want the %d cap", len(got), maxConfigSpace)
	}
	// Cut without a word before (helper-138's walk-through).
	if !strings.Contains(buf.String(), "ConfigSize is larger than a vhost-user config space can be") || !strings.Contains(buf.String(), "config_size=300") {
		t.Errorf("no warning for a ConfigSize over %d: %q", maxConfigSpace, buf.String())
	}
	buf.Reset()
	if got := readConfigSpace(&fakeDevice{}, log); got != nil {
		t.Errorf("empty config space read %v", got)
	}
	if buf.Len() != 0 {
		t.Errorf("warned about a config space read in full: %s", buf.String())
	}
	// A device without ConfigSize whose ReadConfig refuses the SDK's
	// 256 bytes gets a warning saying what to implement (from review,
	// helper-103: it went silently to per-read requests).
	if got := readConfigSpace(refusingConfig{}, log); got != nil {
		t.Errorf("refused config space read %v", got)
	}
	if !strings.Contains(buf.String(), "implement ConfigSize") {
		t.Errorf("no warning for a refused config space read: %q", buf.String())
	}
}

// refusingConfig is a device without ConfigSize whose 8-byte config space
// refuses longer reads.
type refusingConfig struct{ panicBlk }

func (refusingConfig) ReadConfig(off uint32, p []byte) error {
	if uint64(off)+uint64(len(p)) > 8 {
		return errors.New("beyond the config space")
	}
	return nil
}

func TestIntOption(t *testing.T) {
	tests := []struct {
		opts    map[string]string
		want    int
		wantErr bool
	}{
		{map[string]string{}, 8, false},
		{map[string]string{"queues": "1"}, 1, false},
		{map[string]string{"queues": "64"}, 64, false},
		{map[string]string{"queues": "0"}, 0, true},
		{map[string]string{"queues": "65"}, 0, true},
		{map[string]string{"queues": "x"}, 0, true},
		{map[string]string{"queues": ""}, 0, true},
	}
	for _, tt := range tests {
		got, err := IntOption(tt.opts, "queues", 8, 1, 64)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("IntOption(%v) = %d, %v; want %d, error %v", tt.opts, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestUnknownFiles(t *testing.T) {
	files := map[string]*os.File{"image": nil, "backing.0": nil, "zzz": nil, "aaa": nil}
	got := UnknownFiles(files, "image", "backing.0")
	if len(got) != 2 || got[0] != "aaa" || got[1] != "zzz" {
		t.Fatalf("UnknownFiles = %v, want [aaa zzz]", got)
	}
}

// TestRingFailureFailsHealth: a ring that fails on its own (a panic in the
// device's Handle, a broken ring) serves nothing more, so Health says the
// plugin failed, naming the queue, and the host restarts it or fails the
// device. It went on saying SERVING, and the guest's requests waited for
// good (from review, helper-79). Only a serving plugin turns failed.
//
// A ring the guest broke (virtq.ErrQueueBroken) leaves the plugin serving:
// a restart would fail the same ring again, and it ended the connection of
// QEMU, which does not reconnect by default, so the driver's next reset
// could not start the ring again (e2e/blk TestQCOW2 in CI: an available
// index of 0x3030, text where a ring had been).
func TestRingFailureFailsHealth(t *testing.T) {
	panicked := errors.New("panic in ring processing: boom")
	broken := fmt.Errorf("queue 1: %w: available index moved by 12336 on a queue of 128", virtq.ErrQueueBroken)
	for _, tc := range []struct {
		name string
		from pluginpb.HealthResponse_State
		err  error
		want pluginpb.HealthResponse_State
	}{
		{"serving", pluginpb.HealthResponse_STATE_SERVING, panicked, pluginpb.HealthResponse_STATE_FAILED},
		{"stopped", pluginpb.HealthResponse_STATE_STOPPED, panicked, pluginpb.HealthResponse_STATE_STOPPED},
		{"broken by the guest", pluginpb.HealthResponse_STATE_SERVING, broken, pluginpb.HealthResponse_STATE_SERVING},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newTestServer(&fakePlugin{})
			s.state = tc.from
			s.ringFailed(1, tc.err)
			r, err := s.Health(context.Background(), &pluginpb.HealthRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if r.State != tc.want {
				t.Errorf("Health %v, want %v", r.State, tc.want)
			}
			if tc.want == pluginpb.HealthResponse_STATE_FAILED && r.Error != "queue 1 failed: panic in ring processing: boom" {
				t.Errorf("Health error %q", r.Error)
			}
		})
	}
}

// noReplayDevice is a fakeDevice whose requests must not be carried out
// twice.
type noReplayDevice struct{ fakeDevice }

func (*noReplayDevice) Restartable() bool { return false }

// TestRestarterReported: a device that says it may not be restarted
// (Restarter) has no_restart in the DeviceInfo krun-core gets, from
// Configure and Describe; one without the method, or saying true, has not.
func TestRestarterReported(t *testing.T) {
	for _, c := range []struct {
		name string
		dev  backend.Device
		want bool
	}{
		{"without-the-method", &fakeDevice{}, false},
		{"not-restartable", &noReplayDevice{}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := &devPlugin{dev: c.dev}
			s, _ := newTestServer(p)
			r, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true})
			if err != nil {
				t.Fatal(err)
			}
			d, err := s.Describe(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if r.GetDevice().GetNoRestart() != c.want || d.GetDevice().GetNoRestart() != c.want {
				t.Errorf("no_restart %v from Configure, %v from Describe; want %v",
					r.GetDevice().GetNoRestart(), d.GetDevice().GetNoRestart(), c.want)
			}
		})
	}
}

// devPlugin configures a given device.
type devPlugin struct{ dev backend.Device }

func (*devPlugin) Kind() string { return "fake" }
func (*devPlugin) Policy(map[string]int) sandbox.Policy {
	return sandbox.Policy{Kind: "fake", Syscalls: sandbox.ProfileMinimal}
}
func (p *devPlugin) Configure(context.Context, map[string]string, map[string]*os.File, hclog.Logger) (backend.Device, error) {
	return p.dev, nil
}

// TestBrokenQueueLeftToTheBackend: a guest breaks a ring at will (it
// writes the available ring, and its driver's reset starts the ring
// again). The plugin stays serving, and logs nothing of its own for it:
// the back-end's spaced warning is the one line (before, every break
// added a WARN line here, past the back-end's ERROR: the guest grew the
// log without bound, and said it twice).
func TestBrokenQueueLeftToTheBackend(t *testing.T) {
	var buf strings.Builder
	s, _ := newTestServer(&fakePlugin{})
	s.log = hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Debug})
	s.state = pluginpb.HealthResponse_STATE_SERVING
	broken := fmt.Errorf("queue 0: %w: available index moved by 12336 on a queue of 128", virtq.ErrQueueBroken)
	for range 1000 {
		s.ringFailed(0, broken)
	}
	if buf.Len() != 0 {
		t.Fatalf("1000 broken queues logged here:\n%s", buf.String())
	}
	if s.state != pluginpb.HealthResponse_STATE_SERVING {
		t.Fatalf("state %v after broken queues", s.state)
	}
}

// checkDevice is a fakeDevice whose Check says what err holds.
type checkDevice struct {
	fakeDevice
	err    error
	checks int
}

func (d *checkDevice) Check() error { d.checks++; return d.err }

// TestCheckerFailsHealth: a device that says it cannot go on (Checker: a
// peer it depends on stopped answering, as a hung passt) marks the plugin
// failed at the next Health, with its reason, so that krun-core restarts
// it; it is asked only while the plugin serves.
func TestCheckerFailsHealth(t *testing.T) {
	stalled := errors.New("passt has read nothing for 30s")
	for _, tc := range []struct {
		name   string
		from   pluginpb.HealthResponse_State
		err    error
		want   pluginpb.HealthResponse_State
		asked  bool
		reason string
	}{
		{"serving, fine", pluginpb.HealthResponse_STATE_SERVING, nil, pluginpb.HealthResponse_STATE_SERVING, true, ""},
		{"serving, cannot go on", pluginpb.HealthResponse_STATE_SERVING, stalled, pluginpb.HealthResponse_STATE_FAILED, true, "device: passt has read nothing for 30s"},
		{"stopped", pluginpb.HealthResponse_STATE_STOPPED, stalled, pluginpb.HealthResponse_STATE_STOPPED, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newTestServer(&fakePlugin{})
			dev := &checkDevice{err: tc.err}
			s.dev, s.state = dev, tc.from
			r, err := s.Health(context.Background(), &pluginpb.HealthRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if r.State != tc.want || r.Error != tc.reason {
				t.Errorf("Health %v %q, want %v %q", r.State, r.Error, tc.want, tc.reason)
			}
			if (dev.checks > 0) != tc.asked {
				t.Errorf("Check called %d times; want asked: %v", dev.checks, tc.asked)
			}
		})
	}
}

// labelPlugin declares a policy with the given Kind label.
type labelPlugin struct{ label string }

func (labelPlugin) Kind() string { return "fake" }
func (p labelPlugin) Policy(map[string]int) sandbox.Policy {
	return sandbox.Policy{Kind: p.label, Syscalls: sandbox.ProfileMinimal}
}
func (labelPlugin) Configure(context.Context, map[string]string, map[string]*os.File, hclog.Logger) (backend.Device, error) {
	return &fakeDevice{}, nil
}

// TestPolicyKindFilledIn: a policy without a Kind label gets the plugin's
// kind in Describe, so that the host takes it (it refused it as "kind must
// be 1 to 64 bytes", which named neither the plugin nor Policy.Kind); one
// with a label keeps it (the built-in kinds label theirs "blk", "net").
func TestPolicyKindFilledIn(t *testing.T) {
	for _, c := range []struct{ label, want string }{
		{"", "fake"},
		{"blk", "blk"},
	} {
		t.Run("label="+c.label, func(t *testing.T) {
			s, _ := newTestServer(labelPlugin{label: c.label})
			d, err := s.Describe(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			pol, err := sandbox.ParsePolicy(d.GetPolicyJson())
			if err != nil {
				t.Fatalf("the host would refuse the policy: %v", err)
			}
			if pol.Kind != c.want {
				t.Errorf("policy kind %q, want %q", pol.Kind, c.want)
			}
		})
	}
}
