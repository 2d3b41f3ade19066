// Package pluginhost launches krun-plugin-* executables with go-plugin
// (StartProcess, for any service: the device plugins' DevicePlugin and the
// image tool's ImageTool) and drives device plugins over the DevicePlugin
// gRPC service (Launch, Plugin).
//
// go-plugin passes no file descriptors, so the host passes them itself with
// exec.Cmd.ExtraFiles: the vhost-user socket is fd 3 and the named resources
// (image, backing files, shared directory, passt socket) are fd 4, 5, ... in
// order. The plugin gets no environment from the host except what go-plugin
// needs, its gRPC socket lives in a private 0700 directory that the host
// creates and removes, and the process gets SIGKILL when the host dies
// (Pdeathsig). A crashed plugin is reported as an *ExitError naming the
// kind, pid, operation, exit status and the plugin's panic line.
package pluginhost

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	hclog "github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/sandbox"
)

// Environment variables the host sets for a plugin (besides go-plugin's).
const (
	EnvKind     = "KRUN_PLUGIN_KIND"      // the plugin kind being launched
	EnvLogLevel = "KRUN_PLUGIN_LOG_LEVEL" // the host logger's level
)

// Defaults for Config's timeouts.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultRPCTimeout       = 30 * time.Second
)

// Sandboxer is the launcher-side sandbox (sandbox.LaunchConfig): it adjusts
// the command (namespaces, rlimits, ...) before it is started.
type Sandboxer interface {
	Apply(cmd *exec.Cmd) error
}

// Optional methods of a Sandboxer; sandbox.LaunchConfig has them.
type (
	// verifier checks from outside that the plugin is confined; it is
	// called after Configure, by which time the plugin ran Restrict.
	verifier interface{ Verify(pid int) error }
	// startAware is Apply with a call once the process was started (or
	// failed to start): what it must not touch before, it touches after.
	startAware interface {
		ApplyUntilStarted(cmd *exec.Cmd) (afterStart func(), err error)
	}
	// granter tells which extra system calls of a declared policy the
	// launch filter refuses.
	granter interface {
		Ungranted(sandbox.Policy) []string
		UnusedGrants(sandbox.Policy) []string
	}
)

// NamedFile is a resource handed to a plugin: fd 4 + its index, named in the
// Configure RPC.
type NamedFile struct {
	Name string
	File *os.File
}

// Config describes one plugin launch.
type Config struct {
	// Kind is the plugin kind: the executable is krun-plugin-<Kind>.
	Kind string
	// Path is the executable; "" finds it with Find(Kind, SearchPath(PluginDir)).
	Path string
	// PluginDir is searched first when Path is "".
	PluginDir string

	// Socket is the vhost-user socket, fd 3 in the plugin: connected, or
	// listening (the plugin accepts). Required.
	Socket *os.File
	// Files are fd 4, 5, ... in the plugin, in order.
	Files []NamedFile

	// Sandbox applies the launcher-side sandbox. It must be set unless
	// SandboxOff is true, so that no caller forgets it.
	Sandbox Sandboxer
	// SandboxOff is the user's explicit opt-out (--sandbox=off): no
	// launcher-side sandbox and the plugin is told to skip its own.
	SandboxOff bool

	// Logger receives the host's messages about the plugin and the plugin's
	// own log lines (the plugin logs JSON to stderr through hclog).
	Logger hclog.Logger
	// HandshakeTimeout bounds process start + go-plugin handshake.
	HandshakeTimeout time.Duration
	// RPCTimeout bounds each RPC whose context has no earlier deadline.
	RPCTimeout time.Duration
	// SocketBaseDir is where the private gRPC socket directory is made;
	// "" means os.TempDir().
	SocketBaseDir string
	// Env is extra environment for the plugin. The host's own environment
	// is never passed on.
	Env []string
}

