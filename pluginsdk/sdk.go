// Package pluginsdk is what a krun-core device plugin is written with: a
// plugin implements Plugin and its main calls Serve.
//
//	type entropy struct{}
//
//	func (entropy) Kind() string                        { return "rng-example" }
//	func (entropy) Policy(map[string]int) sandbox.Policy { return sandbox.Policy{Kind: "rng-example", Syscalls: sandbox.ProfileMinimal} }
//	func (entropy) Configure(ctx context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
//		if err := pluginsdk.CheckOptions(opts); err != nil {
//			return nil, err
//		}
//		return newDevice(), nil
//	}
//
//	func main() { pluginsdk.Serve(entropy{}) }
//
// newDevice returns a backend.Device (package vhostuser/backend) whose
// Queue hands each ring a backend.Handler. examples/plugin-null in the
// krun-core repository is a complete plugin with its test, and
// docs/PLUGINS.md the guide: building, installing, the sandbox policy,
// and what krun-core serve and run do with a plugin.
//
// Serve runs go-plugin's gRPC server and implements the DevicePlugin service
// (proto/device_plugin.proto) around the plugin:
//
//   - Describe reports Kind, the JSON of Policy and, once configured, the
//     device (DeviceInfo, offered features, config space).
//   - Configure wraps the inherited fds (4, 5, ...) in *os.File by name,
//     calls sandbox.Restrict with Policy (unless the user turned the sandbox
//     off), and only then calls Plugin.Configure: the plugin reads no image
//     or guest byte outside the sandbox.
//   - Start serves vhost-user on fd 3 with backend.Serve; a listening socket
//     is accepted in a loop so a front-end can reconnect.
//   - Stats merges the device's counters (Counter) with the back-end's per
//     queue counters ("q0.requests", ...).
//   - Shutdown stops serving, calls Flush (Flusher) and Close (io.Closer) on
//     the device and exits the process.
//
// The plugin logs through the hclog.Logger it is given: JSON lines on
// stderr, which krun-core (core/pluginhost) re-logs into its own log under
// krun-plugin-<Kind>, at most 1000 lines at once and then 200 a second.
// A plugin must not write to stdout (go-plugin's handshake channel).
package pluginsdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// Version identifies the SDK in Describe replies.
const Version = "krun-core pluginsdk 1"

// Plugin is a device plugin.
type Plugin interface {
	// Kind is the plugin kind; the executable must be krun-plugin-<Kind>.
	Kind() string
	// Policy declares the sandbox the plugin runs under. fds maps the names
	// of the inherited files to their fd numbers (for directory rules); it
	// is nil when Describe is asked before Configure. It runs before the
	// plugin restricted itself: compute the policy, read nothing. An
	// empty Policy.Kind (a label for logs) is filled in with Kind.
	Policy(fds map[string]int) sandbox.Policy
	// Configure builds the device from the host's options and the files it
	// opened (by name). It runs inside the sandbox. Unknown options are an
	// error (see CheckOptions). The plugin owns the files from now on. ctx
	// is the Configure call's: it ends when Configure returns, so the
	// device must not keep it for its lifetime.
	Configure(ctx context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error)
}

// Optional interfaces of the device returned by Configure.
type (
	// Counter reports device counters for the Stats RPC.
	Counter interface{ Counters() map[string]uint64 }
	// Flusher makes written data durable; Shutdown calls it once the
	// rings stopped, or, when a Handle has not returned 8 s after the
	// stop began, while that Handle still runs (a device whose Handle
	// may hang on its storage makes Flush safe against it).
	Flusher interface{ Flush() error }
	// ConfigSizer reports the size of the virtio config space, so Describe
	// returns exactly that many bytes (otherwise 256 bytes are read).
	ConfigSizer interface{ ConfigSize() int }
	// Restarter says whether krun-core may restart the plugin when it
	// dies. A restart submits the requests that were in flight to the new
	// plugin again, so a device whose requests must not be carried out
	// twice (their effects are not idempotent), or whose state lives only
	// in the process (a RAM disk, which would come back empty), returns
	// false: the device then fails instead. A device without this method
	// may be restarted.
	Restarter interface{ Restartable() bool }
	// Checker reports, at each Health call while the plugin serves,
	// whether the device can go on: a non-nil error (a peer it depends on
	// that stopped answering) marks the plugin failed with it, so that
	// krun-core restarts it. Check must not block.
	Checker interface{ Check() error }
)

