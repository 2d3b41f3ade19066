package pluginhost

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"context"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/go-plugin/runner"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/sandbox"
)

// ProcessConfig describes the start of one plugin process, whatever gRPC
// service it serves: device plugins (Launch, the DevicePlugin service) and
// the image tool's krun-plugin-img (imgtool, the ImageTool service) both
// start through StartProcess, with the same environment, sandbox, socket
// directory, logging and error reports.
type ProcessConfig struct {
	// Kind is the plugin kind: the executable is krun-plugin-<Kind>, and
	// messages name the process "plugin <Kind>".
	Kind string
	// Path is the executable; "" finds it with Find(Kind, SearchPath(PluginDir)).
	Path      string
	PluginDir string
	// Files are fd 3, 4, ... in the plugin, in order. The caller keeps its
	// copies.
	Files []*os.File

	// Sandbox applies the launcher-side sandbox. It must be set unless
	// SandboxOff is the user's explicit opt-out.
	Sandbox    Sandboxer
	SandboxOff bool

	// Logger receives the host's messages about the plugin and the
	// plugin's own log lines (JSON on its stderr), re-logged under the
	// name krun-plugin-<Kind>.
	Logger hclog.Logger
	// HandshakeTimeout bounds process start + go-plugin handshake
	// (DefaultHandshakeTimeout if 0).
	HandshakeTimeout time.Duration
	// SocketBaseDir is where the private gRPC socket directory is made;
	// "" means os.TempDir().
	SocketBaseDir string
	// Env is extra environment for the plugin. The host's own environment
	// is never passed on.
	Env []string

	// Handshake is the service's go-plugin handshake, Service the name it
	// is dispensed under and NewClient its gRPC client stub.
	Handshake plugin.HandshakeConfig
	Service   string
	NewClient func(*grpc.ClientConn) any
	// DialOptions are extra gRPC dial options (message size limits).
	DialOptions []grpc.DialOption
	// ExecHint is the question a failed handshake asks (ProcRunner's
	// Diagnose); "" asks whether the binary is a plugin with a matching
	// pluginsdk.
	ExecHint string
}

// Process is a running plugin process and its gRPC connection.
type Process struct {
	kind    string
	path    string
	log     hclog.Logger
	client  *plugin.Client
	stub    any
	run     *ProcRunner
	sockDir string
	// sockLock holds an exclusive flock on sockDir while it exists, which
	// tells a later launch that the directory is in use (sweepSockDirs).
	sockLock *os.File
	// sockGone: sockDir was removed (once connected, or by close).
	sockGone bool
	stderr   *TailBuffer
	// sandboxed: launched with a launcher-side sandbox, whose rlimits
	// cap the plugin's private memory (detail's hint).
	sandboxed bool

	stopping  atomic.Bool // Kill (or a Shutdown) was asked for
	closeOnce sync.Once
	// stdoutErr is why go-plugin stopped reading the plugin's stdout
	// before the handshake line (a line over 64 KiB, a handshake the
	// runner refused), if it did.
	stdoutErr atomic.Pointer[error]
	// stdioLog spaces go-plugin's warnings about the plugin's stdio
	// stream, which the plugin can cause at will.
	stdioLog ratelog.Limiter
	// conns are the gRPC client's connections to the plugin (dial), so
	// that a launch past its deadline can close them.
	connMu sync.Mutex
	conns  []net.Conn
}

// clientPlugin is the host half of go-plugin's GRPCPlugin for any service.
type clientPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	newClient func(*grpc.ClientConn) any
}

func (clientPlugin) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("pluginhost: the host does not serve plugins")
}

func (c clientPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, conn *grpc.ClientConn) (interface{}, error) {
	return c.newClient(conn), nil
}

// StartProcess starts the plugin process with cfg.Files as fd 3, 4, ...,
// completes the go-plugin handshake and connects the gRPC client (Stub).
// The caller must end the process with Kill.
func StartProcess(cfg ProcessConfig) (*Process, error) {
	return StartProcessContext(context.Background(), cfg)
}