// Plugin is a running device plugin process: a Process serving the
// DevicePlugin service.
type Plugin struct {
	*Process
	rpc        pluginpb.DevicePluginClient
	fileNames  []string
	sandboxOff bool
	sandbox    Sandboxer
	rpcTimeout time.Duration
	policy     sandbox.Policy // declared in Describe, validated at launch
}

// ErrExited is matched (errors.Is) by every *ExitError.
var ErrExited = errors.New("plugin exited")

// ErrHandshakeTimeout is matched when a plugin did not complete the
// go-plugin handshake within Config.HandshakeTimeout.
var ErrHandshakeTimeout = errors.New("plugin handshake timed out")

// ExitError reports a plugin process that exited while the host needed it.
type ExitError struct {
	Kind   string
	Pid    int
	Op     string // what the host was doing: "Configure", "handshake", "running", ...
	Status error  // the wait status (*exec.ExitError), nil for exit status 0
	Detail string // the plugin's panic line or last stderr line, if any
}

func (e *ExitError) Error() string {
	st := "exit status 0"
	if e.Status != nil {
		st = e.Status.Error()
	}
	msg := fmt.Sprintf("plugin %s (pid %d) exited during %s: %s", e.Kind, e.Pid, e.Op, st)
	if e.Detail != "" {
		msg += ": " + e.Detail
	}
	return msg
}

// Is makes errors.Is(err, ErrExited) true.
func (e *ExitError) Is(target error) bool { return target == ErrExited }

// Unwrap returns the wait status.
func (e *ExitError) Unwrap() error { return e.Status }

// Launch starts the plugin process, completes the go-plugin handshake and
// connects the gRPC client. The caller keeps ownership of cfg.Socket and
// cfg.Files (the plugin has its own copies once Launch returns) and must
// end the plugin with Shutdown or Kill.
func Launch(cfg Config) (*Plugin, error) {
	return LaunchContext(context.Background(), cfg)
}

// LaunchContext is Launch that ctx can end while the plugin starts and
// describes itself: the process is killed then, and the error wraps ctx's
// (StartProcessContext). Once it returned, ctx no longer matters to the
// plugin.
func LaunchContext(ctx context.Context, cfg Config) (_ *Plugin, err error) {
	if err := CheckKind(cfg.Kind); err != nil {
		return nil, err
	}
	if cfg.Socket == nil {
		return nil, fmt.Errorf("plugin %s: no vhost-user socket (fd 3)", cfg.Kind)
	}
	names := make([]string, len(cfg.Files))
	files := make([]*os.File, 0, 1+len(cfg.Files))
	files = append(files, cfg.Socket)
	seen := map[string]bool{}
	for i, f := range cfg.Files {
		if f.Name == "" || f.File == nil || seen[f.Name] {
			return nil, fmt.Errorf("plugin %s: file %d: empty, nil or duplicate name %q", cfg.Kind, i, f.Name)
		}
		seen[f.Name] = true
		names[i] = f.Name
		files = append(files, f.File)
	}
	proc, err := StartProcessContext(ctx, ProcessConfig{
		Kind: cfg.Kind, Path: cfg.Path, PluginDir: cfg.PluginDir, Files: files,
		Sandbox: cfg.Sandbox, SandboxOff: cfg.SandboxOff, Logger: cfg.Logger,
		HandshakeTimeout: cfg.HandshakeTimeout, SocketBaseDir: cfg.SocketBaseDir, Env: cfg.Env,
		Handshake: pluginpb.Handshake(), Service: pluginpb.PluginName,
		NewClient: func(c *grpc.ClientConn) any { return pluginpb.NewDevicePluginClient(c) },
		// A plugin's replies are hostile input: go-plugin would take up
		// to 2 GiB each.
		DialOptions: []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxReplyBytes))},
	})
	if err != nil {
		return nil, err
	}
	p := &Plugin{
		Process: proc, rpc: proc.Stub().(pluginpb.DevicePluginClient), fileNames: names,
		sandboxOff: cfg.SandboxOff, sandbox: cfg.Sandbox, rpcTimeout: cfg.RPCTimeout,
	}
	if p.rpcTimeout <= 0 {
		p.rpcTimeout = DefaultRPCTimeout
	}
	if err := p.checkDescription(ctx); err != nil {
		p.Kill()
		return nil, err
	}
	p.log.Debug("plugin started", "kind", cfg.Kind, "path", p.path, "pid", p.Pid(),
		"seccomp_profile", p.policy.Syscalls, "extra_syscalls", len(p.policy.ExtraSyscalls))
	return p, nil
}

