package imgtool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/go-plugin/runner"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// Sandboxer is the launcher-side sandbox (sandbox.LaunchConfig).
type Sandboxer interface {
	Apply(cmd *exec.Cmd) error
}

// Optional methods of a Sandboxer; sandbox.LaunchConfig has both.
type (
	limitApplier interface{ ApplyLimits(pid int) error }
	verifier     interface{ Verify(pid int) error }
)

// DefaultHandshakeTimeout bounds the plugin's start.
const DefaultHandshakeTimeout = 10 * time.Second

// Launcher starts krun-plugin-img for each command.
type Launcher struct {
	// PluginPath is the plugin executable; "" finds krun-plugin-img with
	// pluginhost.Find in pluginhost.SearchPath(PluginDir).
	PluginPath string
	PluginDir  string
	// Sandbox is the launcher-side sandbox; it must be set unless
	// SandboxOff is the user's explicit opt-out.
	Sandbox    Sandboxer
	SandboxOff bool
	// Logger receives the host's and the plugin's log lines.
	Logger           hclog.Logger
	HandshakeTimeout time.Duration
	// ForceShare opens the files a command only reads without excluding
	// writers (qemu-img -U): such a command works on an image another
	// process writes, and may see it inconsistent. Without it, files are
	// locked as QEMU locks them (disk/imagelock).
	ForceShare bool
}

// file is one fd handed to the plugin.
type file struct {
	name string
	f    *os.File
}

// session is one running plugin process with its files opened.
type session struct {
	client *plugin.Client
	rpc    imagepb.ImageToolClient
	run    *pluginhost.ProcRunner
	dir    string
	tail   *pluginhost.TailBuffer
	once   sync.Once
}

// imageClient is the host half of go-plugin's GRPCPlugin.
type imageClient struct{ plugin.NetRPCUnsupportedPlugin }

func (imageClient) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("imgtool: the host does not serve plugins")
}

func (imageClient) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return imagepb.NewImageToolClient(c), nil
}

// maxMessage bounds gRPC replies (a snapshot list can be long).
const maxMessage = 64 << 20

// start launches the plugin with files as fd 3, 4, ..., names them with
// Open (the plugin restricts itself there) and checks the confinement from
// outside. The caller keeps its copies of the files and must close the
// session.
func (l *Launcher) start(ctx context.Context, files []file) (_ *session, err error) {
	if l.Sandbox == nil && !l.SandboxOff {
		return nil, errors.New("no launcher-side sandbox configured")
	}
	if len(files) > imagepb.MaxFiles {
		return nil, fmt.Errorf("%d files, at most %d", len(files), imagepb.MaxFiles)
	}
	path := l.PluginPath
	if path == "" {
		if path, err = pluginhost.Find(imagepb.Kind, pluginhost.SearchPath(l.PluginDir)); err != nil {
			return nil, err
		}
	}
	log := l.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	timeout := l.HandshakeTimeout
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	s := &session{tail: &pluginhost.TailBuffer{}}
	s.dir, err = os.MkdirTemp("", "krun-img-")
	if err != nil {
		return nil, fmt.Errorf("private socket directory: %w", err)
	}
	// go-plugin adds at most 39 bytes, the host reaches a sandboxed
	// plugin's socket through "/proc/PID/root" (at most 18 more), and a
	// unix socket path has room for 107.
	if len(s.dir)+39+18 > 107 {
		os.RemoveAll(s.dir)
		return nil, fmt.Errorf("socket directory %s is too long for a unix socket path (use a shorter TMPDIR)", s.dir)
	}
	extra := make([]*os.File, len(files))
	names := make(map[string]uint32, len(files))
	for i, f := range files {
		extra[i] = f.f
		names[f.name] = uint32(imagepb.FirstFD + i)
	}
	runnerFunc := func(_ hclog.Logger, spec *exec.Cmd, _ string) (runner.Runner, error) {
		cmd := exec.Command(path)
		cmd.Env = append(append([]string(nil), spec.Env...),
			pluginhost.EnvKind+"="+imagepb.Kind, pluginhost.EnvLogLevel+"="+level(log).String())
		cmd.ExtraFiles = extra
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if l.Sandbox != nil && !l.SandboxOff {
			if err := l.Sandbox.Apply(cmd); err != nil {
				return nil, fmt.Errorf("%s %w", pluginhost.SandboxErrPrefix, err)
			}
		}
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
		r, err := pluginhost.NewProcRunner(cmd, "is "+path+" krun-plugin-img built from the same krun-core?")
		if err != nil {
			return nil, err
		}
		if la, ok := l.Sandbox.(limitApplier); ok && !l.SandboxOff {
			r.SetPostStart(la.ApplyLimits)
		}
		s.run = r
		return r, nil
	}
	s.client = plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  imagepb.Handshake(),
		Plugins:          plugin.PluginSet{imagepb.PluginName: imageClient{}},
		RunnerFunc:       runnerFunc,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		StartTimeout:     timeout,
		Logger:           log,
		Stderr:           s.tail,
		SkipHostEnv:      true,
		UnixSocketConfig: &plugin.UnixSocketConfig{TempDir: s.dir},
		GRPCDialOptions:  []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage))},
	})
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if _, err := s.client.Start(); err != nil {
		return nil, s.startError(err)
	}
	raw, err := s.client.Client()
	if err != nil {
		return nil, fmt.Errorf("plugin img: connect: %w", err)
	}
	d, err := raw.Dispense(imagepb.PluginName)
	if err != nil {
		return nil, fmt.Errorf("plugin img: connect: %w", err)
	}
	s.rpc = d.(imagepb.ImageToolClient)
	if err := s.call(ctx, "Open", func(ctx context.Context) error {
		_, err := s.rpc.Open(ctx, &imagepb.OpenRequest{Files: names, SandboxOff: l.SandboxOff})
		return err
	}); err != nil {
		return nil, err
	}
	if v, ok := l.Sandbox.(verifier); ok && !l.SandboxOff {
		if err := v.Verify(s.run.Pid()); err != nil {
			return nil, fmt.Errorf("plugin img (pid %d) is not confined, killed it: %w", s.run.Pid(), err)
		}
	}
	return s, nil
}

