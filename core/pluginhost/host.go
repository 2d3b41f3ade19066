// Package pluginhost launches krun-plugin-* executables with go-plugin and
// drives them over the DevicePlugin gRPC service.
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
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/go-plugin/runner"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/proto/pluginpb"
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

// Optional methods of a Sandboxer; sandbox.LaunchConfig has both.
type (
	// limitApplier lowers the resource limits of the started process from
	// outside (prlimit), for plugins that never restrict themselves.
	limitApplier interface{ ApplyLimits(pid int) error }
	// verifier checks from outside that the plugin is confined; it is
	// called after Configure, by which time the plugin ran Restrict.
	verifier interface{ Verify(pid int) error }
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

// Plugin is a running plugin process.
type Plugin struct {
	kind       string
	path       string
	log        hclog.Logger
	client     *plugin.Client
	rpc        pluginpb.DevicePluginClient
	run        *ProcRunner
	sockDir    string
	fileNames  []string
	sandboxOff bool
	sandbox    Sandboxer
	rpcTimeout time.Duration
	stderr     *TailBuffer

	stopping  atomic.Bool // Shutdown or Kill was called
	closeOnce sync.Once
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

// deviceClient is the host half of go-plugin's GRPCPlugin.
type deviceClient struct{ plugin.NetRPCUnsupportedPlugin }

func (deviceClient) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("pluginhost: the host does not serve plugins")
}

func (deviceClient) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return pluginpb.NewDevicePluginClient(c), nil
}

