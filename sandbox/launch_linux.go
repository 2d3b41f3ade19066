package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// LaunchConfig is the launcher's half of the sandbox. The zero value is the
// full sandbox with default limits, ids and profile.
type LaunchConfig struct {
	// Kind is the plugin kind being launched (blk-raw, fs-virtio, a
	// third-party name): it chooses the seccomp profile enforced from the
	// plugin's first instruction (KindProfile; Syscalls overrides it), the
	// default limits (DefaultLimits; Limits overrides them) and names the
	// plugin in the launcher's log of refused system calls.
	Kind string
	// Syscalls is the seccomp profile the trampoline enforces, with the
	// start-up calls on top. Default: KindProfile(Kind).
	Syscalls Profile
	// ExtraSyscalls are granted on top of Syscalls from the first
	// instruction: the host's consent to a third-party plugin whose policy
	// declares them (a plugin cannot grant itself anything its launcher
	// refuses). Each needs a reason; ForbiddenSyscalls are never granted.
	ExtraSyscalls []Syscall
	// RootDir is an existing directory the plugin mounts its empty,
	// read-only root over (inside its own mount namespace; the directory
	// itself is never written or changed). The plugin's id must be able to
	// reach it. Default: os.TempDir().
	RootDir string
	// HostUID and HostGID are the host ids the plugin runs as: id 0 of its
	// user namespace maps to them. 0 means the default: DefaultPluginUID
	// and DefaultPluginGID (nobody:nogroup) for a root launcher, the
	// launcher's own ids otherwise. A plugin never runs as host root, and
	// only a root launcher (CAP_SETUID, CAP_SETGID) can choose ids other
	// than its own.
	HostUID, HostGID int
	// Limits are the plugin's resource limits (zero fields: DefaultLimits(Kind)).
	Limits Limits
	// Disable lists layers the user explicitly turned off (a flag such as
	// --sandbox-disable). Apply logs a warning for each; disabling
	// namespaces also disables the empty root.
	Disable []Layer
	// Log receives the warnings and, for the life of the plugin, the
	// system calls its seccomp filter refused. nil: a logger writing to
	// stderr.
	Log Logger
	// ReadOnlyDirs makes the directories handed to the plugin readable
	// only: the trampoline's Landlock rule beneath them grants no write
	// right (a read-only share), so a plugin cannot write there even if it
	// is compromised and whatever its own policy declares; IDMapShare makes
	// the mount itself read-only too.
	ReadOnlyDirs bool
	// Trampoline is a krun-sandbox-exec binary (cmd/krun-sandbox-exec) to
	// start as the trampoline. "": krun-sandbox-exec next to this
	// process's executable if there is one, else this process's own
	// executable (/proc/self/exe), which works as well but starts slower.
	Trampoline string
}

// The ids a root launcher's plugins run as by default: nobody and nogroup.
// Choose others (a uid of their own per deployment) with
// LaunchConfig.HostUID/HostGID (krun-core: --plugin-uid, --plugin-gid).
const (
	DefaultPluginUID = 65534
	DefaultPluginGID = 65534
)

// PluginIDs returns the host uid and gid a plugin runs as with these
// settings, or an error when they cannot be used by this launcher.
func (c LaunchConfig) PluginIDs() (uid, gid int, err error) {
	euid, egid := os.Geteuid(), os.Getegid()
	uid, gid = c.HostUID, c.HostGID
	if uid < 0 || gid < 0 || uid > 1<<32-2 || gid > 1<<32-2 {
		return 0, 0, fmt.Errorf("host ids %d:%d out of range", uid, gid)
	}
	if euid == 0 {
		if uid == 0 {
			uid = DefaultPluginUID
		}
		if gid == 0 {
			gid = DefaultPluginGID
		}
		if err := checkRootUserNS(uid, gid); err != nil {
			return 0, 0, err
		}
		return uid, gid, nil
	}
	if uid == 0 {
		uid = euid
	}
	if gid == 0 {
		gid = egid
	}
	if uid != euid || gid != egid {
		return 0, 0, fmt.Errorf("plugin ids %d:%d: a launcher that is not root can only run plugins as its own ids %d:%d", uid, gid, euid, egid)
	}
	return uid, gid, nil
}

