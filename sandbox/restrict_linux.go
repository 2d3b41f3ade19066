package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Restrict confines the calling plugin process; call it once, after the
// plugin's gRPC listener exists and before it reads any guest or image byte.
// It applies, in order: a check that the launcher's namespaces are in place,
// resource limits, the empty read-only root, no_new_privs, an empty
// capability set, Landlock and the seccomp allowlist of p. Every step is
// fail-closed: the first that cannot be applied is returned as a one-line
// error naming its layer, and the caller must exit. Only layers the user
// disabled on the launcher side (LaunchConfig.Disable) are skipped, each
// with a warning in log.
//
// Landlock and no_new_privs are per-thread in the kernel; Restrict applies
// them on every OS thread of the process (syscall.AllThreadsSyscall) and
// installs seccomp with SECCOMP_FILTER_FLAG_TSYNC, so the binary must be
// built without cgo.
func Restrict(p Policy, log hclog.Logger) error {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	raw, ok := os.LookupEnv(envName)
	if !ok {
		return fmt.Errorf("sandbox: launcher: %s is not set: the plugin was not started through sandbox.LaunchConfig.Apply; refusing to run unsandboxed", envName)
	}
	env, err := decodeLaunchEnv(raw)
	if err != nil {
		return fmt.Errorf("sandbox: launcher: %w", err)
	}
	if mode, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0); err != nil || mode != 0 {
		return fmt.Errorf("sandbox: seccomp: process already has a filter (Restrict called twice?)")
	}
	for _, l := range env.Disabled {
		log.Warn("sandbox layer disabled at the user's request", "layer", l, "plugin", p.Kind)
	}
	// Go 1.25+ re-reads cgroup files to adjust GOMAXPROCS; setting it
	// explicitly turns that off (there are no such files after Restrict).
	// Two Ps at least, so the seccomp supervisor can run while another
	// thread waits for its answer.
	runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0)))
	// The local time zone is loaded lazily, from /etc/localtime, the first
	// time a time is formatted (a log line). After Restrict that open is
	// refused and reported by the seccomp supervisor, whose own log line
	// would need the zone again: load it now, while files can be opened.
	_, _ = time.Now().Zone()

	var applied []string
	var landlockInfo, seccompInfo string
	steps := []struct {
		layer Layer
		apply func() error
	}{
		{LayerNamespaces, checkNamespaces},
		{LayerRlimits, func() error { return applyRlimits(env.Limits) }},
		{LayerRoot, func() error { return enterEmptyRoot(env.Root) }},
		{LayerNoNewPrivs, applyNoNewPrivs},
		{LayerCapabilities, dropCapabilities},
		{LayerLandlock, func() error {
			acc, err := applyLandlock(p)
			landlockInfo = fmt.Sprintf("fs=%#x net=%#x scoped=%#x", acc.fs, acc.net, acc.scoped)
			return err
		}},
		{LayerSeccomp, func() error {
			res, err := applySeccomp(p, log)
			seccompInfo = fmt.Sprintf("%s, %d instructions, refusals logged: %v", p.Syscalls, res.instructions, res.notify)
			return err
		}},
	}
	for _, s := range steps {
		if slices.Contains(env.Disabled, s.layer) {
			continue
		}
		log.Debug("sandbox: applying layer", "layer", s.layer)
		if err := s.apply(); err != nil {
			return fmt.Errorf("sandbox: %s: %w", s.layer, err)
		}
		applied = append(applied, string(s.layer))
	}
	log.Info("sandbox applied", "plugin", p.Kind, "layers", strings.Join(applied, ","),
		"landlock", landlockInfo, "seccomp", seccompInfo)
	return nil
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

// applyRlimits lowers soft and hard limits together so they cannot be
// raised again (that needs CAP_SYS_RESOURCE in the initial namespace).
func applyRlimits(l Limits) error {
	set := []struct {
		name string
		res  int
		v    uint64
	}{
		{"RLIMIT_CORE", unix.RLIMIT_CORE, 0},
		{"RLIMIT_MEMLOCK", unix.RLIMIT_MEMLOCK, 0},
		{"RLIMIT_NOFILE", unix.RLIMIT_NOFILE, l.OpenFiles},
		{"RLIMIT_DATA", unix.RLIMIT_DATA, l.DataBytes},
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
// pivots into it and detaches the old root. Needs CAP_SYS_ADMIN in our own
// user namespace, which the launcher's namespaces give us.
func enterEmptyRoot(dir string) error {
	if !validRoot(dir) {
		return fmt.Errorf("mount point %q is not an absolute path other than /", dir)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	oldRoot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open old root: %w", err)
	}
	defer unix.Close(oldRoot)
	const flags = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	if err := unix.Mount("krun-sandbox", dir, "tmpfs", flags, "size=4k,nr_inodes=2,mode=0555"); err != nil {
		return fmt.Errorf("mount empty tmpfs on %s: %w", dir, err)
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
	if ents, err := os.ReadDir("/"); err != nil || len(ents) != 0 {
		return fmt.Errorf("new root not empty (%d entries, %v)", len(ents), err)
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

func applyNoNewPrivs() error {
	if err := prctlAllThreads(unix.PR_SET_NO_NEW_PRIVS, 1); err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return fmt.Errorf("%w (binary built with cgo? build plugins with CGO_ENABLED=0)", err)
		}
		return err
	}
	v, err := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
	if err != nil || v != 1 {
		return fmt.Errorf("PR_GET_NO_NEW_PRIVS = %d after setting it (%v)", v, err)
	}
	return nil
}

// dropCapabilities empties every capability set of every thread. The
// bounding set can only be cut with CAP_SETPCAP (we have it as root of our
// user namespace); without it (namespaces disabled, unprivileged launcher)
// the permitted set is already empty and the bounding set only matters at
// execve, which no_new_privs and seccomp rule out.
func dropCapabilities() error {
	eff, _, _, err := capget()
	if err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	if eff&(1<<unix.CAP_SETPCAP) != 0 {
		for c := 0; c <= 63; c++ {
			in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0)
			if err != nil {
				break // EINVAL: past the last capability of this kernel
			}
			if in == 0 {
				continue
			}
			if err := prctlAllThreads(unix.PR_CAPBSET_DROP, uintptr(c)); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	}
	if err := prctlAllThreads(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL); err != nil {
		return fmt.Errorf("clear ambient set: %w", err)
	}
	if err := capsetZeroAllThreads(); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	eff, perm, inh, err := capget()
	if err != nil || eff|perm|inh != 0 {
		return fmt.Errorf("capabilities left after dropping: eff %#x perm %#x inh %#x (%v)", eff, perm, inh, err)
	}
	return nil
}