// StartProcessContext is StartProcess that ctx can end while the process
// starts (up to the handshake's timeout for a plugin that hangs): the
// process is killed then, and the error wraps ctx's. Once it returned,
// ctx no longer matters to the process.
func StartProcessContext(ctx context.Context, cfg ProcessConfig) (_ *Process, err error) {
	if err := CheckKind(cfg.Kind); err != nil {
		return nil, err
	}
	if cfg.Sandbox == nil && !cfg.SandboxOff {
		return nil, fmt.Errorf("plugin %s: no launcher-side sandbox configured (set Sandbox, or SandboxOff for an explicit opt-out)", cfg.Kind)
	}
	if cfg.NewClient == nil || cfg.Service == "" {
		return nil, fmt.Errorf("plugin %s: no gRPC service to connect to", cfg.Kind)
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
	p := &Process{kind: cfg.Kind, path: path, log: log, stderr: &TailBuffer{}, sandboxed: !cfg.SandboxOff && cfg.Sandbox != nil}

	// The private directory: go-plugin puts its own socket directory (and
	// the plugin its gRPC socket) inside it; removed when the process ends.
	base, where := cfg.SocketBaseDir, ""
	if base == "" {
		base, where = os.TempDir(), "$TMPDIR "
	}
	p.sockDir, p.sockLock, err = newSockDir(base, cfg.Kind, log)
	if err != nil {
		if where != "" {
			return nil, fmt.Errorf("plugin %s: private socket directory in $TMPDIR (%s): %w; set TMPDIR to an existing directory this user may write", cfg.Kind, base, err)
		}
		return nil, fmt.Errorf("plugin %s: private socket directory: %w", cfg.Kind, err)
	}
	// go-plugin adds "/plugin-dirNNNNNNNNNN/pluginNNNNNNNNNN" (at most 39
	// bytes), the host reaches a sandboxed plugin's socket through
	// "/proc/PID/root" (at most 18), and a unix socket path has room for
	// 107. The directory's name has a fixed width (newSockDir), so the
	// same base fits every time or never.
	const sockDirRoom = 107 - 39 - 18
	if len(p.sockDir) > sockDirRoom {
		p.removeSockDir()
		clean := filepath.Clean(base)
		room := sockDirRoom - (len(p.sockDir) - len(clean))
		hint := ""
		if where != "" {
			hint = " (TMPDIR=/tmp)"
		}
		return nil, fmt.Errorf("plugin %s: socket directory %s is too long for a unix socket path: %s%s has %d bytes, at most %d fit for this plugin; use a shorter one%s",
			cfg.Kind, p.sockDir, where, clean, len(clean), max(room, 0), hint)
	}

	// A root launcher shares a group with its plugin for the plugin's
	// socket, so it can reach a plugin it starts again after dropping its
	// capabilities (sandbox.LaunchConfig.SocketGroup).
	sockGroup := ""
	if sg, ok := cfg.Sandbox.(socketGrouper); ok && !cfg.SandboxOff {
		if sockGroup, err = sg.JoinSocketGroup(); err != nil {
			p.removeSockDir()
			return nil, fmt.Errorf("plugin %s: %w", cfg.Kind, err)
		}
	}

	extra := append([]*os.File(nil), cfg.Files...)
	// unwatch stops the start's context from killing the process once
	// the start is over (nil until the process was started: set by the
	// runner, which go-plugin's Start calls on this goroutine).
	var unwatch func() bool
	runnerFunc := func(_ hclog.Logger, spec *exec.Cmd, _ string) (runner.Runner, error) {
		cmd := exec.Command(path)
		// spec.Env holds go-plugin's variables only (SkipHostEnv), the
		// socket directory last.
		cmd.Env = append(append([]string(nil), spec.Env...),
			EnvKind+"="+cfg.Kind, EnvLogLevel+"="+logLevel(log).String())
		cmd.Env = append(cmd.Env, cfg.Env...)
		cmd.ExtraFiles = extra
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		var afterStart func()
		if cfg.Sandbox != nil && !cfg.SandboxOff {
			var err error
			if sa, ok := cfg.Sandbox.(startAware); ok {
				afterStart, err = sa.ApplyUntilStarted(cmd)
			} else {
				err = cfg.Sandbox.Apply(cmd)
			}
			if err != nil {
				return nil, fmt.Errorf("%s %w", SandboxErrPrefix, err)
			}
		} else {
			// A session of its own, as the trampoline makes one: a
			// signal to krun-core's process group (^C, timeout(1),
			// systemd's control-group kill) is krun-core's to act on,
			// by shutting the plugin down, not the plugin's to die of
			// first (found in review, helper-102).
			cmd.SysProcAttr.Setsid = true
		}
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
		r, err := NewProcRunner(cmd, cfg.ExecHint)
		if err != nil {
			if afterStart != nil {
				afterStart() // never started: the sandbox's files are closed
			}
			return nil, err
		}
		r.afterStart = func() {
			if afterStart != nil {
				afterStart()
			}
			// Started or not: a kill of a process that never started
			// does nothing. Stopped once the start is over.
			unwatch = context.AfterFunc(ctx, func() {
				r.MarkStopping()
				_ = r.Kill(context.Background())
			})
		}
		p.run = r
		return r, nil
	}
	budget := newLogBudget() // its stderr's and its stdio stream's lines
	stderrOf := func() io.Writer {
		return io.MultiWriter(p.stderr, newPluginLog(log.Named(ExecutableName(cfg.Kind)), cfg.Kind, budget))
	}
	p.client = plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  cfg.Handshake,
		Plugins:          plugin.PluginSet{cfg.Service: clientPlugin{newClient: cfg.NewClient}},
		RunnerFunc:       runnerFunc,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		StartTimeout:     hsTimeout,
		Logger:           quietLogger{log, p},
		Stderr:           stderrOf(),
		// Once go-plugin's server runs, the plugin's os.Stderr is a pipe
		// into its stdio stream: its lines are the plugin's log too (a
		// writer of their own: each splits its stream into lines).
		SyncStderr:       stderrOf(),
		SkipHostEnv:      true,
		UnixSocketConfig: &plugin.UnixSocketConfig{TempDir: p.sockDir, Group: sockGroup},
		// No idle mode: an idle channel closes its connection and dials
		// the socket again at the next RPC, and the socket's path is
		// gone once the host is connected (go-plugin's stdio and broker
		// streams keep the channel busy anyway, but a plugin can end
		// them).
		GRPCDialOptions: append([]grpc.DialOption{
			grpc.WithIdleTimeout(0),
			// A failed RPC's status message comes in HTTP/2 trailers,
			// which the reply size limit does not cover (gRPC's default
			// is 16 MiB of headers).
			grpc.WithMaxHeaderListSize(maxHeaderListBytes),
			grpc.WithChainStreamInterceptor(refuseBroker),
			grpc.WithContextDialer(p.dial), // after go-plugin's own: this one is used
		}, cfg.DialOptions...),
	})

	start := time.Now()
	defer func() {
		if unwatch != nil {
			unwatch()
		}
	}()
	if _, err := p.client.Start(); err != nil {
		// Why first, while the plugin has not been killed: a kill would
		// read as the plugin's own exit.
		err = p.startError(err, time.Since(start), hsTimeout)
		if ctx.Err() != nil {
			err = fmt.Errorf("plugin %s: start abandoned: %w", cfg.Kind, context.Cause(ctx))
		}
		// The host ends it: go-plugin's "failed to exit gracefully" would
		// be a second, misleading line beside the error.
		p.stopping.Store(true)
		p.client.Kill()
		p.removeSockDir()
		return nil, err
	}
	if stuck, err := p.connect(ctx, cfg.Service, start, hsTimeout); err != nil {
		if stuck {
			// go-plugin's Client still holds its lock (which its Kill
			// takes): the process is dead and the connections closed,
			// so it returns in the end; it is stopped then.
			p.removeSockDir()
			go p.close()
		} else {
			p.Kill()
		}
		return nil, fmt.Errorf("plugin %s: connect: %w", cfg.Kind, err)
	}
	// The directory was needed for the connection only, which is made: a
	// sandboxed plugin's socket lives in its own root anyway, and nothing
	// dials it again (the channel has no idle mode, the host uses no
	// go-plugin broker, a restart is a new StartProcess). Removed now, it is not left in $TMPDIR by a host
	// that is killed (SIGKILL, the OOM killer), one per plugin (found in
	// review).
	p.removeSockDir()
	return p, nil
}