// plugGODEBUG turns off the Go runtime's cgroup-based GOMAXPROCS, which
// keeps cgroup files open for the life of the process, and its naming of
// anonymous mappings (prctl PR_SET_VMA, which the sandbox refuses).
const plugGODEBUG = "containermaxprocs=0,updatemaxprocs=0,decoratemappings=0"

// envSocketDir is go-plugin's variable for its socket directory.
const envSocketDir = "PLUGIN_UNIX_SOCKET_DIR"

// namespaceFlags are the namespaces every plugin gets.
const namespaceFlags = unix.CLONE_NEWUSER | unix.CLONE_NEWNS | unix.CLONE_NEWPID |
	unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWCGROUP

// Apply prepares cmd (not yet started; Apply must be the last change to
// it) to run a plugin in the sandbox. The command becomes the trampoline:
// this very binary (/proc/self/exe, argv[0] TrampolineName), which applies
// every layer to itself and then execs the plugin binary from an fd, so the
// plugin's first instruction already runs inside the sandbox:
//   - new user, mount, pid, net, ipc, uts and cgroup namespaces, with id 0
//     inside mapped to the plugin's host ids (PluginIDs);
//   - Pdeathsig SIGKILL (sent when the launching OS thread exits; see
//     go.dev/issue/27505) and a new session;
//   - an environment of cmd.Env only: a nil cmd.Env becomes empty instead of
//     inheriting the launcher's (which may hold secrets), plus the sandbox
//     settings in KRUN_SANDBOX and GODEBUG settings the sandbox needs;
//   - every fd of the launcher other than stdio is marked close-on-exec, so
//     the plugin gets only cmd.Stdin/Stdout/Stderr and cmd.ExtraFiles;
//   - in the trampoline, before exec: rlimits, the empty root (with
//     go-plugin's socket directory, from cmd.Env, as a private tmpfs),
//     no_new_privs, no capabilities, a Landlock domain (read-write beneath
//     the directories among cmd.ExtraFiles, socket creation in the socket
//     directory, execution of the plugin binary only) and the seccomp
//     filter of Syscalls plus the start-up calls, whose refusals are
//     reported to this process and logged in Log.
//
// A plugin that uses pluginsdk narrows this further to its own policy
// with Restrict before it reads any guest or image byte. The launcher can
// check from outside with Verify.
func (c LaunchConfig) Apply(cmd *exec.Cmd) error {
	watch, err := c.prepare(cmd)
	if err != nil {
		return err
	}
	go watch(false)
	return nil
}

// ApplyUntilStarted is Apply for a launcher that can say when cmd.Start
// has returned: afterStart must be called then, once, whether Start
// succeeded or not. The files Apply added to cmd.ExtraFiles are closed
// once the plugin has them; Apply's own supervision begins at once and
// cannot tell the race detector that they are only closed after Start
// read them (the trampoline's word comes from the child), which
// afterStart does.
func (c LaunchConfig) ApplyUntilStarted(cmd *exec.Cmd) (afterStart func(), err error) {
	watch, err := c.prepare(cmd)
	if err != nil {
		return nil, err
	}
	return func() { go watch(true) }, nil
}

// prepare is Apply without starting the supervision of the launcher's
// channel: watch runs it (it returns when the channel is done with and
// closes the files Apply added to cmd); started says that cmd.Start has
// returned.
// Ungranted lists the extra system calls of a plugin's declared policy
// that the filter this configuration installs at launch refuses: neither
// in its profile nor among ExtraSyscalls. The plugin's own Restrict can
// only narrow that filter, so those calls fail with EPERM (and are logged
// as refused). Nil when the seccomp layer is off.
func (c LaunchConfig) Ungranted(p Policy) []string {
	disabled, err := normalizeDisabled(c.Disable)
	if err != nil || slices.Contains(disabled, LayerSeccomp) {
		return nil
	}
	profile := c.Syscalls
	if profile == "" {
		profile = KindProfile(c.Kind)
	}
	rules, err := policyRules(Policy{Kind: "launch", Syscalls: profile, ExtraSyscalls: c.ExtraSyscalls})
	if err != nil {
		return nil
	}
	var out []string
	for _, s := range p.ExtraSyscalls {
		if !slices.ContainsFunc(rules, func(r rule) bool { return r.name == s.Name }) && !slices.Contains(out, s.Name) {
			out = append(out, s.Name)
		}
	}
	return out
}

