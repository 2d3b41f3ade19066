package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/initramfs"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/lines"
	"github.com/krun-core/krun-core/internal/stdiopump"
)

// Errors of a program that cannot be started; the CLI turns them into the
// shell's statuses (127 and 126).
var (
	ErrCommandNotFound      = errors.New("command not found")
	ErrCommandNotExecutable = errors.New("command not executable")
)

// InitBinary is the name of the guest init executable krun-core puts in the
// initramfs it builds for SetExec (built from guest/init).
const InitBinary = "krun-init"

// RootTag is the virtio-fs tag of the root file system in SetRoot mode.
const RootTag = initconfig.DefaultRootTag

// execConfig is what SetRoot, SetExec and their siblings collect.
type execConfig struct {
	root         string
	rootReadOnly bool
	cfg          *initconfig.Config
	portMap      []devspec.PortForward
	stdin        *os.File
	stdout       *os.File
	stderr       *os.File
	tty          bool
	initPath     string
	modulesDir   string
	rootShare    *devspec.FSSpec // the root's share, once prepareExec added it
	// output copies stdout and stderr where they are files the console
	// plugin must not hold (a `>>log`: stdiopump.Outputs); close drains
	// it.
	output *stdiopump.Output

	controlR, controlW *os.File // the console plugin's control channel (SOCK_SEQPACKET pair)
	controlMu          sync.Mutex
	// ended: the guest has ended and the devices are being shut down
	// (under controlMu); requests for the guest fail from then on.
	ended bool
	// pending: records asked for before the control channel exists
	// (a ^C or a window resize while krun-core starts), sent when it
	// opens; closed: the channel is gone (under controlMu).
	pending [][]byte
	closed  bool

	container   *container.Setup  // SetContainer: the OCI runtime's guest setup
	noLookup    bool              // SetLookup(false)
	rootOptions map[string]string // SetRootOptions
	openFiles   uint64            // SetRootOpenFiles
	envHome     bool              // the env given (SetExec, SetEnv) sets HOME
}

func (c *Context) execCfg() *execConfig {
	if c.exec == nil {
		c.exec = &execConfig{cfg: initconfig.New(), stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	}
	return c.exec
}

// SetRoot makes the host directory dir the guest's root file system (as
// libkrun's krun_set_root), served by the fs-virtio plugin under the tag
// RootTag. krun-core then boots its own init, krun-init, from an initramfs
// it builds from the kernel's modules, and runs the program set by
// SetExec. SetRoot and an initrd (SetKernel) are alternatives.
func (c *Context) SetRoot(dir string, readOnly bool) error {
	if dir == "" {
		return fmt.Errorf("%w: empty root directory", ErrConfig)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%w: root %s: %v", ErrConfig, cli.Printable(dir), unwrapPath(err))
	}
	if !st.IsDir() {
		return fmt.Errorf("%w: root %s is not a directory", ErrConfig, cli.Printable(dir))
	}
	e := c.execCfg()
	e.root, e.rootReadOnly = dir, readOnly
	e.cfg.Root.ReadOnly = readOnly
	return nil
}

// SetExec sets the program to run inside the root (as libkrun's
// krun_set_exec): its path (looked up in env's PATH inside the root when
// it has no slash), its whole argument vector (argv[0] included; empty
// means just path) and its environment ("KEY=value"; nil keeps the
// default PATH and HOME).
func (c *Context) SetExec(path string, argv, env []string) error {
	if path == "" {
		return fmt.Errorf("%w: no program to run", ErrConfig)
	}
	e := c.execCfg()
	if len(argv) == 0 {
		argv = []string{path}
	}
	for _, kv := range env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" || strings.ContainsRune(kv, 0) {
			return fmt.Errorf("%w: environment entry %s is not KEY=VALUE", ErrConfig, cli.Printable(kv))
		}
	}
	args := append([]string{path}, argv[1:]...)
	e.cfg.Args = args
	if env != nil {
		// The defaults stay unless env sets them.
		e.cfg.Env = mergeEnv(e.cfg.Env, env)
		if slices.ContainsFunc(env, isHome) {
			e.envHome = true
		}
	}
	return nil
}

