package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/sandbox"
)

const serveUsage = `usage: krun-core serve --socket PATH DEVICE [options]

Serves one device plugin as a standard vhost-user back-end on the unix socket
PATH (created, and removed on exit). Front-ends may disconnect and connect
again. SIGTERM or SIGINT flushes the device and exits 0.

DEVICE is exactly one of:
  --disk path=FILE,format=raw|qcow2[,readonly=on][,backing=FILE,backing-format=FMT...]
         [,max-size=64G][,data-file=FILE]          vhost-user-blk (krun-plugin-blk-raw/-qcow2)
  --fs   path=DIR,tag=TAG[,readonly=on][,suid=on]   vhost-user-fs (krun-plugin-fs-virtio)
  --net  passt[,mac=52:54:00:12:34:56][,ports=8080:80,...]
                                                    vhost-user-net via passt (krun-plugin-net-passt)
  --plugin KIND[,key=value...]                      any krun-plugin-KIND, options passed as given

A disk image is locked as QEMU locks the images it opens, so krun-core, QEMU,
qemu-img and qemu-storage-daemon see each other: an image another process
writes is refused (and, without readonly=on, one another process reads);
backing files are locked read-only, a data file like its image. The locks
last until serve exits.

options:
  --socket-mode MODE        permissions of the socket, whatever the umask (default 0600;
                            0660 lets the socket's group connect)
  --plugin-dir DIR          look for krun-plugin-* here first (also $KRUN_PLUGIN_DIR;
                            then the directory of krun-core)
  --sandbox on|off          the plugin sandbox (default on); off needs saying so and warns
  --sandbox-disable LAYERS  turn off some layers: namespaces,root,landlock,seccomp or all
  --plugin-uid UID, --plugin-gid GID
                            host ids the plugin runs as (krun-core as root only; default
                            65534:65534, nobody:nogroup; never 0); a shared directory
                            must be accessible to them
  --log-level LEVEL         trace, debug, info, warn (default), error; at info, a
                            "serving" line says when the socket is ready
  --log-format FORMAT       text (default), or json for hclog's JSON lines
  --handshake-timeout DUR   how long a plugin may take to start (default 10s)

Bad input is one line on stderr and exit status 1 before anything starts.
`

// serveDeviceFlags are the flags naming the device, in devspec.Parse terms.
var serveDeviceFlags = []string{"disk", "fs", "net", "plugin"}

// serveOptions are the parsed command line of serve.
type serveOptions struct {
	socket           string
	device           string // "disk", "fs", "net" or "plugin"
	spec             devspec.Spec
	pluginDir        string
	sandboxOff       bool
	sandboxDisable   []sandbox.Layer
	log              func(stderr io.Writer) (hclog.Logger, error)
	socketMode       os.FileMode
	pluginUID        int // 0: the sandbox's default
	pluginGID        int
	handshakeTimeout time.Duration
}