// hardLimit is this process's hard limit of resource res.
func hardLimit(res int) uint64 {
	var rl unix.Rlimit
	if unix.Getrlimit(res, &rl) != nil {
		return unix.RLIM_INFINITY
	}
	return rl.Max
}

// limitsCut lists the limits of l that a hard limit of the launcher's
// (hard) lowers, as "RLIMIT_NOFILE 64 (not 16384)".
func limitsCut(l Limits, hard func(res int) uint64) []string {
	var out []string
	for _, r := range []struct {
		name string
		res  int
		want uint64
	}{
		{"RLIMIT_NOFILE", unix.RLIMIT_NOFILE, l.OpenFiles},
		{"RLIMIT_DATA", unix.RLIMIT_DATA, l.DataBytes},
		{"RLIMIT_FSIZE", unix.RLIMIT_FSIZE, l.FileBytes},
	} {
		if h := hard(r.res); r.want != 0 && h < r.want {
			out = append(out, fmt.Sprintf("%s %d (not %d)", r.name, h, r.want))
		}
	}
	return out
}

// execBlocked says why a plugin launched by this launcher could not
// execute the file f (an O_PATH fd is enough), or "" when it can: f is
// on a noexec mount, or its mode does not let the plugin's ids (a root
// launcher's; no supplementary groups) or this user (an unprivileged
// launcher's plugins run as it) execute it.
func execBlocked(f *os.File, privileged bool, uid, gid int) string {
	fi, err := f.Stat()
	if err != nil {
		return err.Error()
	}
	if noexecMount(f) {
		return "is on a file system mounted noexec"
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case privileged && ok && !execPermitted(fi.Mode().Perm(), st.Uid, st.Gid, uid, gid):
		return fmt.Sprintf("(mode %#o, owner %d:%d) is not executable by %d:%d, the ids the plugin runs as", fi.Mode().Perm(), st.Uid, st.Gid, uid, gid)
	case !privileged && unix.Faccessat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.X_OK, unix.AT_EACCESS) != nil:
		return fmt.Sprintf("(mode %#o) is not executable by this user, as whom the plugin runs", fi.Mode().Perm())
	}
	return ""
}

// execPermitted reports whether a file of mode perm owned by fuid:fgid may
// be executed by uid:gid without supplementary groups or capabilities.
func execPermitted(perm os.FileMode, fuid, fgid uint32, uid, gid int) bool {
	switch {
	case int(fuid) == uid:
		return perm&0o100 != 0
	case int(fgid) == gid:
		return perm&0o010 != 0
	}
	return perm&0o001 != 0
}

// UnusedGrants returns the extra system calls the launcher grants
// (ExtraSyscalls: the user's --plugin-syscalls) that p does not declare: a
// grant the plugin never asked for is most likely a typo or meant for
// another plugin, and it widens the launch filter for nothing.
func (c LaunchConfig) UnusedGrants(p Policy) []string {
	var out []string
	for _, g := range c.ExtraSyscalls {
		declared := slices.ContainsFunc(p.ExtraSyscalls, func(s Syscall) bool { return s.Name == g.Name })
		if !declared && !slices.Contains(out, g.Name) {
			out = append(out, g.Name)
		}
	}
	return out
}

