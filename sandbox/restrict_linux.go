package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// restricted is set once Restrict starts applying layers: a process-wide
// fact (Landlock domains and seccomp filters are never lifted), so kept
// per process.
var restricted atomic.Bool

// Restrict narrows the sandbox of the calling plugin process to its own
// policy p; call it once, before it reads any guest or image byte.
//
// By the time the plugin runs, the launcher's trampoline (see Apply) has
// already applied every layer: namespaces, rlimits, the empty root,
// no_new_privs, no capabilities, a Landlock domain and a seccomp filter
// (the launch profile plus the start-up calls). Restrict checks that this
// is so and stacks on it, on every thread, a Landlock domain with only the
// policy's directory rules and a seccomp filter that refuses (EPERM) what
// the trampoline's filter allows but p does not: the start-up calls (gRPC
// listener, file creation in the socket directory, exec, Landlock and
// seccomp themselves) and whatever the launch profile has beyond p. Calls
// that the trampoline's filter refuses are still refused by it and logged
// by the launcher.
//
// Every step fails closed: Restrict returns a one-line error naming the
// layer ("sandbox: landlock: ...") and the caller must exit. Layers the
// user disabled on the launcher side (LaunchConfig.Disable) are skipped,
// each with a warning in log.
//
// The Landlock domain is applied with syscall.AllThreadsSyscall and the
// filter with SECCOMP_FILTER_FLAG_TSYNC, so the binary must be built
// without cgo.
func Restrict(p Policy, log Logger) error {
	if log == nil {
		log = nopLogger{}
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	if restricted.Load() {
		return errors.New("sandbox: Restrict already ran in this process (pluginsdk's Serve applies the plugin's policy; a plugin does not call Restrict itself)")
	}
	raw, ok := os.LookupEnv(envName)
	if !ok {
		return fmt.Errorf("sandbox: launcher: %s is not set: the plugin was not started through sandbox.LaunchConfig.Apply; refusing to run unsandboxed", envName)
	}
	env, err := decodeLaunchEnv(raw)
	if err != nil {
		return fmt.Errorf("sandbox: launcher: %w", err)
	}
	for _, l := range env.Disabled {
		log.Warn("sandbox layer disabled at the user's request", "layer", l, "plugin", p.Kind)
	}
	// The local time zone is loaded lazily, the first time a time is
	// formatted. There is no /etc/localtime in the empty root: load (and
	// miss) it now, while the trampoline's filter still allows the open.
	_, _ = time.Now().Zone()
	off := func(l Layer) bool { return slices.Contains(env.Disabled, l) }
	if !off(LayerNamespaces) {
		if pid := os.Getpid(); pid != 1 {
			return fmt.Errorf("sandbox: namespaces: pid %d: not the init of a new pid namespace (not started by the trampoline?)", pid)
		}
	}
	if !off(LayerSeccomp) {
		if mode, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0); err != nil || mode != 2 {
			return fmt.Errorf("sandbox: seccomp: the launcher's filter is not in place (mode %d, %v); not started by the trampoline?", mode, err)
		}
	}
	if missing := beyondLaunch(p, env); len(missing) > 0 {
		log.Warn("sandbox: the policy allows system calls the launcher's filter refuses; they stay refused",
			"plugin", p.Kind, "syscalls", strings.Join(missing, ","))
	}
	// From here on layers go in; a second call would find the first's
	// narrowing (it refuses PR_GET_SECCOMP) and misreport it.
	restricted.Store(true)
	var applied []string
	var landlockInfo, seccompInfo string
	if !off(LayerLandlock) {
		acc, err := applyLandlock(p)
		if err != nil {
			return fmt.Errorf("sandbox: %s: %w", LayerLandlock, err)
		}
		landlockInfo = fmt.Sprintf("fs=%#x net=%#x scoped=%#x", acc.fs, acc.net, acc.scoped)
		applied = append(applied, string(LayerLandlock))
	}
	if !off(LayerSeccomp) {
		n, err := applyNarrowing(p, env)
		if err != nil {
			return fmt.Errorf("sandbox: %s: %w", LayerSeccomp, err)
		}
		seccompInfo = fmt.Sprintf("%s within the launcher's %s, %d instructions", p.Syscalls, env.Syscalls, n)
		applied = append(applied, string(LayerSeccomp))
	}
	log.Info("sandbox applied", "plugin", p.Kind, "narrowed", strings.Join(applied, ","),
		"landlock", landlockInfo, "seccomp", seccompInfo)
	return nil
}