// Launch starts the plugin process, completes the go-plugin handshake and
// connects the gRPC client. The caller keeps ownership of cfg.Socket and
// cfg.Files (the plugin has its own copies once Launch returns) and must
// end the plugin with Shutdown or Kill.
func Launch(cfg Config) (_ *Plugin, err error) {
	if err := CheckKind(cfg.Kind); err != nil {
		return nil, err
	}
	if cfg.Socket == nil {
		return nil, fmt.Errorf("plugin %s: no vhost-user socket (fd 3)", cfg.Kind)
	}
	if cfg.Sandbox == nil && !cfg.SandboxOff {
		return nil, fmt.Errorf("plugin %s: no launcher-side sandbox configured (set Sandbox, or SandboxOff for an explicit opt-out)", cfg.Kind)
	}
	names := make([]string, len(cfg.Files))
	seen := map[string]bool{}
	for i, f := range cfg.Files {
		if f.Name == "" || f.File == nil || seen[f.Name] {
			return nil, fmt.Errorf("plugin %s: file %d: empty, nil or duplicate name %q", cfg.Kind, i, f.Name)
		}
		seen[f.Name] = true
		names[i] = f.Name
	}
	path := cfg.Path
	if path == "" {
		if path, err = Find(cfg.Kind, SearchPath(cfg.PluginDir)); err != nil {
			return nil, err
		}
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	hsTimeout := cfg.HandshakeTimeout
	if hsTimeout <= 0 {
		hsTimeout = DefaultHandshakeTimeout
	}
	p := &Plugin{
		kind: cfg.Kind, path: path, log: log, fileNames: names,
		sandboxOff: cfg.SandboxOff, sandbox: cfg.Sandbox, rpcTimeout: cfg.RPCTimeout, stderr: &TailBuffer{},
	}
	if p.rpcTimeout <= 0 {
		p.rpcTimeout = DefaultRPCTimeout
	}

	// The private directory: go-plugin puts its own socket directory (and
	// the plugin its gRPC socket) inside it; removed in Kill/Shutdown.
	p.sockDir, err = os.MkdirTemp(cfg.SocketBaseDir, "krun-"+cfg.Kind+"-")
	if err != nil {
		return nil, fmt.Errorf("plugin %s: private socket directory: %w", cfg.Kind, err)
	}
	if err := os.Chmod(p.sockDir, 0o700); err != nil {
		_ = os.RemoveAll(p.sockDir)
		return nil, fmt.Errorf("plugin %s: private socket directory: %w", cfg.Kind, err)
	}
	// go-plugin adds "/plugin-dirNNNNNNNNNN/pluginNNNNNNNNNN" (at most 39
	// bytes), the host reaches a sandboxed plugin's socket through
	// "/proc/PID/root" (at most 18), and a unix socket path has room for
	// 107.
	if len(p.sockDir)+39+18 > 107 {
		_ = os.RemoveAll(p.sockDir)
		return nil, fmt.Errorf("plugin %s: socket directory %s is too long for a unix socket path (use a shorter TMPDIR)", cfg.Kind, p.sockDir)
	}

	// A root launcher shares a group with its plugin for the plugin's
	// socket, so it can reach a plugin it starts again after dropping its
	// capabilities (sandbox.LaunchConfig.SocketGroup).
	sockGroup := ""
	if sg, ok := cfg.Sandbox.(socketGrouper); ok && !cfg.SandboxOff {
		if sockGroup, err = sg.JoinSocketGroup(); err != nil {
			_ = os.RemoveAll(p.sockDir)
			return nil, fmt.Errorf("plugin %s: %w", cfg.Kind, err)
		}
	}

	extra := make([]*os.File, 0, 1+len(cfg.Files))
	extra = append(extra, cfg.Socket)
	for _, f := range cfg.Files {
		extra = append(extra, f.File)
	}
	runnerFunc := func(_ hclog.Logger, spec *exec.Cmd, _ string) (runner.Runner, error) {
		cmd := exec.Command(path)
		// spec.Env holds go-plugin's variables only (SkipHostEnv), the
		// socket directory last.
		cmd.Env = append(append([]string(nil), spec.Env...),
			EnvKind+"="+cfg.Kind, EnvLogLevel+"="+logLevel(log).String())
		cmd.Env = append(cmd.Env, cfg.Env...)
		cmd.ExtraFiles = extra
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if cfg.Sandbox != nil {
			if err := cfg.Sandbox.Apply(cmd); err != nil {
				return nil, fmt.Errorf("%s %w", SandboxErrPrefix, err)
			}
		}
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
		r, err := NewProcRunner(cmd, "")
		if err != nil {
			return nil, err
		}
		if la, ok := cfg.Sandbox.(limitApplier); ok && !cfg.SandboxOff {
			r.SetPostStart(la.ApplyLimits)
		}
		p.run = r
		return r, nil
	}
	p.client = plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  pluginpb.Handshake(),
		Plugins:          plugin.PluginSet{pluginpb.PluginName: deviceClient{}},
		RunnerFunc:       runnerFunc,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		StartTimeout:     hsTimeout,
		Logger:           quietLogger{log, p},
		Stderr:           io.MultiWriter(p.stderr, newPluginLog(log.Named(ExecutableName(cfg.Kind)), cfg.Kind)),
		SkipHostEnv:      true,
		UnixSocketConfig: &plugin.UnixSocketConfig{TempDir: p.sockDir, Group: sockGroup},
	})

	start := time.Now()
	if _, err := p.client.Start(); err != nil {
		p.client.Kill()
		p.removeSockDir()
		return nil, p.startError(err, time.Since(start), hsTimeout)
	}
	raw, err := p.client.Client()
	if err == nil {
		var d interface{}
		if d, err = raw.Dispense(pluginpb.PluginName); err == nil {
			p.rpc = d.(pluginpb.DevicePluginClient)
		}
	}
	if err != nil {
		p.Kill()
		return nil, fmt.Errorf("plugin %s: connect: %w", cfg.Kind, err)
	}
	if err := p.checkKind(); err != nil {
		p.Kill()
		return nil, err
	}
	log.Debug("plugin started", "kind", cfg.Kind, "path", path, "pid", p.Pid())
	return p, nil
}

// checkKind asks the plugin which kind it is: an executable named
// krun-plugin-K that serves another kind (a copy under a wrong name, a
// plugin installed over another) is refused before it is configured.
func (p *Plugin) checkKind() error {
	d, err := p.Describe(context.Background())
	if err != nil {
		return err
	}
	if d.Kind != p.kind {
		return fmt.Errorf("plugin %s: %s reports kind %q; a plugin's executable must be named %s, refused",
			p.kind, p.path, oneLine(d.Kind), ExecutableName(oneLine(d.Kind)))
	}
	return nil
}