func (c LaunchConfig) prepare(cmd *exec.Cmd) (watch func(started bool), err error) {
	log := c.logger()
	if err := CheckProc(); err != nil {
		return nil, err
	}
	disabled, err := normalizeDisabled(c.Disable)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	limits, err := c.limits()
	if err != nil {
		return nil, fmt.Errorf("sandbox: limits: %w", err)
	}
	if cut := limitsCut(limits, hardLimit); len(cut) > 0 {
		// The trampoline never raises a limit: a plugin under a
		// deployment's lower hard limit gets that one, and a virtio-fs
		// plugin with 64 open files fails the guest's lookups with
		// EMFILE (found in review, helper-143).
		log.Warn("krun-core's own hard limits are below what the plugin is to have; it gets krun-core's: raise them (ulimit -Hn, prlimit, LimitNOFILE=) where the plugin needs more",
			"plugin", c.Kind, "limits", strings.Join(cut, ", "))
	}
	profile := c.Syscalls
	if profile == "" {
		profile = KindProfile(c.Kind)
	}
	if err := (Policy{Kind: "launch", Syscalls: profile, ExtraSyscalls: c.ExtraSyscalls}).Validate(); err != nil {
		return nil, fmt.Errorf("sandbox: launch profile: %w", err)
	}
	uid, gid, err := c.PluginIDs()
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if _, set := os.LookupEnv(envName); set {
		return nil, fmt.Errorf("sandbox: the launcher's environment has %s set; a plugin client that forwards the host environment (go-plugin without SkipHostEnv) would override the sandbox settings", envName)
	}
	if cmd.Err != nil {
		return nil, fmt.Errorf("sandbox: %w", cmd.Err)
	}
	if cmd.Process != nil {
		return nil, errors.New("sandbox: the command was already started")
	}
	root := ""
	if !slices.Contains(disabled, LayerRoot) {
		root = c.RootDir
		if root == "" {
			root = os.TempDir()
		}
		root = filepath.Clean(root)
		if !validRoot(root) {
			return nil, fmt.Errorf("sandbox: root directory %q must be an absolute path other than /", root)
		}
		fi, err := os.Stat(root)
		if err != nil {
			return nil, fmt.Errorf("sandbox: root directory: %w", err)
		}
		if !fi.IsDir() {
			return nil, fmt.Errorf("sandbox: root directory %s is not a directory", root)
		}
		// The trampoline mounts the empty root over this path and then
		// remounts it by the same path, which a symbolic link on the way
		// ($TMPDIR a link to /tmp) no longer leads to once the first mount
		// covers the link's target: "make the new root read-only:
		// invalid argument" (found in review, helper-143).
		if root, err = filepath.EvalSymlinks(root); err != nil {
			return nil, fmt.Errorf("sandbox: root directory: %w", err)
		}
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	sp := cmd.SysProcAttr
	switch {
	case sp.Chroot != "":
		return nil, errors.New("sandbox: cmd.SysProcAttr.Chroot is set; the sandbox makes its own root")
	case sp.Credential != nil:
		return nil, errors.New("sandbox: cmd.SysProcAttr.Credential is set; use LaunchConfig.HostUID/HostGID")
	case len(sp.UidMappings) > 0 || len(sp.GidMappings) > 0 || sp.Unshareflags != 0:
		return nil, errors.New("sandbox: cmd.SysProcAttr already has namespace settings")
	case len(sp.AmbientCaps) > 0:
		return nil, errors.New("sandbox: cmd.SysProcAttr.AmbientCaps is set; plugins run without capabilities")
	}
	env := []string{}
	godebug := ""
	sockDir := ""
	for _, kv := range cmd.Env {
		switch {
		case strings.HasPrefix(kv, envName+"="):
		case strings.HasPrefix(kv, "GODEBUG="):
			godebug = strings.TrimPrefix(kv, "GODEBUG=") + ","
		default:
			if v, ok := strings.CutPrefix(kv, envSocketDir+"="); ok {
				sockDir = v
			}
			env = append(env, kv)
		}
	}
	if sockDir != "" {
		sockDir = filepath.Clean(sockDir)
		if !validRoot(sockDir) {
			return nil, fmt.Errorf("sandbox: %s=%q is not an absolute path other than /", envSocketDir, sockDir)
		}
	}
	privileged := os.Geteuid() == 0
	if !slices.Contains(disabled, LayerNamespaces) {
		sp.Cloneflags |= namespaceFlags
		sp.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: uid, Size: 1}}
		sp.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: gid, Size: 1}}
		// Become id 0 of the namespace before execve, so the trampoline
		// holds the namespace's capabilities it needs to pivot into its
		// empty root (a root launcher mapping to another id would
		// otherwise exec as an unmapped uid, without them). A root
		// launcher also drops its supplementary groups (setgroups stays
		// allowed in the namespace, then the trampoline drops
		// CAP_SETGID and seccomp the call); an unprivileged one must deny
		// setgroups to write the gid map, and its plugin keeps the user's
		// own groups.
		sp.GidMappingsEnableSetgroups = privileged
		sp.Credential = &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}, NoSetGroups: !privileged}
	} else if privileged {
		// No user namespace: the plugin still never runs as root.
		sp.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	}
	// Without the empty root the plugin makes its gRPC socket in the
	// launcher's directory itself: the directory must be the plugin's, and
	// the plugin reaches it through an fd (/proc/self/fd/N), since its ids
	// may not be able to walk the path to it.
	var sockFile *os.File
	if sockDir != "" && slices.Contains(disabled, LayerRoot) {
		if privileged {
			if err := giveDir(sockDir, uid, gid); err != nil {
				return nil, fmt.Errorf("sandbox: socket directory: %w", err)
			}
		}
		if sockFile, err = os.OpenFile(sockDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			return nil, fmt.Errorf("sandbox: socket directory: %w", err)
		}
		defer func() {
			if err != nil {
				sockFile.Close()
			}
		}()
	}
	// The plugin binary, opened here (the plugin's ids need no path to
	// it), executed by the trampoline from the fd.
	exe, err := os.OpenFile(cmd.Path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("sandbox: plugin binary: %w", err)
	}
	defer func() {
		if err != nil {
			exe.Close()
		}
	}()
	fi, err := exe.Stat()
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return nil, fmt.Errorf("sandbox: plugin binary %s is not an executable regular file (%v)", cmd.Path, err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && privileged && !execPermitted(fi.Mode().Perm(), st.Uid, st.Gid, uid, gid) {
		// A root launcher runs the plugin as other ids, without
		// supplementary groups: the file must be executable by them, or
		// the exec fails in the trampoline with a bare EACCES.
		return nil, fmt.Errorf("sandbox: plugin binary %s (mode %#o, owner %d:%d) is not executable by %d:%d, the ids the plugin runs as; make it executable by them (mode 0755)",
			cmd.Path, fi.Mode().Perm(), st.Uid, st.Gid, uid, gid)
	}
	if noexecMount(exe) {
		return nil, fmt.Errorf("sandbox: plugin binary %s is on a file system mounted noexec, where it cannot be executed; install the plugins on one that allows it (or name such a directory with --plugin-dir)", cmd.Path)
	}
	if !slices.Contains(disabled, LayerRoot) {
		// In the empty root an interpreter is nowhere to be found: say so
		// instead of the trampoline's "no such file or directory".
		if why := needsInterpreter(cmd.Path); why != "" {
			return nil, fmt.Errorf("sandbox: plugin binary %s %s, which the plugin's empty root does not hold; a sandboxed plugin must be a static executable (Go: CGO_ENABLED=0)", cmd.Path, why)
		}
	}
	trampFile, err := c.trampoline()
	if err != nil {
		return nil, fmt.Errorf("sandbox: trampoline: %w", err)
	}
	defer func() {
		if err != nil && trampFile != nil {
			trampFile.Close()
		}
	}()
	// The trampoline starts as the plugin's ids: a root krun-core of mode
	// 0700 or 0750 (or a krun-sandbox-exec so installed) failed every
	// launch with a bare "fork/exec /proc/self/exe: permission denied"
	// (found in review, helper-143).
	if trampFile != nil {
		if why := execBlocked(trampFile, privileged, uid, gid); why != "" {
			if c.Trampoline != "" {
				return nil, fmt.Errorf("sandbox: trampoline %s %s; make it executable by them (mode 0755)", trampFile.Name(), why)
			}
			log.Debug("krun-sandbox-exec next to krun-core is not usable: the plugins start through krun-core itself", "path", trampFile.Name(), "why", why)
			trampFile.Close()
			trampFile = nil
		}
	}
	if trampFile == nil {
		if self, serr := os.OpenFile("/proc/self/exe", unix.O_PATH|unix.O_CLOEXEC, 0); serr == nil {
			why := execBlocked(self, privileged, uid, gid)
			self.Close()
			if why != "" {
				name, _ := os.Executable()
				return nil, fmt.Errorf("sandbox: krun-core's own binary %s %s, and plugins start through it (the sandbox's trampoline); make it executable by them (mode 0755), or install %s, executable by them, next to it",
					name, why, TrampolineName)
			}
		}
	}
	var dirFDs []int
	for i, f := range cmd.ExtraFiles {
		if f == nil {
			continue
		}
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			dirFDs = append(dirFDs, 3+i)
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && !writableBy(st, uid, gid) {
				// The plugin reaches the directory's contents with its own
				// ids (a shared directory), not with the launcher's.
				log.Warn("the plugin's ids cannot write to a directory handed to it (fine for a read-only share); choose other ids (--plugin-uid, --plugin-gid) or give it the directory",
					"plugin", c.Kind, "dir", f.Name(), "owner", fmt.Sprintf("%d:%d", st.Uid, st.Gid),
					"mode", fmt.Sprintf("%#o", st.Mode&0o7777), "plugin_ids", fmt.Sprintf("%d:%d", uid, gid))
			}
		}
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("sandbox: launcher channel: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(pair[0]), "sandbox-channel"), os.NewFile(uintptr(pair[1]), "sandbox-channel-peer")
	nextFD := 3 + len(cmd.ExtraFiles)
	take := func() int { nextFD++; return nextFD - 1 }
	sockFD, trampFD := 0, 0
	if sockFile != nil {
		sockFD = take()
		for i, kv := range env {
			if strings.HasPrefix(kv, envSocketDir+"=") {
				env[i] = fmt.Sprintf("%s=/proc/self/fd/%d", envSocketDir, sockFD)
			}
		}
	}
	if trampFile != nil {
		trampFD = take()
	}
	execFD := take()
	le := launchEnv{Version: launchEnvVersion, Root: root, Disabled: disabled, Limits: limits,
		Kind: c.Kind, Syscalls: profile, Extra: c.ExtraSyscalls,
		ExecFD: execFD, ChanFD: take(), DirFDs: dirFDs, DirsReadOnly: c.ReadOnlyDirs, SocketDir: sockDir, SocketFD: sockFD, TrampolineFD: trampFD}
	sp.Pdeathsig = syscall.SIGKILL
	if !sp.Setpgid && !sp.Foreground && !sp.Setctty {
		sp.Setsid = true
	}
	// Go 1.25+ keeps /sys/fs/cgroup files open for its GOMAXPROCS updates;
	// a plugin holds no fds but the ones it was handed.
	env = append(env, "GODEBUG="+godebug+plugGODEBUG)
	cmd.Env = append(env, le.encode())
	args := cmd.Args
	if len(args) == 0 {
		args = []string{cmd.Path}
	}
	cmd.Args = append([]string{TrampolineName}, args...)
	cmd.Path = "/proc/self/exe"
	if sockFile != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, sockFile)
	}
	if trampFile != nil {
		// Executed through the child's own fd: the plugin's ids need no
		// path to it.
		cmd.ExtraFiles = append(cmd.ExtraFiles, trampFile)
		cmd.Path = fmt.Sprintf("/proc/self/fd/%d", trampFD)
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, exe, theirs)
	if err := markFDsCloseOnExec(); err != nil {
		mine.Close()
		theirs.Close()
		return nil, fmt.Errorf("sandbox: fds: %w", err)
	}
	if len(disabled) > 0 {
		log.Warn("plugin sandbox reduced at the user's request: a compromised plugin has more reach than the default sandbox allows",
			"disabled", disabled, "plugin", args[0])
	}
	kind := c.Kind
	if kind == "" {
		kind = filepath.Base(args[0])
	}
	return func(started bool) {
		if started {
			// cmd.Start has returned: the child holds its own copy of
			// the channel's other end, or there is no child, whose
			// end would then never close (a wait of chanWait).
			theirs.Close()
			theirs = nil
		}
		receiveListener(mine, theirs, kind, chanWait, log)
		exe.Close()
		if sockFile != nil {
			sockFile.Close()
		}
		if trampFile != nil {
			trampFile.Close()
		}
	}, nil
}