// Serve runs the plugin until the host shuts it down, then exits the
// process. It never returns.
func Serve(p Plugin) {
	os.Exit(serve(p, os.Stderr))
}

// Limits on what Configure accepts.
const (
	maxFiles   = 64
	maxOptions = 256
	// maxConfigSpace is VHOST_USER_MAX_CONFIG_SIZE.
	maxConfigSpace = 256
	// shutdownWait bounds how long Shutdown waits for the back-end to
	// stop: under the 10 s krun-core run gives the whole Shutdown RPC
	// (core/vmm pluginShutdownTimeout), so that Flush runs and its
	// result reaches the host before it gives up and kills the plugin.
	shutdownWait = 8 * time.Second
)

// server implements the DevicePlugin service around a Plugin.
type server struct {
	pluginpb.UnimplementedDevicePluginServer
	p   Plugin
	log hclog.Logger

	mu      sync.Mutex
	state   pluginpb.HealthResponse_State
	err     error
	fds     map[string]int
	dev     backend.Device
	backend *backend.Server
	info    *pluginpb.DeviceInfo
	cancel  context.CancelFunc // stops serving
	done    chan struct{}      // closed when serving stopped

	stop func() // stops the gRPC server (process exit follows)

}

func serve(p Plugin, stderr io.Writer) int {
	log := NewLogger(stderr)
	s := &server{p: p, log: log, state: pluginpb.HealthResponse_STATE_WAITING}
	var once sync.Once
	s.stop = func() {
		// The host ends us with go-plugin's controller Shutdown (see
		// exitOnControllerShutdown); this timer is for a host that does not.
		once.Do(func() { time.AfterFunc(exitWait, func() { os.Exit(0) }) })
	}
	ServeService(Service{
		Handshake: pluginpb.Handshake(),
		Name:      pluginpb.PluginName,
		Register:  func(g *grpc.Server) { pluginpb.RegisterDevicePluginServer(g, s) },
	}, log)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
	}
	return 0
}

// exitWait is how long the plugin lingers after Shutdown (or a failed
// sandbox) for the host's controller Shutdown.
const exitWait = 2 * time.Second

// policy is the plugin's Policy with an empty Kind (the label its logs
// carry; the host refused it as "kind must be 1 to 64 bytes", which a
// plugin author could not tie to Policy) filled in with the plugin's kind.
func (s *server) policy(fds map[string]int) sandbox.Policy {
	pol := s.p.Policy(fds)
	if pol.Kind == "" {
		pol.Kind = s.p.Kind()
	}
	return pol
}

func (s *server) Describe(context.Context, *pluginpb.DescribeRequest) (*pluginpb.DescribeResponse, error) {
	s.mu.Lock()
	fds, info := s.fds, s.info
	s.mu.Unlock()
	pol, err := json.Marshal(s.policy(fds))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode sandbox policy: %v", err)
	}
	return &pluginpb.DescribeResponse{
		Kind: s.p.Kind(), Configured: info != nil, Device: info, PolicyJson: pol, SdkVersion: Version,
	}, nil
}