// SetUserSpec runs the program as spec, USER[:GROUP] with names or decimal
// ids (as `podman run --user`), which krun-init resolves in the root: a
// name from its /etc/passwd (uid, primary group, home) and /etc/group
// (GROUP, and the supplementary groups listing the user); a number even
// when it is not there (then group 0). Unless the environment given
// (SetExec, SetEnv) sets HOME, the program's HOME is the user's home (/
// when the user has none). It replaces SetUser.
func (c *Context) SetUserSpec(spec string) error {
	if err := initconfig.ValidUser(spec); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	cfg := c.execCfg().cfg
	cfg.User = spec
	cfg.UID, cfg.GID, cfg.AdditionalGIDs = 0, 0, nil
	return nil
}

// isHome reports whether the environment entry kv sets HOME.
func isHome(kv string) bool { return strings.HasPrefix(kv, "HOME=") }

func isTerm(kv string) bool { return strings.HasPrefix(kv, "TERM=") }

// mergeEnv appends env to base, one entry per name: the last one given.
func mergeEnv(base, env []string) []string {
	return initconfig.UniqueEnv(append(slices.Clone(base), env...))
}

// SetWorkdir sets the program's working directory inside the root.
func (c *Context) SetWorkdir(dir string) error {
	if !path.IsAbs(dir) {
		return fmt.Errorf("%w: working directory %q is not absolute", ErrConfig, dir)
	}
	c.execCfg().cfg.Workdir = path.Clean(dir)
	return nil
}

// SetRlimits sets the program's resource limits, each "NAME=SOFT:HARD"
// (NAME as nofile, NOFILE or RLIMIT_NOFILE; a limit may be "unlimited").
func (c *Context) SetRlimits(limits []string) error {
	var out []initconfig.Rlimit
	seen := map[string]bool{}
	for _, l := range limits {
		r, err := initconfig.ParseRlimit(l)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrConfig, err)
		}
		if seen[r.Type] {
			return fmt.Errorf("%w: %s: %s is limited twice", ErrConfig, cli.Printable(l), r.Type)
		}
		seen[r.Type] = true
		out = append(out, r)
	}
	c.execCfg().cfg.Rlimits = out
	return nil
}

// SetHostname sets the guest's host name.
func (c *Context) SetHostname(name string) error {
	if err := initconfig.ValidHostname(name); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	c.execCfg().cfg.Hostname = name
	return nil
}

// SetPortMap forwards host ports to guest ports ("HOST:GUEST", or "N" for
// N:N; TCP, as libkrun's krun_set_port_map) through the passt
// network: the ports are added to the first --net passt device, which is
// added (with DHCP in the guest) when there is none; a host port that
// device forwards already fails Start. No map forwards no port (libkrun's
// TSI network, given none, exposes every port the guest listens on).
func (c *Context) SetPortMap(ports []string) error {
	if len(ports) == 0 {
		c.execCfg().portMap = nil
		return nil
	}
	for _, p := range ports {
		// One forward each: a comma would go on into --net's other
		// keys ("8080:80,mtu=1500" set the MTU).
		if p == "" || strings.Trim(p, "0123456789:") != "" {
			return fmt.Errorf("%w: port map: %s is not HOST:GUEST with ports 1-65535", ErrConfig, cli.Printable(p))
		}
	}
	n, err := devspec.ParseNet("passt,ports=" + strings.Join(ports, ","))
	if err != nil {
		return fmt.Errorf("%w: port map: %v", ErrConfig, err)
	}
	c.execCfg().portMap = n.Ports
	return nil
}