// connect makes go-plugin's gRPC client and the service's stub, by the
// deadline. go-plugin's Client opens its stdio stream with a context that
// ends only with the process, so a plugin that completed the handshake and
// then allows no HTTP/2 stream (SETTINGS_MAX_CONCURRENT_STREAMS 0) would
// hold it, and the host's launch, for good (found in review): past the
// deadline the process is killed and the host's connections to it closed
// (the plugin may have handed its end of one to another process, over its
// vhost-user socket, so that it outlives it). stuck: Client has still not
// returned, even so; the caller must not wait for it.
func (p *Process) connect(ctx context.Context, service string, start time.Time, timeout time.Duration) (stuck bool, err error) {
	deadline := start.Add(timeout)
	done := make(chan error, 1)
	go func() {
		raw, err := p.client.Client()
		if err == nil {
			p.stub, err = raw.Dispense(service)
		}
		if gc, ok := raw.(*plugin.GRPCClient); ok && err == nil {
			// go-plugin dials without blocking, and takes a failure to
			// open its first stream (stdio) as a plugin without one: the
			// connection may still be on its way, and needs the socket.
			err = waitReady(gc.Conn, deadline, p.run.done)
		}
		done <- err
	}()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case err := <-done:
		if err != nil && ctx.Err() != nil {
			return false, fmt.Errorf("start abandoned: %w", context.Cause(ctx))
		}
		if err != nil && errors.Is(err, errExitedConnecting) {
			return false, p.exitError("handshake")
		}
		return false, err
	case <-t.C:
	}
	// Not p.Kill: go-plugin's Kill takes the lock its Client holds.
	p.stopping.Store(true)
	p.run.MarkStopping()
	_ = p.run.Kill(context.Background())
	p.closeConns()
	err = fmt.Errorf("%w: no gRPC connection within %v of the start (the plugin accepts no gRPC stream); the host stopped it", ErrHandshakeTimeout, timeout)
	select {
	case <-done:
		return false, err
	case <-time.After(closeGrace):
		return true, err
	}
}