// beyondLaunch lists the system calls p allows that the trampoline's
// filter does not allow at all.
func beyondLaunch(p Policy, e launchEnv) []string {
	outer, err1 := launchRules(e)
	inner, err2 := policyRules(p)
	if err1 != nil || err2 != nil {
		return nil
	}
	var out []string
	for _, r := range inner {
		if !slices.ContainsFunc(outer, func(o rule) bool { return o.name == r.name }) {
			out = append(out, r.name)
		}
	}
	return out
}

// initUserNSInode is PROC_USER_INIT_INO, the inode of the initial user
// namespace in /proc/*/ns/user.
const initUserNSInode = 0xEFFFFFFD

// checkNamespaces verifies, from inside, what the launcher was to set up: a
// user namespace other than the initial one, a new pid namespace (we are its
// init) and a network namespace with only a loopback device.
func checkNamespaces() error {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/user", &st); err != nil {
		return fmt.Errorf("stat /proc/self/ns/user: %w", err)
	}
	if st.Ino == initUserNSInode {
		return errors.New("running in the initial user namespace")
	}
	if pid := os.Getpid(); pid != 1 {
		return fmt.Errorf("pid %d: not the init of a new pid namespace", pid)
	}
	b, err := os.ReadFile("/proc/self/net/dev")
	if err != nil {
		return fmt.Errorf("read /proc/self/net/dev: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 0; sc.Scan(); line++ {
		if line < 2 {
			continue // headers
		}
		name, _, _ := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if name != "lo" {
			return fmt.Errorf("network device %q visible: not a new network namespace", name)
		}
	}
	return nil
}

// nprocPerUserNamespace reports whether this kernel counts RLIMIT_NPROC
// per user namespace (Linux 5.14 and later). Before, the count was every
// process of the uid on the host: all the plugins running as nobody, and
// the host's own, would share one plugin's limit.
func nprocPerUserNamespace() bool {
	var uts unix.Utsname
	if unix.Uname(&uts) != nil {
		return false
	}
	return kernelAtLeast(unix.ByteSliceToString(uts.Release[:]), 5, 14)
}

// kernelAtLeast reports whether release (uname -r) is major.minor or later.
func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

// limitsTasks reports whether RLIMIT_NPROC (Limits.Tasks) is set: only
// where it counts the plugin's own threads, in its own user namespace.
func limitsTasks(disabled []Layer) bool {
	return !slices.Contains(disabled, LayerNamespaces) && nprocPerUserNamespace()
}

// applyRlimits lowers soft and hard limits together so they cannot be
// raised again (that needs CAP_SYS_RESOURCE in the initial namespace);
// RLIMIT_NPROC too when tasks is set (limitsTasks), and RLIMIT_FSIZE when
// l.FileBytes is.
func applyRlimits(l Limits, tasks bool) error {
	type rlimit struct {
		name string
		res  int
		v    uint64
	}
	set := []rlimit{
		{"RLIMIT_CORE", unix.RLIMIT_CORE, 0},
		{"RLIMIT_MEMLOCK", unix.RLIMIT_MEMLOCK, 0},
		{"RLIMIT_NOFILE", unix.RLIMIT_NOFILE, l.OpenFiles},
		{"RLIMIT_DATA", unix.RLIMIT_DATA, l.DataBytes},
	}
	if tasks {
		set = append(set, rlimit{"RLIMIT_NPROC", unix.RLIMIT_NPROC, l.Tasks})
	}
	if l.FileBytes != 0 {
		set = append(set, rlimit{"RLIMIT_FSIZE", unix.RLIMIT_FSIZE, l.FileBytes})
	}
	for _, s := range set {
		var old unix.Rlimit
		if err := unix.Prlimit(0, s.res, nil, &old); err != nil {
			return fmt.Errorf("get %s: %w", s.name, err)
		}
		v := min(s.v, old.Max) // never try to raise
		if err := unix.Prlimit(0, s.res, &unix.Rlimit{Cur: v, Max: v}, nil); err != nil {
			return fmt.Errorf("set %s to %d: %w", s.name, v, err)
		}
	}
	return nil
}

