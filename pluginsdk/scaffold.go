package pluginsdk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// The go-plugin server scaffold every krun-core plugin process runs on:
// device plugins (Serve, the DevicePlugin service) and krun-plugin-img
// (imgtool/imgserver, the ImageTool service) alike. Its host side is
// core/pluginhost.StartProcess.

// Service is one gRPC service a plugin process serves over go-plugin.
type Service struct {
	Handshake plugin.HandshakeConfig
	// Name is what the host dispenses the service under.
	Name string
	// Register registers the service's implementation on the server.
	Register func(*grpc.Server)
}

// EnvLogLevel is the variable in which the host passes its log level
// (core/pluginhost.EnvLogLevel).
const EnvLogLevel = "KRUN_PLUGIN_LOG_LEVEL"

// NewLogger is a plugin's logger: hclog JSON lines on stderr, which the
// host re-logs, at the level the host runs at. Call it before ServeService:
// go-plugin later replaces os.Stderr with a pipe that only a SyncStderr
// client would drain, so stderr is captured now. It also loads the local
// time zone, which log timestamps need and which a plugin cannot open once
// it restricted itself.
func NewLogger(stderr io.Writer) hclog.Logger {
	level := hclog.LevelFromString(os.Getenv(EnvLogLevel))
	if level == hclog.NoLevel {
		level = hclog.Info
	}
	_ = time.Local.String()
	return hclog.New(&hclog.LoggerOptions{Output: stderr, Level: level, JSONFormat: true})
}

// ServeService serves svc over go-plugin until the host ends the process:
// the host's go-plugin controller Shutdown (its plugin.Client.Kill) exits
// at once (exitOnControllerShutdown). It returns when go-plugin's server
// stops otherwise.
//
// go-plugin points os.Stderr at a pipe into its stdio stream before it
// serves; the first RPC points it back at fd 2, so that what a plugin
// writes there (a last line before it exits) reaches the host's log and
// its exit report, as docs/PLUGINS.md says, instead of a stream the host
// does not wait for.
func ServeService(svc Service, log hclog.Logger) {
	if msg, ok := startedByHand(svc.Handshake, os.Args[0], os.Getenv); ok {
		fmt.Fprintln(os.Stderr, msg)
		os.Exit(1)
	}
	stderr := os.Stderr
	var restore sync.Once
	restoreStderr := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		restore.Do(func() { os.Stderr = stderr })
		return h(ctx, req)
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: svc.Handshake,
		Plugins:         plugin.PluginSet{svc.Name: &servicePlugin{register: svc.Register}},
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, grpc.ChainUnaryInterceptor(restoreStderr, exitOnControllerShutdown))...)
		},
		Logger: log,
	})
}

// startedByHand reports, with the one line to print, a plugin binary
// that its host did not start (no handshake cookie in its environment),
// where go-plugin would print three lines about loading plugins.
func startedByHand(h plugin.HandshakeConfig, arg0 string, getenv func(string) string) (string, bool) {
	if getenv(h.MagicCookieKey) == h.MagicCookieValue {
		return "", false
	}
	return fmt.Sprintf("%s: a krun-core plugin: krun-core starts it (krun-core serve, run, img), it does not run on its own", filepath.Base(arg0)), true
}

// controllerShutdown is go-plugin's own "stop the plugin" RPC, sent by the
// host's plugin.Client.Kill.
const controllerShutdown = "/plugin.GRPCController/Shutdown"

// exitOnControllerShutdown exits the process when the host asks go-plugin
// to stop. go-plugin would stop the gRPC server, whose listener then
// unlinks the socket file: a file system call the sandbox refuses (and
// logs). The host removes the socket directory itself, and a device was
// flushed by the Shutdown RPC before (Kill without Shutdown is a kill).
func exitOnControllerShutdown(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if info.FullMethod == controllerShutdown {
		os.Exit(0)
	}
	return h(ctx, req)
}

// servicePlugin is the plugin half of go-plugin's GRPCPlugin.
type servicePlugin struct {
	plugin.NetRPCUnsupportedPlugin
	register func(*grpc.Server)
}

func (p *servicePlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	p.register(s)
	return nil
}

func (p *servicePlugin) GRPCClient(context.Context, *plugin.GRPCBroker, *grpc.ClientConn) (interface{}, error) {
	return nil, errors.New("pluginsdk: a plugin is not a host")
}

// maxFileName bounds the name of an inherited file.
const maxFileName = 64

// InheritedFiles checks the files a host names (name -> fd, as in
// ConfigureRequest.files or imagepb.OpenRequest.files): at most max of
// them, fds from first to first+max-1, each fd named once and actually
// inherited. It wraps them and returns them with their fd numbers.
func InheritedFiles(req map[string]uint32, first uint32, max int) (map[string]*os.File, map[string]int, error) {
	if len(req) > max {
		return nil, nil, fmt.Errorf("%d files, at most %d", len(req), max)
	}
	files := make(map[string]*os.File, len(req))
	fds := make(map[string]int, len(req))
	used := map[uint32]string{}
	for name, fd := range req {
		if name == "" || len(name) > maxFileName {
			return nil, nil, fmt.Errorf("file name %q: want 1 to %d bytes", name, maxFileName)
		}
		if fd < first || uint64(fd) >= uint64(first)+uint64(max) {
			return nil, nil, fmt.Errorf("file %q: fd %d outside %d..%d", name, fd, first, int(first)+max-1)
		}
		if other, dup := used[fd]; dup {
			return nil, nil, fmt.Errorf("files %q and %q both claim fd %d", name, other, fd)
		}
		used[fd] = name
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, nil, fmt.Errorf("file %q: fd %d was not inherited: %w", name, fd, err)
		}
		fds[name] = int(fd)
	}
	for name, fd := range fds {
		// Inherited fds are not close-on-exec; a plugin never execs, but
		// be tidy.
		unix.CloseOnExec(fd)
		files[name] = os.NewFile(uintptr(fd), name)
	}
	return files, fds, nil
}