// dial connects the gRPC client to the plugin's socket (go-plugin's own
// dialer does the same), keeping the connection for closeConns.
func (p *Process) dial(ctx context.Context, _ string) (net.Conn, error) {
	addr := p.run.HostAddr()
	if addr == "" {
		return nil, errors.New("the plugin has announced no address")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		return nil, err
	}
	p.connMu.Lock()
	p.conns = append(p.conns, c)
	p.connMu.Unlock()
	return c, nil
}

// closeConns closes the gRPC client's connections to the plugin.
func (p *Process) closeConns() {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// errExitedConnecting is waitReady's error when the plugin process
// exited first.
var errExitedConnecting = errors.New("the plugin exited before its gRPC connection was made")

// waitReady waits until conn is connected, at most until deadline; past
// it the error matches ErrHandshakeTimeout. It gives up as soon as exited
// is closed (the plugin process is gone: nothing will ever accept the
// connection), with errExitedConnecting: a plugin killed between its
// handshake line and the connection held a restart, and the device, for
// the whole deadline (a minute in krun-core; found in review, helper-126).
func waitReady(conn *grpc.ClientConn, deadline time.Time, exited <-chan struct{}) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		st := conn.GetState()
		switch st {
		case connectivity.Ready:
			return nil
		case connectivity.Idle:
			conn.Connect()
		case connectivity.Shutdown:
			return errors.New("gRPC connection closed")
		}
		if !conn.WaitForStateChange(ctx, st) {
			select {
			case <-exited:
				return errExitedConnecting
			default:
			}
			// The handshake's deadline, as connect's own timer says it:
			// whichever of the two fires first, the error matches
			// ErrHandshakeTimeout.
			return fmt.Errorf("%w: no gRPC connection by the handshake's deadline (the connection stayed %v)", ErrHandshakeTimeout, st)
		}
	}
}

func (p *Process) startError(err error, took, timeout time.Duration) error {
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
	if why := p.stdoutErr.Load(); why != nil && strings.HasPrefix(msg, unrecognized) {
		// go-plugin stopped reading stdout, then killed the plugin.
		var refused *handshakeRefused
		if errors.As(*why, &refused) {
			return fmt.Errorf("plugin %s: handshake: %s; the host stopped it", p.kind, refused.why)
		}
		return fmt.Errorf("plugin %s: handshake: its stdout could not be read before the handshake line (%s: a line over 64 KiB?); the host stopped it", p.kind, oneLine((*why).Error()))
	}
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
	if line, ok := strings.CutPrefix(msg, unrecognized); ok && !exited && strings.TrimSpace(line) != "" {
		// A line of the plugin's own on stdout, go-plugin's handshake
		// channel (a print in its init or main).
		return fmt.Errorf("plugin %s: handshake: the plugin wrote %q to stdout, which is go-plugin's handshake channel (log to stderr or through the SDK's logger instead)", p.kind, oneLine(strings.TrimSpace(line)))
	}
	return fmt.Errorf("plugin %s: handshake: %s", p.kind, oneLine(msg))
}