// SetStdio sets the program's standard input, output and error (default:
// krun-core's own). With tty the program gets a terminal in the guest and
// its stderr goes to stdout, as on any terminal; stdin should then be the
// host terminal, in raw mode (the caller's job).
func (c *Context) SetStdio(stdin, stdout, stderr *os.File, tty bool) {
	e := c.execCfg()
	e.stdin, e.stdout, e.stderr, e.tty = stdin, stdout, stderr, tty
	e.cfg.TTY = tty
}

// SetWinsize sets the terminal size the program starts with (tty only).
func (c *Context) SetWinsize(rows, cols uint16) {
	c.execCfg().cfg.Winsize = &initconfig.Winsize{Rows: rows, Cols: cols}
}

// SetInitPath sets the krun-init binary (default: InitBinary next to the
// running executable, then in the plugin directory).
func (c *Context) SetInitPath(p string) { c.execCfg().initPath = p }

// SetModulesDir sets the kernel's module tree (default: found from the
// kernel's release, see kmod.FindModulesDir).
func (c *Context) SetModulesDir(dir string) { c.execCfg().modulesDir = dir }

// Signal forwards sig to the program (through the console plugin's control
// channel) while the VM runs. It never blocks; a signal that does not fit
// the channel is dropped.
func (c *Context) Signal(sig unix.Signal) error {
	return c.control(devopts.SignalRecord(uint8(sig)))
}

// SignalAll sends sig to every process of the guest but its init (the
// program, exec'd programs and whatever they started), as runc's kill
// --all signals a container's cgroup. It never blocks, as Signal.
func (c *Context) SignalAll(sig unix.Signal) error {
	return c.control(devopts.SignalAllRecord(uint8(sig)))
}

// Resize tells the program's terminal its new size while the VM runs.
func (c *Context) Resize(rows, cols uint16) error {
	return c.control(devopts.WinsizeRecord(rows, cols))
}

func (c *Context) control(rec []byte) error {
	if c.exec == nil {
		return errors.New("vmm: no program is running")
	}
	e := c.exec
	e.controlMu.Lock()
	defer e.controlMu.Unlock()
	if e.controlW == nil && !e.ended && !e.closed {
		return e.queueLocked(rec)
	}
	if err := e.usableLocked(); err != nil {
		return err
	}
	_, err := e.controlW.Write(rec)
	return err
}

// maxPending bounds the records kept before the control channel opens.
const maxPending = 16

// queueLocked keeps a record until the control channel opens (under
// controlMu): a signal or a window size given while krun-core starts
// reaches krun-init, which holds it until the command runs. A window size
// replaces the one kept before it.
func (e *execConfig) queueLocked(rec []byte) error {
	if rec[0] == devopts.ControlWinsize {
		e.pending = slices.DeleteFunc(e.pending, func(r []byte) bool { return r[0] == devopts.ControlWinsize })
	}
	if len(e.pending) >= maxPending {
		return errors.New("vmm: too many requests before the program started")
	}
	e.pending = append(e.pending, slices.Clone(rec))
	return nil
}

// openControl makes the console plugin's control channel: it keeps record
// boundaries and carries the files of an exec (SCM_RIGHTS); the core's end
// never blocks. Records asked for before it existed go first.
func (e *execConfig) openControl() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("control channel: %w", err)
	}
	pr, pw := os.NewFile(uintptr(fds[0]), "control"), os.NewFile(uintptr(fds[1]), "control-core")
	if err := unix.SetNonblock(fds[1], true); err != nil {
		pr.Close()
		pw.Close()
		return fmt.Errorf("control channel: %w", err)
	}
	e.controlMu.Lock()
	defer e.controlMu.Unlock()
	for _, rec := range e.pending {
		if _, err := pw.Write(rec); err != nil {
			pr.Close()
			pw.Close()
			return fmt.Errorf("control channel: %w", err)
		}
	}
	e.pending = nil
	e.controlR, e.controlW = pr, pw
	return nil
}