// trampoline opens the trampoline binary (O_PATH), or returns nil for this
// process's own executable.
func (c LaunchConfig) trampoline() (*os.File, error) {
	path := c.Trampoline
	if path == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, nil
		}
		path = filepath.Join(filepath.Dir(exe), TrampolineName)
		if fi, err := os.Stat(path); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return nil, nil // not installed: re-execute ourselves
		}
	}
	f, err := os.OpenFile(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		f.Close()
		return nil, fmt.Errorf("%s is not an executable regular file (%v)", path, err)
	}
	return f, nil
}

// limits are the plugin's resource limits: Limits over DefaultLimits(Kind).
func (c LaunchConfig) limits() (Limits, error) {
	l, d := c.Limits, DefaultLimits(c.Kind)
	if l.OpenFiles == 0 {
		l.OpenFiles = d.OpenFiles
	}
	if l.DataBytes == 0 {
		l.DataBytes = d.DataBytes
	}
	if l.FileBytes == 0 {
		l.FileBytes = d.FileBytes
	}
	return l.withDefaults()
}

// writableBy reports whether the ids may create entries in a directory
// (write and search permission), by its mode bits.
func writableBy(st *syscall.Stat_t, uid, gid int) bool {
	const w, x = 0o2, 0o1
	var bits uint32
	switch {
	case int(st.Uid) == uid:
		bits = st.Mode >> 6
	case int(st.Gid) == gid:
		bits = st.Mode >> 3
	default:
		bits = st.Mode
	}
	return bits&(w|x) == w|x
}