func (s *server) Configure(ctx context.Context, req *pluginpb.ConfigureRequest) (resp *pluginpb.ConfigureResponse, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != pluginpb.HealthResponse_STATE_WAITING {
		return nil, status.Errorf(codes.FailedPrecondition, "Configure in state %s (it is called once)", stateName(s.state))
	}
	fail := func(code codes.Code, err error) (*pluginpb.ConfigureResponse, error) {
		s.state, s.err = pluginpb.HealthResponse_STATE_FAILED, err
		// The host gets the error as Configure's answer and reports it;
		// logging it here too made the user read it twice.
		s.log.Debug("configure failed", "error", err)
		return nil, status.Error(code, err.Error())
	}
	if len(req.GetOptions()) > maxOptions {
		return fail(codes.InvalidArgument, fmt.Errorf("%d options, at most %d", len(req.GetOptions()), maxOptions))
	}
	files, fds, err := InheritedFiles(req.GetFiles(), pluginpb.FirstResourceFD, maxFiles)
	if err != nil {
		return fail(codes.InvalidArgument, err)
	}
	s.fds = fds
	sandboxNote := "off at the user's request"
	if req.GetSandboxOff() {
		s.log.Warn("sandbox disabled by the host (--sandbox=off): this plugin parses hostile input unconfined")
	} else {
		pol := s.policy(fds)
		if err := sandbox.Restrict(pol, s.log); err != nil {
			// Restrict may have applied some layers; the process must not
			// go on. Stop serving so it exits after this reply.
			s.stop()
			return fail(codes.FailedPrecondition, err)
		}
		sandboxNote = "restricted, seccomp profile " + string(pol.Syscalls)
	}

	dev, err := s.configureDevice(ctx, req.GetOptions(), files)
	if err != nil {
		for _, f := range files {
			f.Close()
		}
		return fail(codes.InvalidArgument, err)
	}
	bs, err := backend.NewServer(dev, s.log)
	if err != nil {
		// The device holds the files now; one that can be closed is.
		if c, ok := dev.(io.Closer); ok {
			c.Close()
		}
		return fail(codes.Internal, err) // NewServer's errors name the device
	}
	bs.RingFailed = s.ringFailed
	di := dev.Info()
	cfg := readConfigSpace(dev, s.log)
	s.dev, s.backend = dev, bs
	s.info = &pluginpb.DeviceInfo{
		DeviceType: di.Type, Features: bs.Features(), ProtocolFeatures: bs.ProtocolFeatures(),
		NumQueues: uint32(di.NumQueues), MaxQueueSize: uint32(maxQueueSize(di)), Config: cfg,
		NoRestart: !restartable(dev),
	}
	s.state = pluginpb.HealthResponse_STATE_CONFIGURED
	s.log.Info("configured", "kind", s.p.Kind(), "device_type", di.Type, "queues", di.NumQueues, "sandbox", sandboxNote)
	return &pluginpb.ConfigureResponse{Device: s.info, Sandbox: sandboxNote}, nil
}

// restartable reports what a device says of restarts (Restarter).
func restartable(dev backend.Device) bool {
	r, ok := dev.(Restarter)
	return !ok || r.Restartable()
}

// configureDevice calls Plugin.Configure, turning a panic into an error:
// Configure parses host-chosen images, and a one-line error serves the user
// better than a stack trace.
func (s *server) configureDevice(ctx context.Context, opts map[string]string, files map[string]*os.File) (dev backend.Device, err error) {
	defer s.recoverPanic("Configure", "", &err)
	if opts == nil {
		opts = map[string]string{}
	}
	dev, err = s.p.Configure(ctx, opts, files, s.log.Named(s.p.Kind()))
	if err == nil && dev == nil {
		err = errors.New("plugin returned no device")
	}
	return dev, err
}

func maxQueueSize(di backend.DeviceInfo) int {
	if di.MaxQueueSize == 0 {
		return backend.DefaultMaxQueueSize
	}
	return di.MaxQueueSize
}

// readConfigSpace reads the device's config space for Describe.
func readConfigSpace(dev backend.Device, log hclog.Logger) []byte {
	n := maxConfigSpace
	cs, sized := dev.(ConfigSizer)
	if sized {
		size := cs.ConfigSize()
		if size > maxConfigSpace {
			log.Warn("ConfigSize is larger than a vhost-user config space can be; the guest sees only its first bytes",
				"config_size", size, "max", maxConfigSpace)
		}
		n = min(max(size, 0), maxConfigSpace)
	}
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	if err := dev.ReadConfig(0, b); err != nil {
		// The core then asks the plugin for each of the guest's config
		// reads, from a vCPU: it works, slowly. A plugin author wants
		// to know (found in review, helper-103).
		why := "the device has no ConfigSize, so the SDK read 256 bytes"
		if sized {
			why = "the device refused to read as many bytes as its ConfigSize says"
		}
		log.Warn("config space not handed to the core at Configure; the guest's config reads will each be a request to the plugin (implement ConfigSize with the config space's length, 0 for none)",
			"reason", why, "size", n, "error", err)
		return nil
	}
	return b
}

func (s *server) Start(_ context.Context, req *pluginpb.StartRequest) (*pluginpb.StartResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != pluginpb.HealthResponse_STATE_CONFIGURED {
		return nil, status.Errorf(codes.FailedPrecondition, "Start in state %s (want configured)", stateName(s.state))
	}
	fd := req.GetSocketFd()
	if fd == 0 {
		fd = pluginpb.SocketFD
	}
	if fd < pluginpb.SocketFD || fd >= pluginpb.FirstResourceFD+maxFiles {
		return nil, status.Errorf(codes.InvalidArgument, "socket fd %d out of range", fd)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(fd), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, status.Errorf(codes.InvalidArgument, "fd %d is not an inherited socket (err %v)", fd, err)
	}
	unix.CloseOnExec(int(fd))
	f := os.NewFile(uintptr(fd), "vhost-user")
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	s.state = pluginpb.HealthResponse_STATE_SERVING
	go func() {
		err := s.backend.Serve(ctx, f)
		s.mu.Lock()
		defer s.mu.Unlock()
		if err != nil {
			s.state, s.err = pluginpb.HealthResponse_STATE_FAILED, err
			s.log.Error("vhost-user back-end stopped", "error", err)
		} else {
			s.state = pluginpb.HealthResponse_STATE_STOPPED
			s.log.Info("vhost-user back-end stopped")
		}
		close(s.done)
	}()
	return &pluginpb.StartResponse{}, nil
}