// ErrGuestEnded: a request for the guest (Exec, Signal, Resize) came
// after it ended, while its devices were being shut down.
var ErrGuestEnded = errors.New("vmm: the guest has ended")

// usableLocked says whether the control channel takes requests (under
// controlMu).
func (e *execConfig) usableLocked() error {
	switch {
	case e.ended:
		return ErrGuestEnded
	case e.controlW == nil:
		return errors.New("vmm: no program is running")
	}
	return nil
}

// guestEnded makes later requests fail (Exec, Signal, Resize): the guest
// is gone, and the console plugin that would take them is being shut
// down (an exec it accepted then would end without a status).
func (e *execConfig) guestEnded() {
	e.controlMu.Lock()
	defer e.controlMu.Unlock()
	e.ended = true
}

// findInit returns the krun-init binary.
func (e *execConfig) findInit(pluginDir string) (string, error) {
	if e.initPath != "" {
		return e.initPath, nil
	}
	var tried []string
	if exe, err := os.Executable(); err == nil {
		tried = append(tried, filepath.Join(filepath.Dir(exe), InitBinary))
	}
	if pluginDir != "" {
		tried = append(tried, filepath.Join(pluginDir, InitBinary))
	}
	if d := os.Getenv("KRUN_PLUGIN_DIR"); d != "" {
		tried = append(tried, filepath.Join(d, InitBinary))
	}
	for _, p := range tried {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found (looked in %s)", InitBinary, strings.Join(tried, ", "))
}

// LookupInRoot resolves the program name inside root the way krun-init
// will: a name with a slash as it is, otherwise along the PATH of env; a
// relative name or PATH entry (an empty one is ".") from workdir, the
// program's working directory inside root ("" is /). The lookup cannot
// leave root (symbolic links resolve inside it). It returns the path
// inside root, or an error wrapping ErrCommandNotFound or
// ErrCommandNotExecutable.
func LookupInRoot(root, workdir, name string, env []string) (string, error) {
	if workdir == "" {
		workdir = "/"
	}
	fromWorkdir := func(p string) string {
		if path.IsAbs(p) {
			return p
		}
		return path.Join(workdir, p)
	}
	dirfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open root %s: %w", cli.Printable(root), err)
	}
	defer unix.Close(dirfd)
	check := func(p string) error {
		how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
		// EAGAIN (a rename or mount elsewhere raced a ".." of the
		// walk) is tried again a bounded number of times, and then
		// not "not found" but an error of its own.
		fd, err := container.Openat2(dirfd, p, how)
		if errors.Is(err, unix.EAGAIN) {
			return err
		}
		if err != nil {
			return ErrCommandNotFound
		}
		defer unix.Close(fd)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return ErrCommandNotFound
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 {
			return ErrCommandNotExecutable
		}
		return nil
	}
	if strings.Contains(name, "/") {
		switch err := check(fromWorkdir(name)); err {
		case nil:
			return fromWorkdir(name), nil
		case ErrCommandNotFound, ErrCommandNotExecutable:
			return "", fmt.Errorf("%w: %s in root %s", err, cli.Printable(name), cli.Printable(root))
		default:
			return "", fmt.Errorf("%s in root %s: %w", cli.Printable(name), cli.Printable(root), err)
		}
	}
	pathEnv := initconfig.DefaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	notExec := false
	for _, dir := range strings.Split(pathEnv, ":") {
		if dir == "" {
			dir = "."
		}
		p := path.Join(fromWorkdir(dir), name)
		switch err := check(p); err {
		case nil:
			return p, nil
		case ErrCommandNotExecutable:
			notExec = true
		case ErrCommandNotFound:
		default:
			return "", fmt.Errorf("%s in root %s: %w", cli.Printable(name), cli.Printable(root), err)
		}
	}
	if notExec {
		return "", fmt.Errorf("%w: %s in root %s", ErrCommandNotExecutable, cli.Printable(name), cli.Printable(root))
	}
	return "", fmt.Errorf("%w: %s in the PATH (%s) of root %s", ErrCommandNotFound, cli.Printable(name), cli.Printable(pathEnv), cli.Printable(root))
}