// checkDescription asks the plugin which kind it is and which sandbox
// policy it declares. An executable named krun-plugin-K that serves another
// kind (a copy under a wrong name, a plugin installed over another) is
// refused before it is configured, and so is one whose policy
// sandbox.ParsePolicy rejects (an unknown profile, a forbidden extra system
// call, one without a reason): its own Restrict would fail on it later,
// after it had been handed its files. The policy is kept (Policy).
func (p *Plugin) checkDescription(ctx context.Context) error {
	d, err := p.Describe(ctx)
	if err != nil {
		return err
	}
	if d.Kind != p.kind && CheckKind(d.Kind) != nil {
		// Renaming the executable cannot help: the plugin's Kind is
		// wrong (a plugin author's "RamBlk"), and the executable name
		// the message below would ask for no kind can reach.
		return fmt.Errorf("plugin %s: %s reports kind %q, which is no plugin kind (1-64 characters of a-z, 0-9 and '-'): its Kind must be %q, refused",
			p.kind, p.path, oneLine(d.Kind), p.kind)
	}
	if d.Kind != p.kind {
		return fmt.Errorf("plugin %s: %s reports kind %q; a plugin's executable must be named %s, refused",
			p.kind, p.path, oneLine(d.Kind), ExecutableName(oneLine(d.Kind)))
	}
	if p.policy, err = sandbox.ParsePolicy(d.PolicyJSON); err != nil {
		return fmt.Errorf("plugin %s: %s declares a sandbox policy krun-core refuses: %s", p.kind, p.path, oneLine(err.Error()))
	}
	if g, ok := p.sandbox.(granter); ok && !p.sandboxOff {
		if names := g.Ungranted(p.policy); len(names) > 0 {
			// Its own Restrict cannot widen the launch filter: say why
			// those calls will fail, and how the user grants them.
			p.log.Warn("the plugin declares system calls its launch filter does not grant; they fail with EPERM (krun-core grants them with --plugin-syscalls "+p.kind+"=NAME,...)",
				"kind", p.kind, "syscalls", strings.Join(names, ","))
		}
		if names := g.UnusedGrants(p.policy); len(names) > 0 {
			p.log.Warn("system calls granted to the plugin (--plugin-syscalls) that its policy does not declare; the grant widens its launch filter for nothing",
				"kind", p.kind, "syscalls", strings.Join(names, ","))
		}
	}
	return nil
}

// Policy is the sandbox policy the plugin declared in Describe (decoded
// and validated by sandbox.ParsePolicy at launch). What its own
// sandbox.Restrict applies at Configure is the policy the plugin gives
// then, once it holds its files (pluginsdk asks again, with their fds),
// and never more than the launcher-side sandbox allows; with the sandbox
// off nothing is applied. Informational: Verify checks the result.
func (p *Plugin) Policy() sandbox.Policy { return p.policy }

// oneLine is the first line of s, a text the plugin controls (an error it
// returned, a line it printed, the kind it reports), cut to its first
// maxStatusMessage bytes (a plugin's reply may hold a string of up to
// MaxReplyBytes, which would otherwise become a line of megabytes in the
// error, the log, the user's terminal): a control character left in it
// (ESC, BEL, NUL...) makes the whole line come back quoted, so that no
// plugin reaches the user's terminal through krun-core's error line.
func oneLine(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' || s[i] == '\r' {
			s = s[:i]
			break
		}
	}
	return cli.Printable(cutText(s, maxStatusMessage))
}