// giveDir hands a directory this launcher made (go-plugin's socket
// directory) to the plugin's ids.
func giveDir(dir string, uid, gid int) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir() || !ok:
		return fmt.Errorf("%s is not a directory", dir)
	case int(st.Uid) == uid && int(st.Gid) == gid:
		return nil // given already
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is not a directory of this launcher", dir)
	}
	return os.Lchown(dir, uid, gid)
}

// HostSocketPath is the path at which the launcher reaches the unix socket
// a plugin started with env (the cmd.Env Apply produced) and running as
// pid announced at addr (go-plugin's handshake). The address must name a
// socket directly inside the plugin's socket directory (a plugin chooses
// its address; it gets no other). With a private root the socket is in the
// plugin's own tmpfs, reached through /proc/PID/root.
func HostSocketPath(env []string, pid int, addr string) (string, error) {
	var dir, raw string
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, envSocketDir+"="); ok {
			dir = v
		}
		if v, ok := strings.CutPrefix(kv, envName+"="); ok {
			raw = v
		}
	}
	clean := filepath.Clean(addr)
	if dir == "" || !filepath.IsAbs(clean) || filepath.Dir(clean) != filepath.Clean(dir) {
		return "", fmt.Errorf("plugin socket %q is not inside its socket directory %q", addr, dir)
	}
	if raw == "" {
		return clean, nil
	}
	e, err := decodeLaunchEnv(raw)
	if err != nil {
		return "", fmt.Errorf("sandbox: %w", err)
	}
	switch {
	case e.SocketFD > 0:
		// The plugin named its directory through its fd of it.
		return filepath.Join(e.SocketDir, filepath.Base(clean)), nil
	case slices.Contains(e.Disabled, LayerRoot) || pid <= 0:
		return clean, nil
	}
	return fmt.Sprintf("/proc/%d/root%s", pid, clean), nil
}