func (p *Plugin) startError(err error, took, timeout time.Duration) error {
	if p.run == nil { // the runner was never built (sandbox, pipes)
		return fmt.Errorf("plugin %s: %s", p.kind, oneLine(err.Error()))
	}
	if p.run.pid == 0 { // exec failed
		return fmt.Errorf("plugin %s: start %s: %w", p.kind, p.path, p.run.ExitErr())
	}
	if strings.HasPrefix(err.Error(), SandboxErrPrefix) {
		return fmt.Errorf("plugin %s: %s", p.kind, oneLine(err.Error()))
	}
	// go-plugin reports an exit before the handshake line either directly
	// or as an empty "unrecognized" line (stdout hit EOF).
	msg := err.Error()
	const unrecognized = "Unrecognized remote plugin message: "
	exited := strings.Contains(msg, "plugin exited before we could connect") ||
		msg == unrecognized || strings.HasPrefix(msg, unrecognized+"\n")
	if exited {
		t := time.NewTimer(2 * time.Second)
		defer t.Stop()
		select {
		case <-p.run.done:
			return &ExitError{Kind: p.kind, Pid: p.run.pid, Op: "handshake", Status: p.run.waitErr, Detail: p.detail(nil)}
		case <-t.C:
		}
	}
	if took >= timeout {
		return fmt.Errorf("plugin %s: %w: %s did not complete the handshake within %v", p.kind, ErrHandshakeTimeout, p.path, timeout)
	}
	return fmt.Errorf("plugin %s: handshake: %s", p.kind, oneLine(msg))
}

// detail is the plugin's panic line, or else the first line of err.
func (p *Plugin) detail(err error) string {
	if l := p.stderr.PanicLine(); l != "" {
		return oneLine(l)
	}
	if err != nil {
		return oneLine(err.Error())
	}
	return ""
}

func oneLine(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' || s[i] == '\r' {
			return s[:i]
		}
	}
	return s
}

func logLevel(l hclog.Logger) hclog.Level {
	if lv := l.GetLevel(); lv != hclog.NoLevel {
		return lv
	}
	return hclog.Info
}

// Kind is the plugin kind.
func (p *Plugin) Kind() string { return p.kind }

// Path is the plugin executable.
func (p *Plugin) Path() string { return p.path }

// Pid is the plugin's process id.
func (p *Plugin) Pid() int {
	if p.run == nil {
		return 0
	}
	return p.run.pid
}

// socketGrouper is implemented by a Sandboxer whose plugins run as other
// ids than the launcher's (sandbox.LaunchConfig).
type socketGrouper interface {
	JoinSocketGroup() (pluginName string, err error)
}

// SocketDir is the private directory holding the plugin's gRPC socket.
func (p *Plugin) SocketDir() string { return p.sockDir }

// Done is closed when the plugin process has exited.
func (p *Plugin) Done() <-chan struct{} { return p.run.done }

// Err is nil while the plugin runs and after an exit the host asked for
// (Shutdown, Kill); otherwise it is the *ExitError of the unexpected exit.
func (p *Plugin) Err() error {
	select {
	case <-p.run.done:
	default:
		return nil
	}
	if p.stopping.Load() {
		return nil
	}
	return p.exitError("running")
}

func (p *Plugin) exitError(op string) error {
	return &ExitError{Kind: p.kind, Pid: p.run.pid, Op: op, Status: p.run.ExitErr(), Detail: p.detail(nil)}
}

// call runs one RPC with the RPC timeout and turns failures into errors
// that name the plugin; a plugin that died is reported as an *ExitError.
func (p *Plugin) call(ctx context.Context, op string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, p.rpcTimeout)
	defer cancel()
	err := f(ctx)
	if err == nil {
		return nil
	}
	select {
	case <-p.run.done:
		return p.exitError(op)
	default:
	}
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable, codes.Canceled, codes.Internal:
		// The connection broke; the process is most likely on its way out.
		t := time.NewTimer(2 * time.Second)
		defer t.Stop()
		select {
		case <-p.run.done:
			return p.exitError(op)
		case <-t.C:
		}
	case codes.DeadlineExceeded:
		if ctx.Err() != nil {
			return fmt.Errorf("plugin %s (pid %d): %s: no answer in time: %w", p.kind, p.Pid(), op, context.DeadlineExceeded)
		}
	}
	return fmt.Errorf("plugin %s: %s: %s", p.kind, op, oneLine(st.Message()))
}