// cutText is s cut to at most n bytes, at a character's start, with
// "..." after a cut.
func cutText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

func logLevel(l hclog.Logger) hclog.Level {
	if lv := l.GetLevel(); lv != hclog.NoLevel {
		return lv
	}
	return hclog.Info
}

// socketGrouper is implemented by a Sandboxer whose plugins run as other
// ids than the launcher's (sandbox.LaunchConfig).
type socketGrouper interface {
	JoinSocketGroup() (pluginName string, err error)
}

// deadlineSkew bounds how much earlier than this side a plugin may see
// an RPC's deadline end. It was 200 ms until CI's race-detector run on a
// loaded machine got a plugin's RST_STREAM CANCEL more than 200 ms before
// this side's 1 s deadline (TestConfigureTimeoutNamesTheLimit, stop 46's
// CI run 37; the cause on the plugin's side was not pinned down).
const deadlineSkew = 500 * time.Millisecond

// call runs one RPC with the RPC timeout and turns failures into errors
// that name the plugin; a plugin that died is reported as an *ExitError.
func (p *Plugin) call(ctx context.Context, op string, f func(context.Context) error) error {
	wait := p.rpcTimeout // the limit an error names
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(d))
	}
	callerFirst := wait < p.rpcTimeout
	ctx, cancel := context.WithTimeout(ctx, p.rpcTimeout)
	defer cancel()
	err := f(ctx)
	if err == nil {
		return nil
	}
	st := status.Convert(err)
	timedOut := false
	if c := st.Code(); c == codes.DeadlineExceeded || c == codes.Canceled {
		// The plugin's side of the deadline (sent to it as grpc-timeout)
		// may end the stream, with RST_STREAM CANCEL, a moment before
		// this side's timer fires, and on a loaded machine that timer
		// runs late: the clock decides, so that the error names the
		// limit and not "CANCEL". (Waiting for ctx.Done() up to
		// deadlineSkew past the deadline lost, under load, to the
		// context's timer, whose cancel runs on a goroutine of its own.)
		// The skew is at most half the limit: under a short deadline
		// (less than deadlineSkew left) an answer that came early is
		// the plugin's own error, not the deadline's.
		d, ok := ctx.Deadline()
		timedOut = errors.Is(ctx.Err(), context.DeadlineExceeded) ||
			ctx.Err() == nil && ok && time.Until(d) < min(deadlineSkew, wait/2)
	}
	if timedOut {
		// A plugin that died is still named as such (Exited does not
		// wait for a deadline's error).
		err = status.Error(codes.DeadlineExceeded, st.Message())
	}
	if e := p.Exited(op, err); e != nil {
		return e
	}
	if timedOut {
		// The wait is named, and which limit ended it: the RPC timeout
		// (pluginhost.DefaultRPCTimeout unless set) or the caller's. The
		// limit, not the time measured: that is later by however late
		// the timer and this goroutine ran (CI's loaded machine said
		// "no answer in 1.2s" of a 1 s timeout).
		limit := "the RPC timeout"
		if callerFirst {
			limit = "the caller's deadline"
		}
		return fmt.Errorf("plugin %s (pid %d): %s: no answer in %v (%s): %w", p.kind, p.Pid(), op, wait.Round(100*time.Millisecond), limit, context.DeadlineExceeded)
	}
	return fmt.Errorf("plugin %s: %s: %s", p.kind, op, oneLine(StatusMessage(st)))
}

// StatusMessage is a failed RPC's status message as a plugin sent it, cut
// to its first 4 KiB (a plugin may send up to the 64 KiB its trailers may
// hold): what goes into an error, the log, the user's terminal.
func StatusMessage(st *status.Status) string {
	return cutText(st.Message(), maxStatusMessage)
}

// DeviceInfo is the virtio device a plugin serves.
type DeviceInfo struct {
	Type             uint32
	Features         uint64
	ProtocolFeatures uint64
	NumQueues        int
	MaxQueueSize     int
	Config           []byte
	// NoRestart: the plugin's requests must not be carried out twice, so
	// it is never restarted (a restart submits those in flight again).
	NoRestart bool
}