func (c LaunchConfig) logger() Logger {
	if c.Log != nil {
		return c.Log
	}
	return &lineLogger{name: "sandbox", w: os.Stderr}
}

// markFDsCloseOnExec sets FD_CLOEXEC on every fd above 2 of this process.
// Go opens everything close-on-exec, but fds inherited by the launcher from
// its own parent are not, and os/exec would pass them to the plugin.
func markFDsCloseOnExec() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil {
			continue // the directory fd of ReadDir, closed by now
		}
		if flags&unix.FD_CLOEXEC == 0 {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC); err != nil {
				return fmt.Errorf("set close-on-exec on fd %d: %w", fd, err)
			}
		}
	}
	return nil
}

// Verify checks from outside that a running plugin (pid as seen by the
// launcher) is confined: every thread has NoNewPrivs 1, Seccomp 2 and no
// capabilities, its namespaces differ from the launcher's, and its limits
// are in place. Call it once the plugin has reported ready (after Restrict
// ran in it); it fails closed on anything it cannot read.
func (c LaunchConfig) Verify(pid int) error {
	disabled, err := normalizeDisabled(c.Disable)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return fmt.Errorf("sandbox: verify pid %d: %w", pid, err)
	}
	for _, t := range tasks {
		st, err := readStatus(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			return fmt.Errorf("sandbox: verify pid %d: %w", pid, err)
		}
		want := map[string]string{"NoNewPrivs": "1", "CapEff": zeroCaps, "CapPrm": zeroCaps,
			"CapInh": zeroCaps, "CapAmb": zeroCaps}
		if !slices.Contains(disabled, LayerSeccomp) {
			want["Seccomp"] = "2"
		}
		if !slices.Contains(disabled, LayerNamespaces) {
			want["CapBnd"] = zeroCaps
		}
		for _, k := range slices.Sorted(maps.Keys(want)) {
			if v := want[k]; st[k] != v {
				return fmt.Errorf("sandbox: verify pid %d thread %s: %s is %q, want %q", pid, t.Name(), k, st[k], v)
			}
		}
	}
	if !slices.Contains(disabled, LayerNamespaces) {
		for _, ns := range NamespaceNames() {
			mine, err1 := os.Readlink("/proc/self/ns/" + ns)
			theirs, err2 := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
			if err := errors.Join(err1, err2); err != nil {
				return fmt.Errorf("sandbox: verify pid %d: %w", pid, err)
			}
			if mine == theirs {
				return fmt.Errorf("sandbox: verify pid %d: shares the launcher's %s namespace", pid, ns)
			}
		}
	}
	l, err := c.limits()
	if err != nil {
		return fmt.Errorf("sandbox: limits: %w", err)
	}
	// /proc/PID/limits, not prlimit: reading another user's limits with
	// prlimit needs CAP_SYS_RESOURCE.
	lim, err := readLimits(pid)
	if err != nil {
		return fmt.Errorf("sandbox: verify pid %d: %w", pid, err)
	}
	for _, s := range []struct {
		name string
		max  uint64
	}{{"Max core file size", 0}, {"Max open files", l.OpenFiles}, {"Max data size", l.DataBytes}, {"Max locked memory", 0}} {
		cur, ok := lim[s.name]
		if !ok {
			return fmt.Errorf("sandbox: verify pid %d: no %q in /proc/%d/limits", pid, s.name, pid)
		}
		if cur[0] > s.max || cur[1] > s.max {
			return fmt.Errorf("sandbox: verify pid %d: %s is %d/%d, want at most %d", pid, s.name, cur[0], cur[1], s.max)
		}
	}
	if l.FileBytes != 0 {
		if cur, ok := lim["Max file size"]; !ok || cur[0] > l.FileBytes || cur[1] > l.FileBytes {
			return fmt.Errorf("sandbox: verify pid %d: Max file size is %d/%d, want at most %d", pid, cur[0], cur[1], l.FileBytes)
		}
	}
	if limitsTasks(disabled) {
		if cur := lim["Max processes"]; cur[0] > l.Tasks || cur[1] > l.Tasks {
			return fmt.Errorf("sandbox: verify pid %d: Max processes is %d/%d, want at most %d", pid, cur[0], cur[1], l.Tasks)
		}
	}
	return nil
}