// mountPointInRoot checks that a read-only root has the directory a share
// is mounted on (krun-init cannot make it there), unless it lies in one of
// krun-init's own tmpfs mounts (/tmp, /run). Only metadata of the root is
// looked at, resolved inside it.
func mountPointInRoot(root, target string) error {
	if initconfig.GuestTmpfs(target) {
		return nil
	}
	dirfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open root %s: %w", root, err)
	}
	defer unix.Close(dirfd)
	// As krun-init resolves it: beneath the root, no symbolic links.
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
	fd, err := unix.Openat2(dirfd, strings.TrimPrefix(path.Clean(target), "/"), how)
	if err != nil {
		return fmt.Errorf("mount point %s is not a directory in the read-only root %s (%v): make it there, or mount the share under /tmp or /run", target, root, err)
	}
	unix.Close(fd)
	return nil
}

// checkNoMounts refuses a share with a guest mount point (FSSpec.Mount)
// in a VM without a root set: its own init mounts what it likes.
func (c *Context) checkNoMounts() error {
	for _, d := range c.devices {
		if s, ok := d.(*devspec.FSSpec); ok && s.Mount != "" {
			return fmt.Errorf("%w: share %s: mount= needs a root directory (SetRoot; run --root)", ErrConfig, s.Tag)
		}
	}
	return nil
}