// enterEmptyRoot replaces the file system view of the plugin with an empty,
// read-only tmpfs: it mounts one over dir (any existing directory: the
// mount is private to our mount namespace and hides what is underneath),
// pivots into it and detaches the old root. When sockDir is set, the new
// root holds that path (and nothing else), with a small writable tmpfs of
// its own mounted there: go-plugin's socket directory, where the plugin
// creates its gRPC socket and the launcher reaches it through
// /proc/PID/root. Needs CAP_SYS_ADMIN in our own user namespace, which the
// launcher's namespaces give us.
func enterEmptyRoot(dir, sockDir string) error {
	if !validRoot(dir) {
		return fmt.Errorf("mount point %q is not an absolute path other than /", dir)
	}
	if sockDir != "" && !validRoot(sockDir) {
		return fmt.Errorf("socket directory %q is not an absolute path other than /", sockDir)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	oldRoot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open old root: %w", err)
	}
	defer unix.Close(oldRoot)
	const flags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	if err := unix.Mount("krun-sandbox", dir, "tmpfs", flags, "size=4k,nr_inodes=16,mode=0555"); err != nil {
		return fmt.Errorf("mount empty tmpfs on %s: %w", dir, err)
	}
	top := ""
	if sockDir != "" {
		rel := strings.TrimPrefix(filepath.Clean(sockDir), "/")
		top, _, _ = strings.Cut(rel, "/")
		at := filepath.Join(dir, rel)
		if err := os.MkdirAll(at, 0o755); err != nil {
			return fmt.Errorf("socket directory in the new root: %w", err)
		}
		// 0750: the launcher reaches the socket as a member of the
		// plugin's group (LaunchConfig.SocketGroup), also once it has
		// dropped its capabilities.
		if err := unix.Mount("krun-sandbox-sock", at, "tmpfs", flags, "size=64k,nr_inodes=16,mode=0750"); err != nil {
			return fmt.Errorf("mount the socket directory's tmpfs: %w", err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY|flags, ""); err != nil {
		return fmt.Errorf("make the new root read-only: %w", err)
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("chdir %s: %w", dir, err)
	}
	if perr := unix.PivotRoot(".", "."); perr != nil {
		if !errors.Is(perr, unix.EINVAL) || !rootIsInitramfs() {
			return fmt.Errorf("pivot_root: %w", perr)
		}
		// The root is the initramfs (rootfs), which pivot_root cannot
		// move. Do what switch_root does: move the empty tmpfs over /
		// and chroot into it. rootfs stays in this mount namespace,
		// covered by the tmpfs and unreachable by any path; the
		// capabilities and seccomp layers that follow take away
		// chroot, mount and umount.
		if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("pivot_root: %v; move the empty root over the initramfs: %w", perr, err)
		}
		if err := unix.Chroot("."); err != nil {
			return fmt.Errorf("chroot into the empty root: %w", err)
		}
	} else {
		// The old root is now stacked on the new one; detach it and
		// everything under it.
		if err := unix.Fchdir(oldRoot); err != nil {
			return fmt.Errorf("fchdir old root: %w", err)
		}
		if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
			return fmt.Errorf("detach old root: %w", err)
		}
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs("/", &sfs); err != nil {
		return fmt.Errorf("statfs /: %w", err)
	}
	if sfs.Type != unix.TMPFS_MAGIC || sfs.Flags&unix.ST_RDONLY == 0 {
		return fmt.Errorf("new root is not a read-only tmpfs (type %#x flags %#x)", sfs.Type, sfs.Flags)
	}
	ents, err := os.ReadDir("/")
	if err != nil || len(ents) > 1 || len(ents) == 1 && ents[0].Name() != top || len(ents) == 0 && top != "" {
		return fmt.Errorf("new root holds %d entries (%v), want only %q", len(ents), err, top)
	}
	return nil
}

// rootIsInitramfs reports whether this mount namespace's root is the
// kernel's rootfs (an initramfs that was never switched away from).
func rootIsInitramfs() bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	return err == nil && mountinfoRootIsRootfs(b)
}

// mountinfoRootIsRootfs reports whether a /proc/PID/mountinfo text has the
// kernel's rootfs mounted at /.
func mountinfoRootIsRootfs(b []byte) bool {
	for _, line := range strings.Split(string(b), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && f[4] == "/" && g[0] == "rootfs" {
			return true
		}
	}
	return false
}