// readLimits parses /proc/PID/limits into soft and hard values per limit
// name; "unlimited" is the maximum uint64.
func readLimits(pid int) (map[string][2]uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return nil, err
	}
	out := map[string][2]uint64{}
	lines := strings.Split(string(b), "\n")
	if len(lines) == 0 {
		return nil, errors.New("empty limits file")
	}
	// Columns are aligned under the header: name, soft, hard, units.
	hdr := lines[0]
	soft, hard := strings.Index(hdr, "Soft Limit"), strings.Index(hdr, "Hard Limit")
	units := strings.Index(hdr, "Units")
	if soft < 0 || hard < soft || units < hard {
		return nil, fmt.Errorf("limits header %q", hdr)
	}
	parse := func(s string) (uint64, error) {
		s = strings.TrimSpace(s)
		if s == "unlimited" {
			return ^uint64(0), nil
		}
		return strconv.ParseUint(s, 10, 64)
	}
	for _, ln := range lines[1:] {
		if len(ln) < units {
			continue
		}
		sv, err1 := parse(ln[soft:hard])
		hv, err2 := parse(ln[hard:units])
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("limits line %q: %w", ln, err)
		}
		out[strings.TrimSpace(ln[:soft])] = [2]uint64{sv, hv}
	}
	return out, nil
}

const zeroCaps = "0000000000000000"

// NamespaceNames are the /proc/PID/ns entries of the namespaces a plugin
// gets.
func NamespaceNames() []string {
	return []string{"user", "mnt", "pid", "net", "ipc", "uts", "cgroup"}
}

// readStatus parses a /proc status file into key: value pairs.
func readStatus(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out, nil
}

// needsInterpreter says why the executable at path needs another file to
// run ("is a script (#!...)", "is dynamically linked (...)"), or "" for a
// static executable or anything it cannot tell (exec then decides).
func needsInterpreter(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var head [2]byte
	if _, err := f.ReadAt(head[:], 0); err == nil && string(head[:]) == "#!" {
		return "is a script (#!)"
	}
	interp, ok := elfInterpreter(f)
	switch {
	case !ok:
	case interp != "":
		return fmt.Sprintf("is dynamically linked (it needs %s)", interp)
	default:
		return "is dynamically linked"
	}
	return ""
}