// parseServeArgs parses and validates the command line; every error is one
// line.
func parseServeArgs(args []string) (*serveOptions, error) {
	fs := newCmdFlags("krun-core serve", serveUsage)
	o := &serveOptions{log: fs.logger}
	type devArg struct{ flag, value string }
	var devs []devArg
	for _, name := range serveDeviceFlags {
		fs.Func(name, "", func(v string) error {
			devs = append(devs, devArg{name, v})
			return nil
		})
	}
	fs.StringVar(&o.socket, "socket", "", "")
	fs.StringVar(&o.pluginDir, "plugin-dir", "", "")
	sandboxMode := fs.String("sandbox", "on", "")
	disable := fs.String("sandbox-disable", "", "")
	socketMode := fs.String("socket-mode", "0600", "")
	pluginUID := fs.String("plugin-uid", "", "")
	pluginGID := fs.String("plugin-gid", "", "")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", pluginhost.DefaultHandshakeTimeout, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fs.flagError(err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.socket == "" {
		return nil, errors.New("--socket PATH is required")
	}
	if len(devs) != 1 {
		return nil, fmt.Errorf("give exactly one of --disk, --fs, --net or --plugin (got %d)", len(devs))
	}
	spec, err := devspec.Parse(devs[0].flag, devs[0].value)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", devs[0].flag, err)
	}
	o.device, o.spec = devs[0].flag, spec
	switch *sandboxMode {
	case "on":
	case "off":
		o.sandboxOff = true
	default:
		return nil, fmt.Errorf("--sandbox=%q: want on or off", *sandboxMode)
	}
	if o.sandboxDisable, err = sandbox.ParseLayers(*disable); err != nil {
		return nil, fmt.Errorf("--sandbox-disable: %w", err)
	}
	if o.sandboxOff && len(o.sandboxDisable) > 0 {
		return nil, errors.New("--sandbox=off already turns every layer off; drop --sandbox-disable")
	}
	if _, err := fs.logger(io.Discard); err != nil {
		return nil, err
	}
	if err := pluginhost.CheckSearchPath(o.pluginDir); err != nil {
		return nil, err
	}
	mode, err := strconv.ParseUint(*socketMode, 8, 32)
	if err != nil || mode > 0o777 {
		return nil, fmt.Errorf("--socket-mode=%q: want an octal permission such as 0600 or 0660", *socketMode)
	}
	o.socketMode = os.FileMode(mode)
	if o.pluginUID, err = sandbox.ParseHostID(*pluginUID); err != nil {
		return nil, fmt.Errorf("--plugin-uid: %w", err)
	}
	if o.pluginGID, err = sandbox.ParseHostID(*pluginGID); err != nil {
		return nil, fmt.Errorf("--plugin-gid: %w", err)
	}
	if _, _, err := (sandbox.LaunchConfig{HostUID: o.pluginUID, HostGID: o.pluginGID}).PluginIDs(); err != nil {
		return nil, err
	}
	if o.handshakeTimeout <= 0 {
		return nil, errors.New("--handshake-timeout must be positive")
	}
	return o, nil
}

