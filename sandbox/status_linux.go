package sandbox

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// StatusReport says which sandbox layers this host supports and what each
// built-in plugin kind is allowed.
type StatusReport struct {
	Kernel string        `json:"kernel"`
	Arch   string        `json:"arch"`
	Layers []LayerStatus `json:"layers"`
	// PluginUID and PluginGID are the host ids plugins run as by default
	// when launched by this user (LaunchConfig.PluginIDs); PluginIDs says
	// why.
	PluginUID int    `json:"plugin_uid"`
	PluginGID int    `json:"plugin_gid"`
	PluginIDs string `json:"plugin_ids"`
	// Shares says how plugins reach shared directories (IDMapShare),
	// checked on os.TempDir(); Core what a launcher keeps after set-up
	// (DropPrivileges, KeepCapabilities).
	Shares string `json:"shares"`
	Core   string `json:"core"`
	// Launch are the system calls every plugin may make from its first
	// instruction until its own Restrict, on top of its kind's profile.
	Launch []Rule       `json:"launch_syscalls"`
	Kinds  []KindStatus `json:"kinds"`
}

// LayerStatus is one layer on this host.
type LayerStatus struct {
	Layer     Layer  `json:"layer"`
	Available bool   `json:"available"`
	Detail    string `json:"detail"`
}

// KindStatus is the sandbox of one built-in plugin kind.
type KindStatus struct {
	Kind       string   `json:"kind"`
	Profile    Profile  `json:"profile"`
	Namespaces []string `json:"namespaces"`
	Root       string   `json:"root"`
	Limits     []string `json:"limits"`
	Landlock   []string `json:"landlock"`
	Refused    string   `json:"refused"`
	Syscalls   []Rule   `json:"syscalls"`
}

// Status probes this host and describes the built-in policies. Probing
// user namespaces starts (and reaps) one short-lived child that fails its
// execve on purpose.
func Status() StatusReport {
	var r StatusReport
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		r.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	r.Arch = runtime.GOARCH

	nsErr := probeNamespaces()
	r.Layers = append(r.Layers, layerStatus(LayerNamespaces, nsErr,
		"user, mount, pid, net, ipc, uts and cgroup namespaces can be created by this user"))
	r.Layers = append(r.Layers, LayerStatus{LayerRlimits, true,
		fmt.Sprintf("RLIMIT_CORE 0, RLIMIT_MEMLOCK 0, RLIMIT_NOFILE %d, RLIMIT_DATA %d MiB by default%s; a disk plugin's RLIMIT_FSIZE from its image", DefaultOpenFiles, DefaultDataBytes>>20, nprocStatus(DefaultTasks))})
	r.Layers = append(r.Layers, layerStatus(LayerRoot, nsErr,
		"pivot_root into an empty read-only tmpfs inside the plugin's mount namespace"))
	_, nnpErr := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
	r.Layers = append(r.Layers, layerStatus(LayerNoNewPrivs, nnpErr, "PR_SET_NO_NEW_PRIVS on every thread"))
	r.Layers = append(r.Layers, LayerStatus{LayerCapabilities, true,
		"bounding, permitted, effective, inheritable and ambient sets emptied on every thread"})
	abi, llErr := landlockABI()
	llDetail := ""
	if llErr == nil {
		llDetail = landlockDetail(abi)
	}
	r.Layers = append(r.Layers, layerStatus(LayerLandlock, llErr, llDetail))
	scErr := seccompActionAvail(unix.SECCOMP_RET_ERRNO)
	scDetail := "allowlist per profile, from the plugin's first instruction, refusals answered EPERM"
	if notifyAvailable() {
		scDetail += " and logged by krun-core, which holds the listener (SECCOMP_RET_USER_NOTIF)"
	} else {
		scDetail += " without a log line (no SECCOMP_RET_USER_NOTIF)"
	}
	r.Layers = append(r.Layers, layerStatus(LayerSeccomp, scErr, scDetail))

	uid, gid, idErr := LaunchConfig{}.PluginIDs()
	switch {
	case idErr != nil:
		r.PluginIDs = "ids NOT USABLE here: " + idErr.Error()
	case os.Geteuid() == 0:
		r.PluginIDs = fmt.Sprintf("uid %d, gid %d: a root launcher's default (nobody:nogroup); --plugin-uid and --plugin-gid choose others, never 0", uid, gid)
	default:
		r.PluginIDs = fmt.Sprintf("uid %d, gid %d: this user's own ids (only root can choose others)", uid, gid)
	}
	r.PluginUID, r.PluginGID = uid, gid
	r.Shares = shareStatus()
	r.Core = "after set-up: no_new_privs, and of its capabilities only " +
		CapabilityNames(LaunchConfig{}.KeepCapabilities()) +
		" (CAP_CHOWN and CAP_DAC_OVERRIDE too without the plugins' empty root), for signalling passt and launching plugins"
	if os.Geteuid() != 0 {
		r.Core = "after set-up: no_new_privs (this user holds no capabilities to drop)"
	}
	for _, lr := range mergeRules(launchLayerRules()) {
		r.Launch = append(r.Launch, Rule{Syscall: lr.name, Args: lr.args, Reason: lr.reason, Layer: layerLaunch})
	}

	for _, kind := range BuiltinKinds {
		p, _ := DefaultPolicy(kind, 4)
		rules, _ := Rules(p)
		lim, _ := DefaultLimits(kind).withDefaults()
		ks := KindStatus{
			Kind:       kind,
			Profile:    p.Syscalls,
			Namespaces: NamespaceNames(),
			Root:       "empty read-only tmpfs; no host path reachable",
			Limits: []string{"RLIMIT_CORE 0", "RLIMIT_MEMLOCK 0",
				fmt.Sprintf("RLIMIT_NOFILE %d", lim.OpenFiles), fmt.Sprintf("RLIMIT_DATA %d MiB", lim.DataBytes>>20)},
			Refused:  "EPERM, logged by krun-core under the plugin's name",
			Syscalls: rules,
		}
		if nprocPerUserNamespace() {
			ks.Limits = append(ks.Limits, fmt.Sprintf("RLIMIT_NPROC %d", lim.Tasks))
		}
		if kind == "blk" {
			ks.Limits = append(ks.Limits, FileBytesStatus)
		}
		ks.Landlock = landlockRules(p, abi)
		r.Kinds = append(r.Kinds, ks)
	}
	return r
}