func level(l hclog.Logger) hclog.Level {
	if lv := l.GetLevel(); lv != hclog.NoLevel {
		return lv
	}
	return hclog.Info
}

// close ends the plugin process and removes its socket directory. The
// process is killed outright: every operation has synced its output before
// it replied, and go-plugin's graceful shutdown would have the plugin
// remove its socket file, a system call its sandbox refuses (and logs).
func (s *session) close() {
	s.once.Do(func() {
		if s.run != nil && s.run.Pid() != 0 {
			s.run.MarkStopping()
			_ = s.run.Kill(context.Background())
			<-s.run.Done()
		}
		if s.client != nil {
			s.client.Kill()
		}
		os.RemoveAll(s.dir)
	})
}

func (s *session) startError(err error) error {
	if s.run == nil {
		return fmt.Errorf("plugin img: %s", oneLine(err.Error()))
	}
	if s.run.Pid() == 0 {
		return fmt.Errorf("plugin img: start %s: %w", s.run.Path(), s.run.ExitErr())
	}
	select {
	case <-s.run.Done():
		return s.exitError("start")
	case <-time.After(2 * time.Second):
	}
	return fmt.Errorf("plugin img: handshake: %s", oneLine(err.Error()))
}

func (s *session) exitError(op string) error {
	st := "exit status 0"
	if err := s.run.ExitErr(); err != nil {
		st = err.Error()
	}
	msg := fmt.Sprintf("plugin img (pid %d) exited during %s: %s", s.run.Pid(), op, st)
	if d := s.tail.PanicLine(); d != "" {
		msg += ": " + oneLine(d)
	}
	return errors.New(msg)
}

// call runs one RPC; a plugin that died is reported with its exit status
// and last words, a failed operation with the plugin's one-line message.
func (s *session) call(ctx context.Context, op string, f func(context.Context) error) error {
	err := f(ctx)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable, codes.Canceled, codes.Internal, codes.Unknown:
		select {
		case <-s.run.Done():
			return s.exitError(op)
		case <-time.After(2 * time.Second):
		}
	}
	return &OpError{Code: st.Code(), Msg: oneLine(st.Message())}
}

// OpError is an operation the plugin refused or could not complete.
type OpError struct {
	Code codes.Code
	Msg  string
}

func (e *OpError) Error() string { return e.Msg }

func oneLine(s string) string {
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		return s[:i]
	}
	return s
}
