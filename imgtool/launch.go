package imgtool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// Sandboxer is the launcher-side sandbox (sandbox.LaunchConfig).
type Sandboxer = pluginhost.Sandboxer

// DefaultHandshakeTimeout bounds the plugin's start.
const DefaultHandshakeTimeout = pluginhost.DefaultHandshakeTimeout

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
	// locked as QEMU locks them (core/imagelock).
	ForceShare bool
}

// file is one fd handed to the plugin.
type file struct {
	name string
	f    *os.File
}

// session is one running plugin process with its files opened.
type session struct {
	proc *pluginhost.Process
	rpc  imagepb.ImageToolClient
}

// maxMessage bounds gRPC replies (a snapshot list can be long).
const maxMessage = 64 << 20

// start launches the plugin with files as fd 3, 4, ... (pluginhost, the
// launcher device plugins use too), names them with Open (the plugin
// restricts itself there) and checks the confinement from outside. The
// caller keeps its copies of the files and must close the session.
func (l *Launcher) start(ctx context.Context, files []file) (_ *session, err error) {
	if l.Sandbox == nil && !l.SandboxOff {
		return nil, errors.New("no launcher-side sandbox configured")
	}
	if len(files) > imagepb.MaxFiles {
		return nil, fmt.Errorf("%d files, at most %d", len(files), imagepb.MaxFiles)
	}
	extra := make([]*os.File, len(files))
	names := make(map[string]uint32, len(files))
	for i, f := range files {
		extra[i] = f.f
		names[f.name] = uint32(imagepb.FirstFD + i)
	}
	timeout := l.HandshakeTimeout
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	proc, err := pluginhost.StartProcess(pluginhost.ProcessConfig{
		Kind: imagepb.Kind, Path: l.PluginPath, PluginDir: l.PluginDir, Files: extra,
		Sandbox: l.Sandbox, SandboxOff: l.SandboxOff, Logger: l.Logger, HandshakeTimeout: timeout,
		Handshake: imagepb.Handshake(), Service: imagepb.PluginName,
		NewClient:   func(c *grpc.ClientConn) any { return imagepb.NewImageToolClient(c) },
		DialOptions: []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage))},
		ExecHint:    "is the plugin krun-plugin-img built from the same krun-core?",
	})
	if err != nil {
		return nil, err
	}
	s := &session{proc: proc, rpc: proc.Stub().(imagepb.ImageToolClient)}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if err := s.call(ctx, "Open", func(ctx context.Context) error {
		_, err := s.rpc.Open(ctx, &imagepb.OpenRequest{Files: names, SandboxOff: l.SandboxOff})
		return err
	}); err != nil {
		return nil, err
	}
	if v, ok := l.Sandbox.(interface{ Verify(pid int) error }); ok && !l.SandboxOff {
		if err := v.Verify(proc.Pid()); err != nil {
			return nil, fmt.Errorf("plugin img (pid %d) is not confined, killed it: %w", proc.Pid(), err)
		}
	}
	return s, nil
}

// close ends the plugin process and removes its socket directory. The
// process is killed outright: every operation has synced its output before
// it replied, and go-plugin's graceful shutdown would have the plugin
// remove its socket file, a system call its sandbox refuses (and logs).
func (s *session) close() { s.proc.Kill() }

// call runs one RPC; a plugin that died is reported with its exit status
// and last words (*pluginhost.ExitError), a failed operation with the
// plugin's one-line message.
func (s *session) call(ctx context.Context, op string, f func(context.Context) error) error {
	err := f(ctx)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if e := s.proc.Exited(op, err); e != nil {
		return e
	}
	st := status.Convert(err)
	return &OpError{Code: st.Code(), Msg: oneLine(pluginhost.StatusMessage(st))}
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