func deviceInfo(d *pluginpb.DeviceInfo) *DeviceInfo {
	if d == nil {
		return nil
	}
	return &DeviceInfo{
		Type: d.GetDeviceType(), Features: d.GetFeatures(), ProtocolFeatures: d.GetProtocolFeatures(),
		NumQueues: int(d.GetNumQueues()), MaxQueueSize: int(d.GetMaxQueueSize()), Config: d.GetConfig(),
		NoRestart: d.GetNoRestart(),
	}
}

// Description is the answer to Describe.
type Description struct {
	Kind       string
	Configured bool
	Device     *DeviceInfo // nil until configured
	PolicyJSON []byte      // sandbox.Policy as JSON
	SDKVersion string
}

// Describe asks the plugin for its kind, sandbox policy and (once
// configured) device.
func (p *Plugin) Describe(ctx context.Context) (*Description, error) {
	var r *pluginpb.DescribeResponse
	err := p.call(ctx, "Describe", func(ctx context.Context) (err error) {
		r, err = p.rpc.Describe(ctx, &pluginpb.DescribeRequest{})
		return err
	})
	if err != nil {
		return nil, err
	}
	return &Description{Kind: r.GetKind(), Configured: r.GetConfigured(), Device: deviceInfo(r.GetDevice()),
		PolicyJSON: r.GetPolicyJson(), SDKVersion: r.GetSdkVersion()}, nil
}

// Configure hands the plugin its options and names the files it inherited
// (Config.Files as fd 4, 5, ...). It returns the configured device and the
// plugin-side sandbox summary.
func (p *Plugin) Configure(ctx context.Context, options map[string]string) (*DeviceInfo, string, error) {
	// Options travel as proto3 strings, which gRPC refuses to marshal
	// unless they are UTF-8: a path of other bytes (path=, a plugin's
	// option as the user gave it) would fail as "grpc: error while
	// marshaling", naming neither the option nor why.
	for k, v := range options {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, "", fmt.Errorf("plugin %s: option %s: not valid UTF-8 (options reach a plugin as UTF-8 text; rename the file, or give it through a path that is)",
				p.kind, cli.Printable(k+"="+v))
		}
	}
	files := make(map[string]uint32, len(p.fileNames))
	for i, n := range p.fileNames {
		files[n] = uint32(pluginpb.FirstResourceFD + i)
	}
	var r *pluginpb.ConfigureResponse
	err := p.call(ctx, "Configure", func(ctx context.Context) (err error) {
		r, err = p.rpc.Configure(ctx, &pluginpb.ConfigureRequest{Options: options, Files: files, SandboxOff: p.sandboxOff})
		return err
	})
	if err != nil {
		return nil, "", err
	}
	if r.GetDevice() == nil {
		return nil, "", fmt.Errorf("plugin %s: Configure returned no device", p.kind)
	}
	if want, ok := devopts.DeviceType(p.kind); ok && r.GetDevice().GetDeviceType() != want {
		// A built-in plugin parses hostile bytes and may be compromised:
		// under another device type the guest would take it for
		// another device (a console port named as the command's stdio,
		// a virtio-fs share tagged as the root).
		p.Kill()
		return nil, "", fmt.Errorf("plugin %s (pid %d) serves virtio device type %d, a %s plugin serves type %d; killed it",
			p.kind, p.Pid(), r.GetDevice().GetDeviceType(), p.kind, want)
	}
	if v, ok := p.sandbox.(verifier); ok && !p.sandboxOff {
		if err := v.Verify(p.Pid()); err != nil {
			p.Kill()
			return nil, "", fmt.Errorf("plugin %s (pid %d) is not confined after Configure, killed it: %w", p.kind, p.Pid(), err)
		}
	}
	// The summary is the plugin's text, logged by the caller: one line.
	return deviceInfo(r.GetDevice()), oneLine(r.GetSandbox()), nil
}