// prepareExec checks the program, builds the initramfs and adds the root
// and console devices. It runs in Start, before anything is launched.
func (c *Context) prepareExec() error {
	e := c.exec
	if e.root == "" {
		return fmt.Errorf("%w: a program to run needs a root directory (SetRoot)", ErrConfig)
	}
	if len(e.cfg.Args) == 0 {
		return fmt.Errorf("%w: no program to run (SetExec)", ErrConfig)
	}
	if c.initrdPath != "" {
		return fmt.Errorf("%w: a root directory and an initrd are alternatives", ErrConfig)
	}
	if e.cfg.User != "" && e.container != nil {
		// krun-init resolves a user spec in the root it has entered; a
		// container's root it only prepares (the OCI runtime gives ids).
		return fmt.Errorf("%w: a user spec (SetUserSpec) with a container (SetContainer): give numeric ids with SetUser", ErrConfig)
	}
	if e.cfg.User != "" && !e.envHome {
		// krun-init sets the user's own.
		e.cfg.Env = slices.DeleteFunc(e.cfg.Env, isHome)
	}
	if e.tty && e.container == nil && !slices.ContainsFunc(e.cfg.Env, isTerm) {
		// A terminal without TERM leaves curses programs (vi, top, less)
		// unable to drive it: xterm, as docker and podman run -t set it
		// (a type every terminfo has; --env TERM=... names another). An
		// OCI config's environment is the engine's, which sets it.
		e.cfg.Env = append(e.cfg.Env, "TERM=xterm")
	}
	if !e.noLookup {
		if _, err := LookupInRoot(e.root, e.cfg.Workdir, e.cfg.Args[0], e.cfg.Env); err != nil {
			return err
		}
	}
	if err := c.findKernel(); err != nil {
		return err
	}
	initPath, err := e.findInit(c.pluginDir)
	if err != nil {
		return err
	}
	initBin, err := os.ReadFile(initPath)
	if err != nil {
		return fmt.Errorf("%s: %w", InitBinary, err)
	}
	// Devices: the root share, the console, then the user's.
	root := &devspec.FSSpec{Path: e.root, Tag: RootTag, ReadOnly: e.rootReadOnly, PluginOptions: e.rootOptions, OpenFiles: e.openFiles}
	e.rootShare = root
	devs := []devspec.Spec{root}
	if err := e.openControl(); err != nil {
		return err
	}
	// A regular file on stdout or stderr reaches the plugin as a pipe
	// that krun-core copies into the file: sharing the file's open file
	// description, a compromised plugin could clear O_APPEND on a `>>log`
	// and write over it, or truncate it (found in review).
	stdout, stderr, output, err := stdiopump.Outputs(e.stdout, e.stderr)
	if err != nil {
		return err
	}
	e.output = output
	console := &devspec.ConsoleSpec{Name: e.cfg.Stdio, TTY: e.tty,
		HoldStdin: e.container != nil && e.container.WaitForStart,
		Stdin:     e.stdin, Stdout: stdout, Stderr: stderr, Control: e.controlR}
	devs = append(devs, console)
	// Neither plugin is restarted (see restartable), and without them the
	// command can neither run nor be heard: their failure ends the run
	// instead of leaving it to hang.
	c.essential = map[devspec.Spec]string{root: "the root file system (virtio-fs)", console: "the command's console"}
	modules := []string{"virtio_mmio", "virtiofs", "virtio_console"}
	hasNet := false
	for _, d := range c.devices {
		switch s := d.(type) {
		case *devspec.DiskSpec:
			modules = append(modules, "virtio_blk")
		case *devspec.NetSpec:
			modules = append(modules, "virtio_net")
			if !hasNet && len(e.portMap) > 0 {
				// The first network device's passt forwards the map: two
				// passts cannot bind one host port, and one passt exits
				// on a host port given twice.
				for _, p := range e.portMap {
					if slices.ContainsFunc(s.Ports, func(q devspec.PortForward) bool { return q.Host == p.Host }) {
						return fmt.Errorf("%w: port map: host port %d is forwarded by the network device (ports=) too", ErrConfig, p.Host)
					}
				}
				s.Ports = append(slices.Clip(s.Ports), e.portMap...)
			}
			hasNet = true
		case *devspec.FSSpec:
			if e.container != nil {
				if s.Mount != "" {
					return fmt.Errorf("%w: share %s: mount= with a container (its setup says where shares go)", ErrConfig, s.Tag)
				}
				continue // mounted where the container setup says
			}
			target := "/mnt/" + s.Tag
			if s.Mount != "" {
				target = s.Mount
			}
			e.cfg.Mounts = append(e.cfg.Mounts, initconfig.Mount{Type: "virtiofs", Source: s.Tag, Target: target, ReadOnly: s.ReadOnly})
		case *devspec.VhostUserSpec: // an external back-end: its driver; a share with a known tag is mounted
			switch s.Type {
			case devspec.VirtioBlk:
				modules = append(modules, "virtio_blk")
			case devspec.VirtioNet:
				modules = append(modules, "virtio_net")
			case devspec.VirtioFS:
				if s.Tag != "" {
					e.cfg.Mounts = append(e.cfg.Mounts, initconfig.Mount{Type: "virtiofs", Source: s.Tag, Target: "/mnt/" + s.Tag})
				}
			}
		}
	}
	if !hasNet && len(e.portMap) > 0 {
		c.devices = append(c.devices, &devspec.NetSpec{Backend: "passt", Ports: e.portMap})
		modules = append(modules, "virtio_net")
		hasNet = true
	}
	if hasNet {
		e.cfg.Network = &initconfig.Network{DHCP: true}
	}
	if len(devs)+len(c.devices) > MaxDevices {
		return fmt.Errorf("%w: %d devices besides the root and the console; at most %d", ErrConfig, len(c.devices), MaxDevices-len(devs))
	}
	c.devices = append(devs, c.devices...)
	// A share inside another's mount point goes after it, or the outer
	// one would hide it (as podman orders volumes).
	slices.SortStableFunc(e.cfg.Mounts, func(a, b initconfig.Mount) int {
		return strings.Count(path.Clean(a.Target), "/") - strings.Count(path.Clean(b.Target), "/")
	})
	if err := e.cfg.Validate(); err != nil {
		return err
	}
	if e.rootReadOnly {
		for _, m := range e.cfg.Mounts {
			inShare := slices.ContainsFunc(e.cfg.Mounts, func(o initconfig.Mount) bool {
				return strings.HasPrefix(path.Clean(m.Target), path.Clean(o.Target)+"/")
			})
			if inShare {
				continue // its mount point is in the other share, not in the root
			}
			if err := mountPointInRoot(e.root, m.Target); err != nil {
				return fmt.Errorf("%w: share %s: %v", ErrConfig, m.Source, err)
			}
		}
	}
	modDir, err := c.initramfsModules()
	if err != nil {
		return err
	}
	img, _, err := initramfs.BuildBytes(initramfs.Options{Init: initBin, Config: e.cfg, Modules: modules, ModulesDir: modDir})
	if err != nil {
		return fmt.Errorf("build the initramfs: %w", err)
	}
	if e.container != nil {
		// A second archive, which the kernel unpacks after the first.
		extra, err := containerArchive(e.container)
		if err != nil {
			return err
		}
		img = append(img, extra...)
	}
	c.initrdData = bytes.NewReader(img)
	c.initrdSize = int64(len(img))
	if !c.cmdlineSet {
		c.cmdline = ExecCmdline
	}
	if !c.consoleSet {
		// The serial port writes a byte at a time: one log line per
		// console line.
		cl := c.log.Named("guest-console")
		tail := newConsoleTail()
		c.consoleTail = tail
		w := &lines.Writer{Max: 4096, Line: func(b []byte) {
			// The guest's bytes: an escape sequence or a carriage
			// return must not reach the user's terminal, nor make a
			// line that passes for another component's.
			l := cli.Printable(string(bytes.TrimRight(b, "\r")))
			cl.Debug(l)
			tail.add(l)
		}}
		tail.flush = w.Flush
		c.consoleOut = w
	}
	return nil
}