// serveCommand implements `krun-core serve`.
func serveCommand(args []string, stdout, stderr io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "krun-core serve: %s\n", serveOneLine(err))
		return 1
	}
	o, err := parseServeArgs(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, serveUsage)
		return 0
	}
	if err != nil {
		if !strings.Contains(err.Error(), "--help)") {
			err = fmt.Errorf("%w (see krun-core serve --help)", err)
		}
		return fail(err)
	}
	// Catch SIGTERM/SIGINT from the start: one that arrives while the
	// plugin starts is handled once serving begins (flush, remove the
	// socket, exit 0) instead of killing krun-core half-way.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigc)
	log, err := o.log(stderr)
	if err != nil {
		return fail(err)
	}

	// Everything that can fail on the user's input fails before the socket
	// path exists: the plugin, the socket path, the files.
	path, err := pluginhost.Find(o.spec.Kind(), pluginhost.SearchPath(o.pluginDir))
	if err != nil {
		return fail(err)
	}
	if err := checkSocketPath(o.socket); err != nil {
		return fail(err)
	}
	opened, err := o.spec.Open(devspec.OpenOptions{
		HelperStderr: devspec.HelperLog(log.Named("helper")),
	})
	if err != nil {
		return fail(err)
	}
	defer opened.Close()

	// The vhost-user socket is created unbound and handed to the plugin as
	// fd 3; the host binds and listens on its own copy (the same socket)
	// once the device is configured, so nothing listens on PATH for a
	// device that cannot be served.
	sfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("vhost-user socket: %w", err))
	}
	sock := os.NewFile(uintptr(sfd), "vhost-user")
	defer sock.Close()

	cfg := pluginhost.Config{
		Kind:             opened.Kind,
		Path:             path,
		Socket:           sock,
		Logger:           log,
		HandshakeTimeout: o.handshakeTimeout,
	}
	for _, f := range opened.Files {
		cfg.Files = append(cfg.Files, pluginhost.NamedFile{Name: f.Name, File: f.File})
	}
	if o.sandboxOff {
		cfg.SandboxOff = true
		fmt.Fprintln(stderr, "krun-core serve: warning: --sandbox=off: the plugin parses guest- and image-controlled bytes unconfined, with krun-core's privileges")
	} else {
		cfg.Sandbox = sandbox.LaunchConfig{Kind: opened.Kind, Disable: o.sandboxDisable, Log: log,
			HostUID: o.pluginUID, HostGID: o.pluginGID}
	}
	p, err := pluginhost.Launch(cfg)
	if err != nil {
		return fail(err)
	}
	defer p.Kill()
	opened.CloseFiles() // the plugin has its own copies

	ctx := context.Background()
	dev, note, err := p.Configure(ctx, opened.Options)
	if err != nil {
		return fail(err)
	}
	if err := bindAndListen(sfd, o.socket, o.socketMode); err != nil {
		return fail(err)
	}
	defer os.Remove(o.socket)
	sock.Close() // the plugin holds the listening socket
	if err := p.Start(ctx); err != nil {
		return fail(err)
	}
	log.Info("serving", "device", o.device, "plugin", opened.Kind, "pid", p.Pid(), "socket", o.socket,
		"virtio_type", dev.Type, "queues", dev.NumQueues, "sandbox", note)

	health := time.NewTicker(2 * time.Second)
	defer health.Stop()
	for {
		select {
		case s := <-sigc:
			log.Info("shutting down", "signal", s.String())
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := p.Shutdown(sctx)
			cancel()
			if err != nil {
				return fail(err)
			}
			return 0
		case <-p.Done():
			err := p.Err()
			if err == nil {
				err = fmt.Errorf("plugin %s (pid %d) exited unexpectedly", opened.Kind, p.Pid())
			}
			return fail(err)
		case <-health.C:
			st, msg, err := p.Health(ctx)
			if err != nil {
				return fail(err)
			}
			if st == pluginpb.HealthResponse_STATE_FAILED || st == pluginpb.HealthResponse_STATE_STOPPED {
				if msg == "" {
					msg = "back-end stopped"
				}
				return fail(fmt.Errorf("plugin %s stopped serving: %s", opened.Kind, msg))
			}
		}
	}
}

// checkSocketPath refuses a path that is in use or is not a socket, or
// whose directory does not exist, and removes a stale socket (one nobody
// listens on).
func checkSocketPath(path string) error {
	if len(path) > 107 {
		return fmt.Errorf("--socket %s: longer than the 107 bytes a unix socket path may have", path)
	}
	switch st, err := os.Stat(filepath.Dir(path)); {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("--socket %s: directory %s does not exist", path, filepath.Dir(path))
	case err != nil:
		return fmt.Errorf("--socket %s: %w", path, err)
	case !st.IsDir():
		return fmt.Errorf("--socket %s: %s is not a directory", path, filepath.Dir(path))
	}
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("--socket: %w", err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("--socket %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("--socket %s is in use by another process", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("--socket %s exists: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("--socket: remove stale socket: %w", err)
	}
	return nil
}

// bindAndListen binds the host's copy of the plugin's socket to path and
// listens on it. The socket is bound and listening under a temporary name
// in the same directory first, then renamed to path (never replacing a file
// that appeared meanwhile): a front-end that waits for path to exist never
// finds a socket that still refuses connections.
// The socket gets mode (whatever the umask) before it listens.
func bindAndListen(fd int, path string, mode os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".krun-serve-%d.sock", os.Getpid()))
	if len(tmp) > 107 { // no room for the temporary name: bind in place
		tmp = path
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: tmp}); err != nil {
		return fmt.Errorf("--socket %s: bind: %w", path, err)
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, tmp, uint32(mode.Perm()), 0); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("--socket %s: chmod: %w", path, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("--socket %s: listen: %w", path, err)
	}
	if tmp == path {
		return nil
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("--socket %s: bind: %w", path, err)
	}
	return nil
}

func serveOneLine(err error) string {
	s := err.Error()
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s = s[:i]
	}
	return s
}
