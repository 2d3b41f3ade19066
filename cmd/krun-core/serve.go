package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/sandbox"
)

const serveUsage = `usage: krun-core serve --socket PATH DEVICE [options]

Serves one device plugin as a standard vhost-user back-end on the unix socket
PATH (created, and removed on exit). Front-ends may disconnect and connect
again. A disk's, network device's or --plugin's plugin that dies or stops
answering is started again on the same socket (--plugin-restarts; never a
plugin whose device says its requests must not be replayed): a
front-end that reconnects (QEMU's chardev option reconnect=1) carries on,
and a vhost-user-blk front-end's requests in flight are replayed
(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD). SIGTERM or SIGINT flushes the
device and exits 0. SIGUSR1 logs the plugin's counters (requests,
notifications, kicks and failures per queue, and the device's own) in one
log line, whatever --log-level.

DEVICE is exactly one of:
  --disk path=FILE,format=raw|qcow2[,readonly=on][,backing=FILE,backing-format=FMT...]
         [,max-size=64G][,data-file=FILE][,queues=N]
                                                    vhost-user-blk (krun-plugin-blk-raw/-qcow2):
                                                    rings up to 1024, queues= request queues
                                                    (default 8; QEMU's vhost-user-blk-pci
                                                    wants one per vCPU unless num-queues=)
  --fs   path=DIR,tag=TAG[,readonly=on][,suid=on]   vhost-user-fs (krun-plugin-fs-virtio);
         [,uidmap=...][,gidmap=...][,cache=SECONDS] the other keys: docs/VIRTIOFS.md
         [,xattr=on|off][,workers=N][,open-files=N]
  --net  passt[,mac=52:54:00:12:34:56][,ports=8080:80,...][,mtu=N][,passt-arg=A...]
                                                    vhost-user-net via passt (krun-plugin-net-passt)
  --plugin KIND[,key=value...][,file.NAME=PATH...][,file-rw.NAME=PATH...]
                                                    any krun-plugin-KIND, options passed as given;
                                                    each PATH opened by krun-core (read-only, or
                                                    read-write) and handed over as file NAME

A comma inside a value is written twice (path=a,,b.img), as in QEMU.

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
  --plugin-syscalls KIND=NAME[,NAME...]
                            with --plugin KIND: grant its plugin these system calls beyond
                            its launch profile (those its declared policy asks for; never
                            exec, mount, ptrace and the others docs/SECURITY.md lists)
  --plugin-uid UID, --plugin-gid GID
                            host ids the plugin runs as (krun-core as root only; default
                            65534:65534, nobody:nogroup; never 0); a shared directory
                            must be accessible to them
  --log-level LEVEL         trace, debug, info, warn (default), error; at info, a
                            "serving" line says when the socket is ready
  --log-format FORMAT       text (default), or json for hclog's JSON lines
  --handshake-timeout DUR   how long a plugin may take to start (default 10s)
  --plugin-restarts N/DUR   restart a plugin that dies or hangs at most N times within DUR
                            (default 5/60s; off: exit 1 at the first death)

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
	restarts         pluginhost.RestartPolicy
	grants           devspec.SyscallGrants // --plugin-syscalls
}

// parseServeArgs parses and validates the command line; every error is one
// line.
func parseServeArgs(args []string) (*serveOptions, error) {
	fs := cli.NewFlags("krun-core serve", serveUsage)
	o := &serveOptions{log: fs.Logger}
	type devArg struct{ flag, value string }
	var devs []devArg
	for _, name := range serveDeviceFlags {
		fs.Func(name, "", func(v string) error {
			devs = append(devs, devArg{name, v})
			return nil
		})
	}
	o.grants = devspec.SyscallGrants{}
	fs.Func("plugin-syscalls", "", func(v string) error { return o.grants.Add(v) })
	fs.StringVar(&o.socket, "socket", "", "")
	fs.StringVar(&o.pluginDir, "plugin-dir", "", "")
	sandboxMode := fs.String("sandbox", "on", "")
	disable := fs.String("sandbox-disable", "", "")
	socketMode := fs.String("socket-mode", "0600", "")
	pluginUID := fs.String("plugin-uid", "", "")
	pluginGID := fs.String("plugin-gid", "", "")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", pluginhost.DefaultHandshakeTimeout, "")
	restarts := fs.String("plugin-restarts", pluginhost.RestartPolicy{}.String(), "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fs.FlagError(err)
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
	if f, ok := spec.(*devspec.FSSpec); ok && f.Mount != "" {
		return nil, errors.New("--fs: mount= is where run --root mounts a share in its guest; serve's driver mounts it itself")
	}
	o.device, o.spec = devs[0].flag, spec
	if err := o.grants.Check([]devspec.Spec{spec}); err != nil {
		return nil, fmt.Errorf("--plugin-syscalls %w", err)
	}
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
	if _, err := fs.Logger(io.Discard); err != nil {
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
	if _, _, err := (sandbox.LaunchConfig{HostUID: o.pluginUID, HostGID: o.pluginGID}).PluginIDs(); err != nil && !o.sandboxOff {
		// Without the sandbox the plugins run as krun-core itself.
		return nil, err
	}
	if o.handshakeTimeout <= 0 {
		return nil, errors.New("--handshake-timeout must be positive")
	}
	if o.restarts, err = pluginhost.ParseRestartPolicy(*restarts); err != nil {
		return nil, fmt.Errorf("--plugin-restarts: %w", err)
	}
	return o, nil
}

// launchConfig is the sandbox the device's plugin is launched in, at its
// first start and at every restart.
func (o *serveOptions) launchConfig(log hclog.Logger) *sandbox.LaunchConfig {
	return &sandbox.LaunchConfig{Kind: o.spec.Kind(), Disable: o.sandboxDisable, Log: log,
		HostUID: o.pluginUID, HostGID: o.pluginGID, ReadOnlyDirs: devspec.ReadOnlyDirs(o.spec),
		ExtraSyscalls: o.grants[o.spec.Kind()]}
}

// serveCommand implements `krun-core serve`.
func serveCommand(args []string, stdout, stderr io.Writer) int {
	// A log pipe whose reader went away (a restarted journald, a
	// `serve ... 2>&1 | tee` that ended) must not end the service by
	// SIGPIPE on its next log line: as run (and systemd's IgnoreSIGPIPE
	// for services).
	catchSIGPIPE()
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
	// plugin starts ends the start (the plugin killed, exit 0), and one
	// later is handled by the serving loop (flush, remove the socket,
	// exit 0), instead of killing krun-core half-way.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigc)
	// SIGUSR1 asks for the counters; caught from the start too, since its
	// default action would end serve.
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
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
	var lc *sandbox.LaunchConfig
	if !o.sandboxOff {
		lc = o.launchConfig(log)
	}
	opened, err := o.spec.Open(devspec.OpenOptions{
		HelperStderr: devspec.HelperLog(log.Named("helper")),
		Sandbox:      lc,
		Log:          log,
	})
	if err != nil {
		return fail(err)
	}

	// The vhost-user socket is created unbound and handed to the plugin as
	// fd 3; the host binds and listens on its own copy (the same socket)
	// once the device is configured, so nothing listens on PATH for a
	// device that cannot be served. The host keeps its copy: a plugin
	// that is restarted gets the same listening socket, and a front-end
	// that reconnects meanwhile waits in its backlog.
	sfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("vhost-user socket: %w", err))
	}
	sock := os.NewFile(uintptr(sfd), "vhost-user")
	defer sock.Close()

	if o.sandboxOff {
		fmt.Fprintln(stderr, "krun-core serve: warning: --sandbox=off: the plugin parses guest- and image-controlled bytes unconfined, with krun-core's privileges")
		if f, ok := o.spec.(*devspec.FSSpec); ok && f.OpenFiles != 0 {
			fmt.Fprintln(stderr, "krun-core serve: warning: open-files= is the sandbox's limit: with --sandbox=off the plugin has krun-core's own")
		}
	}
	s := &servedPlugin{o: o, path: path, sock: sock, log: log, opened: opened}
	defer func() { s.opened.Close() }()
	restarts := pluginhost.NewRestarts(o.restarts)
	if !restartableSpec(o.spec) {
		restarts = pluginhost.NewRestarts(pluginhost.RestartPolicy{Max: -1})
	}
	ctx := context.Background()
	var dev *pluginhost.DeviceInfo
	var note string
	sig, err := untilSignalled(ctx, sigc, func(ctx context.Context) (err error) {
		dev, note, err = s.launch(ctx)
		return err
	})
	if s.plugin != nil {
		defer func() { s.plugin.Kill() }()
	}
	if sig != nil {
		// Nothing was served: the plugin, wherever its start was, is
		// killed (the deferred Kill), and serve ends as asked.
		log.Info("shutting down", "signal", sig.String(), "plugin", "not running (start abandoned)")
		return 0
	}
	if err != nil {
		return fail(err)
	}
	if dev.NoRestart && restarts.Enabled() {
		log.Info("the plugin's requests must not be carried out twice: it will not be restarted")
		restarts = pluginhost.NewRestarts(pluginhost.RestartPolicy{Max: -1})
	}
	if !restarts.Enabled() {
		opened.CloseFiles() // the plugin has its own copies
	}
	if err := bindAndListen(sfd, o.socket, o.socketMode); err != nil {
		return fail(err)
	}
	defer os.Remove(o.socket)
	if err := s.plugin.Start(ctx); err != nil {
		return fail(err)
	}
	dropServePrivileges(log, o)
	log.Info("serving", "device", o.device, "plugin", s.opened.Kind, "pid", s.plugin.Pid(), "socket", o.socket,
		"virtio_type", dev.Type, "queues", dev.NumQueues, "sandbox", note)

	health := time.NewTicker(pluginhost.HealthInterval)
	defer health.Stop()
	var counting atomic.Bool // a SIGUSR1's counters are being fetched
	for {
		var why error
		select {
		case sig := <-sigc:
			log.Info("shutting down", "signal", sig.String())
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := s.plugin.Shutdown(sctx)
			cancel()
			if err != nil {
				return fail(err)
			}
			return 0
		case <-s.plugin.Done():
			if why = s.plugin.Err(); why == nil {
				why = fmt.Errorf("plugin %s (pid %d) exited unexpectedly", s.opened.Kind, s.plugin.Pid())
			}
		case <-s.opened.HelperExited():
			why = errors.New("passt exited")
		case <-health.C:
			why = s.checkHealth(ctx)
		case <-usr1:
			// Not on this loop: a plugin slow to answer Stats must not
			// hold SIGTERM or the health checks (found in review,
			// helper-105). One at a time; a signal meanwhile is dropped.
			if counting.CompareAndSwap(false, true) {
				go func(p *pluginhost.Plugin, kind string) {
					defer counting.Store(false)
					s.logCounters(ctx, p, kind)
				}(s.plugin, s.opened.Kind) // read here: a restart replaces them
			}
		}
		if why == nil {
			continue
		}
		if restarts.Total() == 0 {
			// The first passt refused its arguments or its set-up (a
			// bad passt-arg): each restart's would too, with its usage
			// text every time (found in review, helper-130: five
			// restarts, 569 lines). Whichever way its end is noticed
			// first (its exit, or the plugin's lost link).
			if err := s.opened.HelperStartFailure(); err != nil {
				return fail(err)
			}
		}
		sig, state, err := s.recover(ctx, restarts, why, sigc)
		if err != nil {
			return fail(err)
		}
		if sig != nil {
			// Asked to end during the restart's back-off or the
			// restart: no plugin runs, so there is none to flush
			// through; what the dead one wrote is made durable here.
			log.Info("shutting down", "signal", sig.String(), "plugin", state)
			if err := s.opened.SyncFiles(); err != nil {
				return fail(err)
			}
			return 0
		}
	}
}

// maxLoggedCounters bounds the counters one SIGUSR1 logs: the plugin
// names them.
const maxLoggedCounters = 512

// logCounters logs the plugin's counters (Stats) in one line, sorted by
// name. Names are the plugin's text: only those made of letters, digits
// and "._-" are logged as fields, the others counted.
func (s *servedPlugin) logCounters(ctx context.Context, p *pluginhost.Plugin, kind string) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.Stats(cctx)
	if err != nil {
		s.log.Warn("plugin counters", "error", err)
		return
	}
	args := []any{"plugin", kind, "pid", p.Pid()}
	dropped := 0
	for _, k := range slices.Sorted(maps.Keys(c)) {
		if !counterName(k) || len(args)/2 > maxLoggedCounters {
			dropped++
			continue
		}
		args = append(args, k, c[k])
	}
	if dropped > 0 {
		args = append(args, "counters_not_logged", dropped)
	}
	// Asked for: shown whatever --log-level (at INFO, or at the level
	// set when that is higher).
	s.log.Log(max(hclog.Info, s.log.GetLevel()), "plugin counters", args...)
}

// counterName reports whether k is a counter name fit for a log field.
func counterName(k string) bool {
	if k == "" || len(k) > 64 {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// dropServePrivileges ends serve's set-up as core/vmm's Start ends run's
// (sandbox.DropPrivileges): no_new_privs, and only the capabilities its
// plugin and its passt need from it (devspec.KeepCapabilities), plus
// CAP_DAC_OVERRIDE where removing the socket at exit needs it (a directory
// root's own permissions do not let it write). A failure is a warning.
func dropServePrivileges(log hclog.Logger, o *serveOptions) {
	keep := devspec.KeepCapabilities(sandbox.LaunchConfig{Disable: o.sandboxDisable}, []devspec.Spec{o.spec})
	var st unix.Stat_t
	if unix.Stat(filepath.Dir(o.socket), &st) == nil && !mayWriteDir(&st) {
		keep = append(keep, unix.CAP_DAC_OVERRIDE)
	}
	if err := sandbox.DropPrivileges(keep); err != nil {
		log.Warn("krun-core serve keeps its privileges after set-up", "error", err)
		return
	}
	log.Debug("privileges dropped after set-up", "no_new_privs", true,
		"capabilities", sandbox.CapabilityNames(sandbox.HeldCapabilities(keep)))
}

// mayWriteDir reports whether this process's ids without capabilities may
// create and remove entries in a directory (write and search permission by
// its mode bits; the socket is root's, so a sticky bit does not matter).
func mayWriteDir(st *unix.Stat_t) bool {
	bits := st.Mode
	switch {
	case st.Uid == uint32(os.Geteuid()):
		bits >>= 6
	case st.Gid == uint32(os.Getegid()):
		bits >>= 3
	}
	return bits&0o3 == 0o3
}

// servedPlugin is the plugin serve runs, and what it needs to run it
// again.
type servedPlugin struct {
	o      *serveOptions
	path   string   // the plugin executable
	sock   *os.File // the listening socket (unbound until the first Start)
	log    hclog.Logger
	opened *devspec.Opened
	plugin *pluginhost.Plugin
}

// restartableSpec reports whether serve restarts the plugin of spec s: a
// disk's, a network device's and a third-party plugin's, not a virtio-fs
// plugin's (its FUSE node ids and handles die with it; see
// docs/ARCHITECTURE.md).
func restartableSpec(s devspec.Spec) bool {
	switch s.(type) {
	case *devspec.DiskSpec, *devspec.NetSpec, *devspec.PluginSpec:
		return true
	}
	return false
}

// launch starts the plugin on the listening socket with the opened files
// and configures it.
func (s *servedPlugin) launch(ctx context.Context) (*pluginhost.DeviceInfo, string, error) {
	o := s.o
	cfg := pluginhost.Config{
		Kind:             s.opened.Kind,
		Path:             s.path,
		Socket:           s.sock,
		Logger:           s.log,
		HandshakeTimeout: o.handshakeTimeout,
	}
	for _, f := range s.opened.Files {
		cfg.Files = append(cfg.Files, pluginhost.NamedFile{Name: f.Name, File: f.File})
	}
	if o.sandboxOff {
		cfg.SandboxOff = true
	} else {
		lc := o.launchConfig(s.log)
		// A disk's plugin cannot grow its files past what the disk
		// needs (devspec.Opened.FileBytes), from their sizes now: a
		// restart starts from what the previous plugin left; a share's
		// may have open-files=.
		var err error
		if lc.Limits, err = s.opened.Limits(lc.Limits); err != nil {
			return nil, "", err
		}
		cfg.Sandbox = *lc
	}
	p, err := pluginhost.LaunchContext(ctx, cfg)
	if err != nil {
		return nil, "", err
	}
	s.plugin = p
	info, msg, err := p.Configure(ctx, s.opened.Options)
	if err == nil && info != nil && !o.sandboxOff {
		err = s.opened.LimitFileBytes(p.Pid(), info.Config, s.log)
	}
	return info, msg, err
}

// checkHealth asks the plugin for its state: nil while it serves.
func (s *servedPlugin) checkHealth(ctx context.Context) error {
	hctx, cancel := context.WithTimeout(ctx, pluginhost.HealthTimeout)
	defer cancel()
	st, msg, err := s.plugin.Health(hctx)
	switch {
	case errors.Is(err, pluginhost.ErrExited):
		return nil // Done reports it
	case err != nil:
		return fmt.Errorf("plugin %s stopped answering (Health): %w", s.opened.Kind, err)
	case st == pluginhost.HealthFailed || st == pluginhost.HealthStopped:
		if msg == "" {
			msg = "back-end stopped"
		}
		return fmt.Errorf("plugin %s stopped serving: %s", s.opened.Kind, msg)
	}
	return nil
}

// recover restarts the plugin after why on the same listening socket,
// with the same files and options (a network device gets a new passt),
// retrying within the budget; the error says why serve must end. A
// signal from sigc during a back-off ends the wait (up to
// DefaultRestartMaxBackoff) at once, and one during a restart ends the
// restart (up to the handshake's timeout for a plugin that hangs): recover
// returns it, the old plugin killed and no new one running, with the
// plugin's state for the log.
func (s *servedPlugin) recover(ctx context.Context, restarts *pluginhost.Restarts, why error, sigc <-chan os.Signal) (os.Signal, string, error) {
	for {
		delay, err := restarts.Next(time.Now())
		if err != nil {
			if !restarts.Enabled() {
				return nil, "", why
			}
			return nil, "", fmt.Errorf("%w; not restarted again (%v)", why, err)
		}
		s.log.Warn("plugin lost; restarting it", "reason", why, "restart", restarts.Total(), "delay", delay)
		s.plugin.Kill()
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case sig := <-sigc:
				t.Stop()
				return sig, "not running (restart back-off)", nil
			case <-t.C:
			}
		}
		start := time.Now()
		sig, err := untilSignalled(ctx, sigc, s.relaunch)
		if sig != nil {
			// As after a back-off: the plugin, the old one or a new
			// one that had just started, is killed, and the caller
			// makes what it wrote durable.
			s.plugin.Kill()
			return sig, "not running (restart abandoned)", nil
		}
		if err == nil {
			s.log.Warn("plugin restarted; serving again", "plugin", s.opened.Kind, "pid", s.plugin.Pid(),
				"took", time.Since(start).Round(time.Millisecond))
			return nil, "", nil
		}
		s.plugin.Kill()
		why = fmt.Errorf("restart failed: %w", err)
	}
}

// untilSignalled runs f, whose context a signal from sigc that comes
// meanwhile cancels (a plugin that hangs in its start would otherwise hold
// serve up to the handshake's timeout): it returns that signal, if one
// came, and f's error.
func untilSignalled(ctx context.Context, sigc <-chan os.Signal, f func(context.Context) error) (os.Signal, error) {
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sig os.Signal // the watcher's, read once it has ended
	over := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case sig = <-sigc:
			cancel()
		case <-over:
		}
	}()
	err := f(fctx)
	close(over)
	<-watched
	return sig, err
}

func (s *servedPlugin) relaunch(ctx context.Context) error {
	if n, ok := s.o.spec.(*devspec.NetSpec); ok {
		// A new passt with the same MAC: the old one's stream may have
		// been cut in the middle of a frame.
		mac, err := devspec.ParseMAC(s.opened.Options[devopts.OptMAC])
		if err != nil {
			return fmt.Errorf("MAC: %w", err)
		}
		s.opened.Close()
		spec := *n
		spec.MAC = mac
		opened, err := spec.Open(devspec.OpenOptions{HelperStderr: devspec.HelperLog(s.log.Named("helper"))})
		if err != nil {
			return err
		}
		s.opened = opened
	}
	if _, _, err := s.launch(ctx); err != nil {
		return err
	}
	return s.plugin.Start(ctx)
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
	tmp, err := bindTemporary(fd, path)
	if err != nil {
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

// bindTemporary binds fd to a fresh temporary name beside path, or to path
// itself where a temporary name does not fit in a unix socket address. The
// name is random: one a killed serve left (bound, never renamed) is in the
// way of no later serve, whatever its pid (every serve that is pid 1 of its
// container has the same; found in review).
func bindTemporary(fd int, path string) (string, error) {
	for range 16 {
		var r [4]byte // 8 hex digits: as long as a pid and one more, so no more paths bind in place than with the pid
		if _, err := rand.Read(r[:]); err != nil {
			return "", err
		}
		tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".krun-serve-%x.sock", r))
		if len(tmp) > 107 { // no room for the temporary name: bind in place
			return path, unix.Bind(fd, &unix.SockaddrUnix{Name: path})
		}
		err := unix.Bind(fd, &unix.SockaddrUnix{Name: tmp})
		if err != unix.EADDRINUSE {
			return tmp, err
		}
	}
	return "", unix.EADDRINUSE
}

func serveOneLine(err error) string {
	return cli.OneLine(err.Error()) // a line break in a file name must not cut off the reason
}