// findKernel fills in the kernel from FindKernel when none was set.
func (c *Context) findKernel() error {
	if c.kernelPath != "" {
		return nil
	}
	k, err := FindKernel()
	if err != nil {
		return err
	}
	c.kernelPath = k
	return nil
}

// ExecCmdline is the kernel command line of SetExec mode: the kernel's
// messages go to the serial console, which krun-core logs (at debug
// level) instead of showing them; the program's output travels on its own
// port.
const ExecCmdline = "console=ttyS0 quiet panic=-1"

// close closes the control pipe, then drains the output pumps and returns
// their failure to write a file. The VM's end (which the guest chooses)
// may come while a request uses the pipe: under controlMu. A pump ends
// when the plugin's end of its pipe is closed; bound, when not 0, is how
// long close waits for that: a plugin that outlived SIGKILL (in
// uninterruptible sleep; the VM's end does not wait for it) still holds
// that end.
func (e *execConfig) close(bound time.Duration) error {
	e.controlMu.Lock()
	e.closed = true
	e.pending = nil
	if e.controlW != nil {
		e.controlW.Close()
		e.controlW = nil
	}
	if e.controlR != nil {
		e.controlR.Close()
		e.controlR = nil
	}
	e.controlMu.Unlock()
	// The plugin is gone (Start shut the devices down first): once
	// krun-core's own write ends are closed, the pumps read what the
	// plugin wrote last, then the pipes' end. Nothing the command wrote
	// is lost, and it is all in the files when Start returns.
	output := e.output
	e.output = nil
	output.CloseWriters()
	if bound == 0 {
		return output.Wait()
	}
	done := make(chan error, 1)
	go func() { done <- output.Wait() }()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("the console plugin outlived SIGKILL and still holds the command's output pipes; what it had not passed on by %v later was not waited for", bound)
	}
}

// ExecEnv returns the program's environment as SetExec left it (the
// defaults merged with what was given).
func (c *Context) ExecEnv() []string {
	if c.exec == nil {
		return nil
	}
	return append([]string(nil), c.exec.cfg.Env...)
}