// Start makes the plugin serve vhost-user on fd 3.
func (p *Plugin) Start(ctx context.Context) error {
	return p.call(ctx, "Start", func(ctx context.Context) error {
		_, err := p.rpc.Start(ctx, &pluginpb.StartRequest{SocketFd: pluginpb.SocketFD})
		return err
	})
}

// Stats returns the plugin's counters.
func (p *Plugin) Stats(ctx context.Context) (map[string]uint64, error) {
	var r *pluginpb.StatsResponse
	err := p.call(ctx, "Stats", func(ctx context.Context) (err error) {
		r, err = p.rpc.Stats(ctx, &pluginpb.StatsRequest{})
		return err
	})
	if err != nil {
		return nil, err
	}
	return r.GetCounters(), nil
}

// HealthState is the plugin's serving state.
type HealthState = pluginpb.HealthResponse_State

// Health states a host acts on.
const (
	HealthServing = pluginpb.HealthResponse_STATE_SERVING
	HealthFailed  = pluginpb.HealthResponse_STATE_FAILED
	HealthStopped = pluginpb.HealthResponse_STATE_STOPPED
)

// Health returns the serving state and, for a failed back-end, its error
// (its first line).
func (p *Plugin) Health(ctx context.Context) (HealthState, string, error) {
	var r *pluginpb.HealthResponse
	err := p.call(ctx, "Health", func(ctx context.Context) (err error) {
		r, err = p.rpc.Health(ctx, &pluginpb.HealthRequest{})
		return err
	})
	if err != nil {
		return 0, "", err
	}
	// The plugin's text: one line of it (a plugin's panic stack, any
	// other multi-line error, stays in the plugin's own log).
	return r.GetState(), oneLine(r.GetError()), nil
}

// Shutdown asks the plugin to stop serving, flush and exit, waits for the
// process to end and removes the private socket directory. It returns the
// flush error, or the *ExitError of a plugin that had already crashed.
func (p *Plugin) Shutdown(ctx context.Context) error {
	p.stopping.Store(true)
	var rpcErr error
	select {
	case <-p.run.done:
		rpcErr = p.crashedBefore("Shutdown")
	default:
		var r *pluginpb.ShutdownResponse
		rpcErr = p.call(ctx, "Shutdown", func(ctx context.Context) (err error) {
			r, err = p.rpc.Shutdown(ctx, &pluginpb.ShutdownRequest{})
			return err
		})
		if rpcErr == nil && r.GetFlushError() != "" {
			rpcErr = fmt.Errorf("plugin %s: flush on shutdown: %s", p.kind, oneLine(r.GetFlushError()))
		}
	}
	p.close()
	return rpcErr
}

// crashedBefore reports an exit that happened before the host asked for
// one; a clean exit (status 0) is not an error.
func (p *Plugin) crashedBefore(op string) error {
	if p.run.ExitErr() == nil {
		return nil
	}
	return p.exitError(op)
}

// MaxReplyBytes bounds a device plugin's gRPC reply (Describe, Health,
// Stats...): all are small (a config space, a policy, counters).
const MaxReplyBytes = 1 << 20

// LaunchAll launches several plugins concurrently. If any launch fails, the
// others are killed and the first error (in cfgs order) is returned.
func LaunchAll(cfgs []Config) ([]*Plugin, error) {
	ps := make([]*Plugin, len(cfgs))
	errs := make([]error, len(cfgs))
	var wg sync.WaitGroup
	for i := range cfgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ps[i], errs[i] = Launch(cfgs[i])
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			for _, p := range ps {
				if p != nil {
					p.Kill()
				}
			}
			return nil, err
		}
	}
	return ps, nil
}

// socketPath is for tests: the gRPC socket the plugin listens on.
func (p *Plugin) socketPath() string {
	if rc := p.client.ReattachConfig(); rc != nil && rc.Addr != nil {
		return filepath.Clean(rc.Addr.String())
	}
	return ""
}