// DeviceInfo is the virtio device a plugin serves.
type DeviceInfo struct {
	Type             uint32
	Features         uint64
	ProtocolFeatures uint64
	NumQueues        int
	MaxQueueSize     int
	Config           []byte
}

func deviceInfo(d *pluginpb.DeviceInfo) *DeviceInfo {
	if d == nil {
		return nil
	}
	return &DeviceInfo{
		Type: d.GetDeviceType(), Features: d.GetFeatures(), ProtocolFeatures: d.GetProtocolFeatures(),
		NumQueues: int(d.GetNumQueues()), MaxQueueSize: int(d.GetMaxQueueSize()), Config: d.GetConfig(),
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
	if v, ok := p.sandbox.(verifier); ok && !p.sandboxOff {
		if err := v.Verify(p.Pid()); err != nil {
			p.Kill()
			return nil, "", fmt.Errorf("plugin %s (pid %d) is not confined after Configure, killed it: %w", p.kind, p.Pid(), err)
		}
	}
	return deviceInfo(r.GetDevice()), r.GetSandbox(), nil
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

// Health returns the serving state and, for a failed back-end, its error.
func (p *Plugin) Health(ctx context.Context) (HealthState, string, error) {
	var r *pluginpb.HealthResponse
	err := p.call(ctx, "Health", func(ctx context.Context) (err error) {
		r, err = p.rpc.Health(ctx, &pluginpb.HealthRequest{})
		return err
	})
	if err != nil {
		return 0, "", err
	}
	return r.GetState(), r.GetError(), nil
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

// Kill ends the plugin without a flush and removes its socket directory.
func (p *Plugin) Kill() {
	p.stopping.Store(true)
	if p.run != nil {
		_ = p.run.Kill(context.Background())
	}
	p.close()
}

func (p *Plugin) close() {
	p.closeOnce.Do(func() {
		p.client.Kill() // graceful go-plugin stop, SIGKILL after 2 s
		p.removeSockDir()
		p.log.Debug("plugin stopped", "kind", p.kind, "pid", p.Pid())
	})
}

func (p *Plugin) removeSockDir() {
	if p.sockDir != "" {
		if err := os.RemoveAll(p.sockDir); err != nil {
			p.log.Warn("removing plugin socket directory", "dir", p.sockDir, "error", err)
		}
	}
}

// quietLogger is the logger go-plugin's client gets: the messages it logs
// about an exit the host asked for (Shutdown, Kill) go to Debug instead of
// Error and Warn, so that they do not read like failures, and so does its
// line about an exit nobody asked for: the host reports that one itself,
// once, with the plugin's panic line (Err, ExitError) and what it does
// about it (a restart, a failed device). Everything else passes unchanged,
// except the plugin's own log lines: the host re-logs those itself
// (pluginLog), so go-plugin's copy goes nowhere (Named).
type quietLogger struct {
	hclog.Logger
	p *Plugin
}

// offLogger is switched off: go-plugin does not even parse the lines it
// would log there.
var offLogger = hclog.New(&hclog.LoggerOptions{Level: hclog.Off, Output: io.Discard})

// Named is how go-plugin gets the logger it re-logs the plugin's stderr
// into (named after the executable); "stdio" is its gRPC stdio channel.
func (q quietLogger) Named(name string) hclog.Logger {
	if name == "stdio" {
		return q.Logger.Named(name)
	}
	return offLogger
}

func (q quietLogger) Error(msg string, args ...interface{}) {
	if msg == "plugin process exited" {
		q.Logger.Debug(msg, args...)
		return
	}
	q.Logger.Error(msg, args...)
}

func (q quietLogger) Warn(msg string, args ...interface{}) {
	if msg == "plugin failed to exit gracefully" && q.p.stopping.Load() {
		q.Logger.Debug(msg, args...)
		return
	}
	q.Logger.Warn(msg, args...)
}

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