// detail is the plugin's panic line, or else the first line of err.
func (p *Process) detail(err error) string {
	if l := p.stderr.PanicLine(); l != "" {
		return oneLine(l) + p.memoryHint(l) + threadHint(l)
	}
	if err != nil {
		return oneLine(err.Error())
	}
	return ""
}

// memoryHint says, after the Go runtime's out-of-memory line of a
// sandboxed plugin, that the sandbox's RLIMIT_DATA is the likely limit:
// the line alone ("fatal error: runtime: out of memory") reads as the
// host's memory, which a plugin author then looks for in vain.
func (p *Process) memoryHint(line string) string {
	if !p.sandboxed || !strings.Contains(line, "out of memory") && !strings.Contains(line, "cannot allocate memory") {
		return ""
	}
	return fmt.Sprintf(" (the sandbox caps a plugin's private memory, RLIMIT_DATA, %d MiB by default: docs/PLUGINS.md, Limits)", sandbox.DefaultDataBytes>>20)
}

// threadHint says, after the Go runtime's line for a thread it could not
// create ("fatal error: newosproc"), which limit that is: the line alone,
// followed by the runtime's stack dump, names none (found in review,
// helper-143: a deployment's low ulimit -u or pids.max).
func threadHint(line string) string {
	if !strings.Contains(line, "newosproc") && !strings.Contains(line, "failed to create new OS thread") {
		return ""
	}
	lim := ""
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NPROC, &rl) == nil && rl.Cur != unix.RLIM_INFINITY {
		lim = fmt.Sprintf(", %d here", rl.Cur)
	}
	return " (the plugin could not start a thread: the limit on its user's processes and threads, RLIMIT_NPROC (ulimit -u" + lim +
		"), or the control group's pids.max is reached; raise it)"
}

// Stub is the gRPC client (ProcessConfig.NewClient's value).
func (p *Process) Stub() any { return p.stub }

// Kind is the plugin kind.
func (p *Process) Kind() string { return p.kind }

// Path is the plugin executable.
func (p *Process) Path() string { return p.path }

// Pid is the plugin's process id.
func (p *Process) Pid() int {
	if p.run == nil {
		return 0
	}
	return p.run.pid
}

// SocketDir is the private directory that held the plugin's gRPC socket
// until the host connected to it (it is removed then).
func (p *Process) SocketDir() string { return p.sockDir }

// Done is closed when the plugin process has exited.
func (p *Process) Done() <-chan struct{} { return p.run.done }