// shareStatus says how a plugin reaches a shared directory, trying an
// ID-mapped mount of os.TempDir().
func shareStatus() string {
	uid, gid, needed, err := LaunchConfig{}.ShareSwaps()
	switch {
	case err != nil:
		return "in no way yet: the plugins' ids are not usable here (above)"
	case !needed:
		return "as handed over: plugins run with this user's ids"
	}
	what := fmt.Sprintf("through an ID-mapped mount (nosuid, nodev) on which this user's uid %d and gid %d and the plugin's %d:%d are swapped: "+
		"the plugin acts in the share as this user", uid.Launcher, gid.Launcher, uid.Plugin, gid.Plugin)
	d, err := os.Open(os.TempDir())
	if err != nil {
		return what + "; " + err.Error()
	}
	defer d.Close()
	m, err := LaunchConfig{}.IDMapShare(d)
	if err != nil {
		return what + ", where the host supports it; on " + os.TempDir() + " it does not (" + err.Error() +
			"): there the plugin works with its own ids"
	}
	m.Close()
	return what + " (supported on " + os.TempDir() + "; where a share's file system has no ID-mapped mounts the plugin works with its own ids)"
}

func layerStatus(l Layer, err error, detail string) LayerStatus {
	if err != nil {
		return LayerStatus{Layer: l, Available: false, Detail: err.Error()}
	}
	return LayerStatus{Layer: l, Available: true, Detail: detail}
}

func landlockDetail(abi int) string {
	var have, miss []string
	add := func(ok bool, what string) {
		if ok {
			have = append(have, what)
		} else {
			miss = append(miss, what)
		}
	}
	add(abi >= 1, "file system")
	add(abi >= 2, "refer")
	add(abi >= 3, "truncate")
	add(abi >= 4, "TCP bind/connect")
	add(abi >= 5, "device ioctl")
	add(abi >= 6, "signal and abstract-socket scopes")
	s := fmt.Sprintf("ABI %d: %s", abi, strings.Join(have, ", "))
	if len(miss) > 0 {
		s += "; not enforced on this kernel: " + strings.Join(miss, ", ")
	}
	return s
}

func landlockRules(p Policy, abi int) []string {
	out := []string{"no file access except the rules below (files the launcher opened and handed over as fds keep working)",
		"until the plugin's own Restrict: create and remove its gRPC socket in its private socket directory (a tmpfs of its own), and execute its own binary (the trampoline's exec)"}
	if len(p.ReadWriteDirFDs) > 0 {
		out = append(out, "read, write, create, remove, rename beneath the shared directory fd; never execute, block devices or device ioctls (character devices: only the 0/0 whiteout, by seccomp)")
	}
	if len(p.ReadOnlyDirFDs) > 0 {
		out = append(out, "read beneath the read-only directory fds")
	}
	if abi >= 4 || abi == 0 {
		out = append(out, "no TCP bind or connect")
	}
	if abi >= 6 || abi == 0 {
		out = append(out, "no signals to, and no abstract unix sockets of, processes outside the plugin")
	}
	return out
}

// probeNamespaces starts a child in the plugin namespaces whose execve
// fails on purpose: ENOTDIR from execve means clone and the id maps worked;
// any other error is why namespaces are unavailable.
func probeNamespaces() error {
	attr := &syscall.ProcAttr{Sys: &syscall.SysProcAttr{
		Cloneflags:  namespaceFlags,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: unix.Geteuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: unix.Getegid(), Size: 1}},
	}}
	const path = "/dev/null/krun-sandbox-probe"
	_, err := syscall.ForkExec(path, []string{path}, attr)
	if err == nil {
		return errors.New("namespace probe: exec of a path under /dev/null succeeded")
	}
	if errors.Is(err, syscall.ENOTDIR) {
		return nil
	}
	if perr := CheckProc(); perr != nil {
		return perr
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		if h := namespaceHint(e); h != "" {
			return fmt.Errorf("cannot create the plugin namespaces: %w: %s", err, h)
		}
	}
	return fmt.Errorf("cannot create the plugin namespaces: %w", err)
}

// launchLayerRules are the launch layer's rules for Status (the exec fd is
// a placeholder: the launcher numbers it per plugin).
func launchLayerRules() []rule {
	rs := launchLayer(-1)
	for i := range rs {
		rs[i].layer = layerLaunch
		if rs[i].name == "execveat" {
			rs[i].args = "dirfd == the plugin binary's fd (opened by the launcher) && flags == AT_EMPTY_PATH"
		}
	}
	return rs
}

// nprocStatus is the thread limit's part of the rlimits line: set on
// kernels that count it per user namespace, not set on older ones.
func nprocStatus(tasks uint64) string {
	if nprocPerUserNamespace() {
		return fmt.Sprintf(", RLIMIT_NPROC %d (counted per plugin)", tasks)
	}
	return "; no RLIMIT_NPROC (this kernel counts it per uid on the whole host, before Linux 5.14)"
}