// ringFailed reports the plugin failed once one of its rings failed: the
// ring serves nothing more, and the guest's requests on it would wait for
// good. The host then restarts the plugin (the requests in flight are
// replayed) or fails the device.
//
// A ring the guest broke is the exception (virtq.ErrQueueBroken: its
// available ring says what no driver writes, an index moved by more than
// the queue's size, a head past the table): the plugin is sound, and a new
// one would read the same ring and fail it again, while the restart ends
// the connection of a front-end that does not reconnect (QEMU without
// reconnect=), which then cannot recover the device at all. The ring stays
// stopped until the front-end starts it again, at the driver's next device
// reset, as QEMU's own devices stay broken until one (virtio_error); the
// back-end warns (one spaced line) and signals the ring's error eventfd,
// and the plugin's other rings go on serving (krun-core's run then gives
// the device DEVICE_NEEDS_RESET, which stops them too, as the virtio spec
// has it; QEMU's vhost-user front-ends only log the signal). Firmware can
// leave such a ring behind: a driver that set a disk up and handed over to
// the kernel without resetting it, whose ring memory the kernel reuses
// before its own driver resets the device.
func (s *server) ringFailed(queue int, err error) {
	if err == nil {
		// Runs on the ring's goroutine: a panic here ends the plugin.
		err = errors.New("stopped on its own")
	}
	if errors.Is(err, virtq.ErrQueueBroken) {
		return // the back-end's warning says so, once
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == pluginpb.HealthResponse_STATE_SERVING {
		// The ring engine's errors name the queue already.
		msg := strings.TrimPrefix(err.Error(), fmt.Sprintf("queue %d: ", queue))
		s.state, s.err = pluginpb.HealthResponse_STATE_FAILED, fmt.Errorf("queue %d failed: %s", queue, msg)
	}
}

func (s *server) Stats(context.Context, *pluginpb.StatsRequest) (*pluginpb.StatsResponse, error) {
	s.mu.Lock()
	dev, bs := s.dev, s.backend
	s.mu.Unlock()
	c := map[string]uint64{}
	if ctr, ok := dev.(Counter); ok {
		dc, err := s.counters(ctr)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		for k, v := range dc {
			// A proto3 map key must be valid UTF-8, or the whole reply
			// fails to marshal and the back-end's counters go with it.
			c[strings.ToValidUTF8(k, "?")] = v
		}
	}
	if bs != nil {
		for _, q := range bs.Stats() {
			p := fmt.Sprintf("q%d.", q.Index)
			c[p+"requests"] = q.Requests
			c[p+"malformed"] = q.Malformed
			c[p+"notifications"] = q.Notifications
			c[p+"kicks"] = q.Kicks
			c[p+"failures"] = q.Failures
			c[p+"resubmitted"] = q.Resubmitted
		}
	}
	return &pluginpb.StatsResponse{Counters: c}, nil
}

// recoverPanic, deferred in a call of the author's code (what), turns a
// panic into *err, one line ("internal error (panic): VALUE" after
// prefix), and logs its stack in the plugin's log: a one-line error
// serves the user better than a stack trace, and gRPC does not recover a
// handler's panic (the plugin process would exit).
func (s *server) recoverPanic(what, prefix string, err *error) {
	if r := recover(); r != nil {
		s.log.Error(what+" panicked", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		*err = fmt.Errorf("%sinternal error (panic): %v", prefix, r)
	}
}

// counters calls the device's Counters with a panic turned into an
// error: a Stats (a diagnostic: krun-core serve's SIGUSR1) must not end
// the device.
func (s *server) counters(ctr Counter) (c map[string]uint64, err error) {
	defer s.recoverPanic("Counters", "device counters: ", &err)
	return ctr.Counters(), nil
}

// check calls the device's Check with a panic turned into its error: the
// plugin is then reported failed with one line, as for a panic in Handle,
// instead of exiting in the middle of a Health call.
func (s *server) check(c Checker) (err error) {
	defer s.recoverPanic("Check", "Check: ", &err)
	return c.Check()
}

func (s *server) Health(context.Context, *pluginpb.HealthRequest) (*pluginpb.HealthResponse, error) {
	s.mu.Lock()
	dev, serving := s.dev, s.state == pluginpb.HealthResponse_STATE_SERVING
	s.mu.Unlock()
	var checkErr error
	if c, ok := dev.(Checker); ok && serving {
		checkErr = s.check(c)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if checkErr != nil && s.state == pluginpb.HealthResponse_STATE_SERVING {
		s.state, s.err = pluginpb.HealthResponse_STATE_FAILED, fmt.Errorf("device: %w", checkErr)
		s.log.Error("the device cannot go on; reporting the plugin failed", "error", checkErr)
	}
	r := &pluginpb.HealthResponse{State: s.state}
	if s.err != nil {
		// Any error's text, a file name in it, must marshal as a proto3
		// string: valid UTF-8.
		r.Error = strings.ToValidUTF8(s.err.Error(), "?")
	}
	return r, nil
}

func (s *server) Shutdown(context.Context, *pluginpb.ShutdownRequest) (*pluginpb.ShutdownResponse, error) {
	s.mu.Lock()
	cancel, done, dev := s.cancel, s.done, s.dev
	s.mu.Unlock()
	defer s.stop()
	stopped := true
	if cancel != nil {
		cancel()
		select {
		case <-done:
		case <-time.After(shutdownWait):
			stopped = false
			s.log.Warn("vhost-user back-end did not stop in time (a Handle that does not return); flushing anyway, not closing the device under it", "waited", shutdownWait)
		}
	}
	var errs []error
	if f, ok := dev.(Flusher); ok {
		if err := f.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush: %w", err))
		}
	}
	// Close frees what Handle uses; with a ring still running it is left
	// to the process's exit, which follows.
	if c, ok := dev.(io.Closer); ok && stopped {
		if err := c.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close: %w", err))
		}
	}
	s.mu.Lock()
	if s.state == pluginpb.HealthResponse_STATE_SERVING || s.state == pluginpb.HealthResponse_STATE_CONFIGURED {
		s.state = pluginpb.HealthResponse_STATE_STOPPED
	}
	s.mu.Unlock()
	r := &pluginpb.ShutdownResponse{}
	if err := errors.Join(errs...); err != nil {
		// Valid UTF-8, as Health's error: a flush error may name a
		// host path, and a proto3 string that is not UTF-8 fails the
		// whole reply ("error while marshaling"), the flush error lost.
		r.FlushError = strings.ToValidUTF8(strings.ReplaceAll(err.Error(), "\n", "; "), "?")
		s.log.Error("shutdown", "error", r.FlushError)
	} else {
		s.log.Info("shut down")
	}
	return r, nil
}

func stateName(st pluginpb.HealthResponse_State) string {
	return strings.ToLower(strings.TrimPrefix(st.String(), "STATE_"))
}

// CheckOptions returns an error naming the first option (in sorted order)
// whose key is not in allowed, listing the allowed keys.
func CheckOptions(opts map[string]string, allowed ...string) error {
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		ok := false
		for _, a := range allowed {
			if k == a {
				ok = true
				break
			}
		}
		if !ok {
			if len(allowed) == 0 {
				return fmt.Errorf("unknown option %q (this plugin takes none)", k)
			}
			return fmt.Errorf("unknown option %q (want %s)", k, strings.Join(allowed, ", "))
		}
	}
	return nil
}

// OnOff reads a boolean option written "on" or "off"; a missing key gives
// def.
func OnOff(opts map[string]string, key string, def bool) (bool, error) {
	return devopts.OnOff(opts, key, def)
}

// IntOption parses opts[key] as an integer from min to max; def when the
// option is absent.
func IntOption(opts map[string]string, key string, def, min, max int) (int, error) {
	v, ok := opts[key]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if strings.HasPrefix(v, "+") || err != nil || n < min || n > max {
		return 0, fmt.Errorf("option %s=%q: want %d..%d", key, v, min, max)
	}
	return n, nil
}

// UnknownFiles returns, sorted, the names in files that are not in known.
func UnknownFiles(files map[string]*os.File, known ...string) []string {
	var out []string
	for n := range files {
		if !slices.Contains(known, n) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}