// Err is nil while the plugin runs and after an exit the host asked for
// (Kill, a device plugin's Shutdown); otherwise it is the *ExitError of
// the unexpected exit.
func (p *Process) Err() error {
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

func (p *Process) exitError(op string) error {
	return &ExitError{Kind: p.kind, Pid: p.run.pid, Op: op, Status: p.run.ExitErr(), Detail: p.detail(nil)}
}

// Exited tells whether an RPC failed (with err) because the process died:
// it returns the *ExitError naming op when the process has exited, or
// exits within 2 s of an error that says the connection broke; nil when the
// process lives on, and the caller words err itself.
func (p *Process) Exited(op string, err error) error {
	select {
	case <-p.run.done:
		return p.exitError(op)
	default:
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.Canceled, codes.Internal, codes.Unknown:
		// The connection broke; the process is most likely on its way out.
		t := time.NewTimer(2 * time.Second)
		defer t.Stop()
		select {
		case <-p.run.done:
			return p.exitError(op)
		case <-t.C:
		}
	}
	return nil
}

// Kill ends the plugin at once (SIGKILL) and removes its socket directory.
func (p *Process) Kill() {
	p.stopping.Store(true)
	if p.run != nil {
		p.run.MarkStopping()
		_ = p.run.Kill(context.Background())
	}
	p.close()
}

// closeGrace bounds how long close waits for go-plugin's graceful stop
// (the plugin lingers up to 2 s after its Shutdown for it, and go-plugin
// waits 2 s more before it kills).
const closeGrace = 5 * time.Second

// close stops go-plugin's client (which waits for the process) and removes
// the socket directory, once.
func (p *Process) close() {
	p.closeOnce.Do(func() {
		// go-plugin's Kill asks the plugin to stop (its controller's
		// Shutdown) and kills it 2 s after an answer; but that request
		// has no deadline, and a plugin that never answers (it may be
		// compromised) would hold it, and the core, for good.
		done := make(chan struct{})
		go func() {
			p.client.Kill()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(closeGrace):
			p.log.Warn("plugin did not stop; killing it", "kind", p.kind, "pid", p.Pid())
			if p.run != nil {
				_ = p.run.Kill(context.Background())
			}
			<-done // the request ends with the process
		}
		p.removeSockDir()
		p.log.Debug("plugin stopped", "kind", p.kind, "pid", p.Pid())
	})
}

// removeSockDir removes the socket directory, once: after that the name is
// free in a shared $TMPDIR, and what another user makes there is not ours.
func (p *Process) removeSockDir() {
	if p.sockDir != "" && !p.sockGone {
		p.sockGone = true
		if err := os.RemoveAll(p.sockDir); err != nil {
			p.log.Warn("removing plugin socket directory", "dir", p.sockDir, "error", err)
		}
		if p.sockLock != nil {
			p.sockLock.Close() // unlocked once the directory is gone
		}
	}
}

// maxHeaderListBytes bounds the HTTP/2 headers and trailers of a plugin's
// reply (a failed RPC's status message travels there).
const maxHeaderListBytes = 64 << 10

// maxStatusMessage bounds the part of a failed RPC's status message that
// goes into the error (the log, the user's terminal).
const maxStatusMessage = 4 << 10

// brokerStream is go-plugin's broker stream, which its client opens to
// every plugin. krun-core brokers no connections, and a plugin that knocks
// for new service ids makes go-plugin keep each message for the plugin's
// life: the stream is refused.
const brokerStream = "/plugin.GRPCBroker/StartStream"

func refuseBroker(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if method == brokerStream {
		return nil, status.Error(codes.Unimplemented, "krun-core uses no go-plugin broker")
	}
	return streamer(ctx, desc, cc, method, opts...)
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
	p *Process
}

// offLogger is switched off: go-plugin does not even parse the lines it
// would log there.
var offLogger = hclog.New(&hclog.LoggerOptions{Level: hclog.Off, Output: io.Discard})

// Named is how go-plugin gets the logger it re-logs the plugin's stderr
// into (named after the executable); "stdio" is its gRPC stdio channel.
func (q quietLogger) Named(name string) hclog.Logger {
	if name == "stdio" {
		// It warns for every message on a channel it does not know,
		// which a compromised plugin can send in a loop.
		return spacedLogger{q.Logger.Named(name), &q.p.stdioLog}
	}
	return offLogger
}

// spacedLogger passes its warnings and errors through a ratelog.Limiter:
// the first, then one every ratelog.DefaultEvery with the count of those
// dropped in between (not logged at all, at no level).
type spacedLogger struct {
	hclog.Logger
	limit *ratelog.Limiter
}

func (l spacedLogger) Warn(msg string, args ...interface{}) {
	l.limit.Log(l.Logger, hclog.Warn, msg, args...)
}

func (l spacedLogger) Error(msg string, args ...interface{}) {
	l.limit.Log(l.Logger, hclog.Error, msg, args...)
}

func (q quietLogger) Error(msg string, args ...interface{}) {
	if msg == "plugin process exited" {
		q.Logger.Debug(msg, args...)
		return
	}
	if msg == "error encountered while scanning stdout" {
		// The launch's error says it, once. args is "error", the error.
		why := errors.New(msg)
		if len(args) > 0 {
			if err, ok := args[len(args)-1].(error); ok {
				why = err
			} else {
				why = errors.New(fmt.Sprint(args[len(args)-1]))
			}
		}
		q.p.stdoutErr.Store(&why)
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
