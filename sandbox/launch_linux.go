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

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// LaunchConfig is the launcher's half of the sandbox. The zero value is the
// full sandbox with default limits.
type LaunchConfig struct {
	// RootDir is an existing directory the plugin mounts its empty,
	// read-only root over (inside its own mount namespace; the directory
	// itself is never written or changed). Default: os.TempDir().
	RootDir string
	// HostUID and HostGID are the host ids that id 0 in the plugin's user
	// namespace maps to. 0 means the launcher's effective ids. Mapping to
	// another id needs CAP_SETUID/CAP_SETGID (a root launcher); a root
	// launcher should map to an unprivileged id so that a compromised
	// plugin does not own root's files even in theory.
	HostUID, HostGID int
	// Limits are the plugin's resource limits (zero fields: defaults).
	Limits Limits
	// Disable lists layers the user explicitly turned off (a flag such as
	// --sandbox-disable). Apply logs a warning for each; disabling
	// namespaces also disables the empty root.
	Disable []Layer
	// Log receives the warnings. nil: a logger writing to stderr.
	Log hclog.Logger
}

// plugGODEBUG turns off the Go runtime's cgroup-based GOMAXPROCS, which
// keeps cgroup files open for the life of the process.
const plugGODEBUG = "containermaxprocs=0,updatemaxprocs=0"

// namespaceFlags are the namespaces every plugin gets.
const namespaceFlags = unix.CLONE_NEWUSER | unix.CLONE_NEWNS | unix.CLONE_NEWPID |
	unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWCGROUP

// Apply prepares cmd (not yet started) to run a plugin in the sandbox:
//   - new user, mount, pid, net, ipc, uts and cgroup namespaces, with id 0
//     inside mapped to HostUID/HostGID and setgroups denied;
//   - Pdeathsig SIGKILL (sent when the launching OS thread exits; see
//     go.dev/issue/27505) and a new session;
//   - an environment of cmd.Env only: a nil cmd.Env becomes empty instead of
//     inheriting the launcher's (which may hold secrets), plus the sandbox
//     settings for Restrict in KRUN_SANDBOX and GODEBUG settings that keep
//     the Go runtime from holding cgroup files open;
//   - every fd of the launcher other than stdio is marked close-on-exec, so
//     the plugin gets only cmd.Stdin/Stdout/Stderr and cmd.ExtraFiles.
//
// Go cannot run code in the child between fork and exec, so resource limits,
// the empty root, no_new_privs, capabilities, Landlock and seccomp are
// applied by the plugin itself in Restrict, before it reads hostile bytes.
// The launcher can lower the limits from outside with ApplyLimits and check
// the result with Verify.
func (c LaunchConfig) Apply(cmd *exec.Cmd) error {
	log := c.logger()
	disabled, err := normalizeDisabled(c.Disable)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	limits, err := c.Limits.withDefaults()
	if err != nil {
		return fmt.Errorf("sandbox: limits: %w", err)
	}
	if _, set := os.LookupEnv(envName); set {
		return fmt.Errorf("sandbox: the launcher's environment has %s set; a plugin client that forwards the host environment (go-plugin without SkipHostEnv) would override the sandbox settings", envName)
	}
	root := ""
	if !slices.Contains(disabled, LayerRoot) {
		root = c.RootDir
		if root == "" {
			root = os.TempDir()
		}
		root = filepath.Clean(root)
		if !validRoot(root) {
			return fmt.Errorf("sandbox: root directory %q must be an absolute path other than /", root)
		}
		fi, err := os.Stat(root)
		if err != nil {
			return fmt.Errorf("sandbox: root directory: %w", err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("sandbox: root directory %s is not a directory", root)
		}
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	sp := cmd.SysProcAttr
	switch {
	case sp.Chroot != "":
		return errors.New("sandbox: cmd.SysProcAttr.Chroot is set; the sandbox makes its own root")
	case sp.Credential != nil:
		return errors.New("sandbox: cmd.SysProcAttr.Credential is set; use LaunchConfig.HostUID/HostGID")
	case len(sp.UidMappings) > 0 || len(sp.GidMappings) > 0 || sp.Unshareflags != 0:
		return errors.New("sandbox: cmd.SysProcAttr already has namespace settings")
	case len(sp.AmbientCaps) > 0:
		return errors.New("sandbox: cmd.SysProcAttr.AmbientCaps is set; plugins run without capabilities")
	}
	if !slices.Contains(disabled, LayerNamespaces) {
		uid, gid := c.HostUID, c.HostGID
		if uid == 0 {
			uid = os.Geteuid()
		}
		if gid == 0 {
			gid = os.Getegid()
		}
		if uid < 0 || gid < 0 {
			return fmt.Errorf("sandbox: host ids %d:%d out of range", uid, gid)
		}
		sp.Cloneflags |= namespaceFlags
		sp.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: uid, Size: 1}}
		sp.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: gid, Size: 1}}
		// Become id 0 of the namespace before execve, so the plugin holds
		// the namespace's capabilities it needs to pivot into its empty
		// root (a root launcher mapping to another id would otherwise exec
		// as an unmapped uid, without them). A root launcher may also drop
		// its supplementary groups (setgroups stays allowed in the
		// namespace, then Restrict removes CAP_SETGID and seccomp the call);
		// an unprivileged one must deny setgroups to write the gid map, and
		// its plugin keeps the user's own groups.
		privileged := os.Geteuid() == 0
		sp.GidMappingsEnableSetgroups = privileged
		sp.Credential = &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}, NoSetGroups: !privileged}
	}
	sp.Pdeathsig = syscall.SIGKILL
	if !sp.Setpgid && !sp.Foreground && !sp.Setctty {
		sp.Setsid = true
	}
	env := []string{}
	godebug := ""
	for _, kv := range cmd.Env {
		switch {
		case strings.HasPrefix(kv, envName+"="):
		case strings.HasPrefix(kv, "GODEBUG="):
			godebug = strings.TrimPrefix(kv, "GODEBUG=") + ","
		default:
			env = append(env, kv)
		}
	}
	// Go 1.25+ keeps /sys/fs/cgroup files open for its GOMAXPROCS updates;
	// a plugin holds no fds but the ones it was handed.
	env = append(env, "GODEBUG="+godebug+plugGODEBUG)
	cmd.Env = append(env, launchEnv{Version: launchEnvVersion, Root: root, Disabled: disabled, Limits: limits}.encode())
	if err := markFDsCloseOnExec(); err != nil {
		return fmt.Errorf("sandbox: fds: %w", err)
	}
	if len(disabled) > 0 {
		log.Warn("plugin sandbox reduced at the user's request: a compromised plugin has more reach than the default sandbox allows",
			"disabled", disabled, "plugin", cmd.Path)
	}
	return nil
}

func (c LaunchConfig) logger() hclog.Logger {
	if c.Log != nil {
		return c.Log
	}
	return hclog.New(&hclog.LoggerOptions{Name: "sandbox", Output: os.Stderr})
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

// ApplyLimits sets the plugin's resource limits from outside with prlimit,
// right after the process started. Restrict sets the same limits from
// inside; this covers a third-party plugin that never calls Restrict.
// Limits are only ever lowered.
func (c LaunchConfig) ApplyLimits(pid int) error {
	l, err := c.Limits.withDefaults()
	if err != nil {
		return fmt.Errorf("sandbox: limits: %w", err)
	}
	for _, s := range []struct {
		res int
		v   uint64
	}{{unix.RLIMIT_CORE, 0}, {unix.RLIMIT_MEMLOCK, 0}, {unix.RLIMIT_NOFILE, l.OpenFiles}, {unix.RLIMIT_DATA, l.DataBytes}} {
		var old unix.Rlimit
		if err := unix.Prlimit(pid, s.res, nil, &old); err != nil {
			return fmt.Errorf("sandbox: rlimits: get limit %d of pid %d: %w", s.res, pid, err)
		}
		v := min(s.v, old.Max)
		if err := unix.Prlimit(pid, s.res, &unix.Rlimit{Cur: v, Max: v}, nil); err != nil {
			return fmt.Errorf("sandbox: rlimits: set limit %d of pid %d: %w", s.res, pid, err)
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
	l, err := c.Limits.withDefaults()
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
