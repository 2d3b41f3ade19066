package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Profile names a seccomp system-call set built from shared layers.
type Profile string

// The built-in profiles. Each is a union of layers (see Rules); the ipc
// layer has what vhost-user needs (sendmsg/recvmsg with descriptors,
// eventfds, mmap of guest memory):
//
//	minimal: go-runtime + ipc
//	net:     go-runtime + ipc + stream (shutdown, setsockopt)
//	block:   go-runtime + ipc + disk-io
//	io:      go-runtime + ipc + stream + disk-io (minimal, net and block)
//	fs:      go-runtime + ipc + stream + disk-io + fs-tree (the union)
const (
	ProfileMinimal Profile = "minimal"
	ProfileNet     Profile = "net"
	ProfileBlock   Profile = "block"
	ProfileIO      Profile = "io"
	ProfileFS      Profile = "fs"
)

// Profiles lists the built-in profiles.
func Profiles() []Profile {
	return []Profile{ProfileMinimal, ProfileNet, ProfileBlock, ProfileIO, ProfileFS}
}

// Syscall grants one extra system call to a third-party plugin's policy.
type Syscall struct {
	Name   string `json:"name"`   // kernel name, e.g. "memfd_create"
	Reason string `json:"reason"` // why the plugin needs it (shown by sandbox status)
}

// Policy is what a plugin declares about itself (in its Describe reply) and
// what Restrict enforces. It holds only plain fields so it can travel as JSON.
type Policy struct {
	// Kind names the plugin for logs: "blk", "net", "fs", or a third-party name.
	Kind string `json:"kind"`
	// Syscalls is the seccomp profile the plugin runs under.
	Syscalls Profile `json:"syscalls"`
	// ExtraSyscalls are allowed on top of the profile, without argument
	// filters. Names in ForbiddenSyscalls are refused by Validate.
	ExtraSyscalls []Syscall `json:"extra_syscalls,omitempty"`
	// ReadWriteDirFDs are inherited directory fds beneath which the plugin
	// may read and write (landlock path-beneath rules). Only virtio-fs needs
	// one: its shared directory. Everything else gets no file system access.
	ReadWriteDirFDs []int `json:"read_write_dir_fds,omitempty"`
	// ReadOnlyDirFDs are inherited directory fds beneath which the plugin may
	// read files and list directories.
	ReadOnlyDirFDs []int `json:"read_only_dir_fds,omitempty"`
}

// BuiltinKinds are the plugin kinds DefaultPolicy knows, as `krun-core
// sandbox status` lists them: the disks, the network, the console, the
// shared directories and the image tool (krun-core img).
var BuiltinKinds = []string{"blk", "net", "console", "fs", "img"}

// DefaultPolicy returns the policy of a built-in plugin kind
// (BuiltinKinds). For "fs", shared is the fd of the shared directory (as
// numbered in the plugin process); it is ignored for the other kinds.
func DefaultPolicy(kind string, shared int) (Policy, error) {
	switch kind {
	case "blk":
		return Policy{Kind: kind, Syscalls: ProfileBlock}, nil
	case "net":
		return Policy{Kind: kind, Syscalls: ProfileNet}, nil
	case "console":
		return Policy{Kind: kind, Syscalls: ProfileMinimal}, nil
	case "fs":
		return Policy{Kind: kind, Syscalls: ProfileFS, ReadWriteDirFDs: []int{shared}}, nil
	case "img":
		return Policy{Kind: kind, Syscalls: ProfileBlock}, nil
	}
	return Policy{}, fmt.Errorf("no built-in sandbox policy for plugin kind %q (want %s)", kind, strings.Join(BuiltinKinds, ", "))
}

// ParsePolicy decodes a JSON policy (as sent in Describe) and validates it.
func ParsePolicy(b []byte) (Policy, error) {
	var p Policy
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return Policy{}, fmt.Errorf("decode sandbox policy: %w", err)
	}
	if err := p.Validate(); err != nil {
		return Policy{}, err
	}
	return p, nil
}

// Limits on what Validate accepts; a policy is small.
const (
	maxExtraSyscalls = 64
	maxDirFDs        = 16
	maxNameLen       = 64
	maxReasonLen     = 200
)

// ErrPolicy is wrapped by every Validate error.
var ErrPolicy = errors.New("invalid sandbox policy")

// Validate checks a policy: a known profile, known and grantable extra
// system calls each with a reason, and plausible directory fds.
func (p Policy) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrPolicy, fmt.Sprintf(format, a...))
	}
	if p.Kind == "" || len(p.Kind) > maxNameLen {
		return bad("kind must be 1 to %d bytes", maxNameLen)
	}
	for _, r := range p.Kind {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return bad("kind %q: only a-z, 0-9, '-' and '_'", p.Kind)
		}
	}
	if !slices.Contains(Profiles(), p.Syscalls) {
		return bad("unknown syscall profile %q (want one of %v)", p.Syscalls, Profiles())
	}
	if len(p.ExtraSyscalls) > maxExtraSyscalls {
		return bad("%d extra syscalls, at most %d", len(p.ExtraSyscalls), maxExtraSyscalls)
	}
	nums := syscallNumbers()
	forbidden := ForbiddenSyscalls()
	base, err := policyRules(Policy{Kind: p.Kind, Syscalls: p.Syscalls})
	if err != nil {
		return err
	}
	for _, s := range p.ExtraSyscalls {
		if i := slices.IndexFunc(base, func(r rule) bool { return r.name == s.Name }); i >= 0 && base[i].alts != nil {
			return bad("extra syscall %q is allowed only with argument limits (%s); it cannot be widened", s.Name, base[i].args)
		}
		if _, ok := nums[s.Name]; !ok {
			return bad("extra syscall %q is not known on this architecture", s.Name)
		}
		if slices.Contains(forbidden, s.Name) {
			return bad("extra syscall %q is never granted to a plugin", s.Name)
		}
		if strings.TrimSpace(s.Reason) == "" || len(s.Reason) > maxReasonLen {
			return bad("extra syscall %q needs a reason of 1 to %d bytes", s.Name, maxReasonLen)
		}
	}
	if len(p.ReadWriteDirFDs)+len(p.ReadOnlyDirFDs) > maxDirFDs {
		return bad("more than %d directory fds", maxDirFDs)
	}
	for _, fd := range slices.Concat(p.ReadWriteDirFDs, p.ReadOnlyDirFDs) {
		if fd < 3 || fd > 1<<20 {
			return bad("directory fd %d out of range (3 and up: stdio is never a directory)", fd)
		}
	}
	return nil
}

// ForbiddenSyscalls are never allowed, whatever a policy asks for: they
// widen a process's rights (exec, namespaces, credentials, mounts), reach
// other processes (ptrace, process_vm_*, pidfd_*), bypass seccomp (io_uring)
// or expose large kernel attack surface (bpf, perf_event_open, userfaultfd,
// keyrings, modules). Plugins also never create or connect sockets: every
// socket they use is handed to them.
func ForbiddenSyscalls() []string {
	return []string{
		"execve", "execveat", "fork", "vfork", "clone3",
		"ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
		"pidfd_open", "pidfd_getfd", "pidfd_send_signal",
		"mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
		"fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
		"setns", "unshare",
		"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
		"setgroups", "setfsuid", "setfsgid", "capset", "prctl", "personality",
		"seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
		"bpf", "perf_event_open", "userfaultfd",
		"io_uring_setup", "io_uring_enter", "io_uring_register",
		"keyctl", "add_key", "request_key",
		"kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
		"reboot", "swapon", "swapoff", "quotactl", "syslog", "vhangup", "lookup_dcookie",
		"iopl", "ioperm", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
		"sethostname", "setdomainname",
		"open_by_handle_at", "name_to_handle_at",
		"socket", "socketpair", "connect", "bind", "listen",
		"migrate_pages", "move_pages", "memfd_secret",
	}
}

// Layer names one part of the sandbox.
type Layer string

// The layers, in the order they are applied.
const (
	// LayerNamespaces: new user, mount, pid, net, ipc, uts and cgroup
	// namespaces (launcher side, at clone).
	LayerNamespaces Layer = "namespaces"
	// LayerRlimits: no core dumps, a small RLIMIT_NOFILE, an RLIMIT_DATA cap
	// and, for a disk plugin, an RLIMIT_FSIZE from its image.
	LayerRlimits Layer = "rlimits"
	// LayerRoot: pivot_root into an empty read-only tmpfs (needs namespaces).
	LayerRoot Layer = "root"
	// LayerNoNewPrivs: PR_SET_NO_NEW_PRIVS on every thread.
	LayerNoNewPrivs Layer = "no_new_privs"
	// LayerCapabilities: empty permitted, effective, inheritable, ambient
	// and bounding sets on every thread.
	LayerCapabilities Layer = "capabilities"
	// LayerLandlock: file system, TCP and scope (signal, abstract socket) rules.
	LayerLandlock Layer = "landlock"
	// LayerSeccomp: the per-profile system call allowlist (TSYNC).
	LayerSeccomp Layer = "seccomp"
)

// Layers lists every layer in application order.
func Layers() []Layer {
	return []Layer{LayerNamespaces, LayerRlimits, LayerRoot, LayerNoNewPrivs,
		LayerCapabilities, LayerLandlock, LayerSeccomp}
}

// Disableable lists the layers a user may turn off with an explicit flag.
// The others cost nothing and work on every supported kernel.
func Disableable() []Layer {
	return []Layer{LayerNamespaces, LayerRoot, LayerLandlock, LayerSeccomp}
}

// ParseLayers parses a comma-separated list of layers to disable, as given
// to a command-line flag such as --sandbox-disable=landlock,seccomp. "all"
// stands for every layer that can be disabled.
func ParseLayers(s string) ([]Layer, error) {
	var out []Layer
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		switch {
		case f == "":
			continue
		case f == "all":
			out = append(out, Disableable()...)
		case slices.Contains(Disableable(), Layer(f)):
			out = append(out, Layer(f))
		default:
			return nil, fmt.Errorf("sandbox layer %q cannot be disabled (want one of %v or all)", f, Disableable())
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// normalizeDisabled validates a disable list and adds what it implies: the
// empty root needs the user and mount namespaces.
func normalizeDisabled(in []Layer) ([]Layer, error) {
	out := slices.Clone(in)
	for _, l := range out {
		if !slices.Contains(Disableable(), l) {
			return nil, fmt.Errorf("sandbox layer %q cannot be disabled (want one of %v)", l, Disableable())
		}
	}
	if slices.Contains(out, LayerNamespaces) && !slices.Contains(out, LayerRoot) {
		out = append(out, LayerRoot)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// Limits are the resource limits of a plugin process. Core dumps are always
// off (RLIMIT_CORE 0) and so is locked memory (RLIMIT_MEMLOCK 0).
type Limits struct {
	// OpenFiles is RLIMIT_NOFILE (soft = hard). 0 means DefaultOpenFiles.
	OpenFiles uint64 `json:"open_files,omitempty"`
	// DataBytes is RLIMIT_DATA (soft = hard): heap and other private
	// writable memory. Guest memory is a shared mapping and does not count.
	// 0 means DefaultDataBytes.
	DataBytes uint64 `json:"data_bytes,omitempty"`
	// Tasks is RLIMIT_NPROC (soft = hard): the plugin's threads and
	// processes, counted in its own user namespace, so per plugin. Set
	// only with the namespaces layer and on Linux 5.14 or later (without
	// either the count would be every process of the plugin's user on the
	// host). 0 means DefaultTasks.
	Tasks uint64 `json:"tasks,omitempty"`
	// FileBytes is RLIMIT_FSIZE (soft = hard): no regular file the plugin
	// writes can be made larger than this, by a write, ftruncate or an
	// fallocate that changes the size (such a call fails with EFBIG; the
	// trampoline ignores SIGXFSZ, and so does the Go runtime). The
	// launcher sets it for a disk plugin from its image (see
	// devspec.Opened.FileBytes), so that a compromised plugin cannot
	// fill the host's file system. 0 means no limit.
	FileBytes uint64 `json:"file_bytes,omitempty"`
}

// DefaultLimits returns the limits a launcher should use for a plugin kind,
// given as the policy kind ("fs") or the plugin kind ("fs-virtio"):
// virtio-fs holds an O_PATH fd per inode the guest knows, so it gets many
// more open files than the block and network kinds (DefaultOpenFiles).
func DefaultLimits(kind string) Limits {
	if kind == "fs" || strings.HasPrefix(kind, "fs-") {
		return Limits{OpenFiles: FSOpenFiles}
	}
	return Limits{}
}

// FileBytesStatus says how a disk plugin's Limits.FileBytes is chosen, as
// `krun-core sandbox status` shows it.
const FileBytesStatus = "RLIMIT_FSIZE per disk: a raw image's size; a qcow2 image's size plus its worst-case growth to max-size= " +
	"(without max-size=, to the capacity its plugin states, set once it has opened the image)"

// KindProfile returns the seccomp profile the trampoline enforces for a
// plugin kind from its first instruction: the built-in kinds' own profiles
// (blk-raw, blk-qcow2 and img: block; net-passt: net; console: minimal;
// fs-virtio: fs), and for any other kind ProfileIO, the union of the
// built-in profiles but fs-tree. A third-party plugin is never handed a
// directory, so fs-tree's calls beneath one are of no use to it, and
// those that act on an fd's inode (fchmod, fchown, fsetxattr,
// fremovexattr, utimensat, fchmodat2 with AT_EMPTY_PATH) would let it
// change the mode (set-uid, world-writable), group, times and extended
// attributes of a file its user handed it read-only (file.NAME=PATH)
// whenever it runs with the file owner's ids: always under a krun-core
// that is not root (found in review, helper-152). The user grants any of
// them with --plugin-syscalls. A plugin's own Restrict narrows it further
// to the policy it declares.
func KindProfile(kind string) Profile {
	switch kind {
	case "blk", "blk-raw", "blk-qcow2", "img":
		return ProfileBlock
	case "net", "net-passt":
		return ProfileNet
	case "console":
		return ProfileMinimal
	case "fs", "fs-virtio":
		return ProfileFS
	}
	return ProfileIO
}

// Defaults for Limits.
const (
	DefaultOpenFiles = 256
	DefaultDataBytes = 1 << 30
	// DefaultTasks bounds a plugin's threads well above what one needs
	// (a disk of 64 queues with 8 request goroutines each blocked in the
	// kernel: about 600), so that a compromised plugin cannot take the
	// host's pids and threads.
	DefaultTasks = 1024
	minTasks     = 64
	FSOpenFiles  = 16384
	minOpenFiles = 16
	minDataBytes = 64 << 20
)

// withDefaults fills zero fields and checks the values are workable.
func (l Limits) withDefaults() (Limits, error) {
	if l.OpenFiles == 0 {
		l.OpenFiles = DefaultOpenFiles
	}
	if l.DataBytes == 0 {
		l.DataBytes = DefaultDataBytes
	}
	if l.Tasks == 0 {
		l.Tasks = DefaultTasks
	}
	if l.Tasks < minTasks {
		return l, fmt.Errorf("tasks limit %d below %d: a Go plugin needs threads", l.Tasks, minTasks)
	}
	if l.OpenFiles < minOpenFiles {
		return l, fmt.Errorf("open-files limit %d below %d", l.OpenFiles, minOpenFiles)
	}
	if l.DataBytes < minDataBytes {
		return l, fmt.Errorf("data limit %d below %d bytes: a Go plugin cannot start", l.DataBytes, minDataBytes)
	}
	return l, nil
}

// envName is the environment variable through which LaunchConfig.Apply hands
// its settings to Restrict in the plugin.
const envName = "KRUN_SANDBOX"

// launchEnv is the launcher's half of the sandbox, as the trampoline and
// the plugin's Restrict see it.
type launchEnv struct {
	Version  int     `json:"v"`
	Root     string  `json:"root,omitempty"`
	Disabled []Layer `json:"disabled,omitempty"`
	Limits   Limits  `json:"limits"`
	// Kind names the plugin in the launcher's logs.
	Kind string `json:"kind,omitempty"`
	// Syscalls and Extra are the seccomp profile the trampoline enforces
	// (with the launch layer on top).
	Syscalls Profile   `json:"syscalls"`
	Extra    []Syscall `json:"extra,omitempty"`
	// ExecFD is the plugin binary (O_PATH), ChanFD the socket on which the
	// trampoline hands the seccomp listener to the launcher. Both are
	// close-on-exec in the plugin.
	ExecFD int `json:"exec_fd"`
	ChanFD int `json:"chan_fd"`
	// DirFDs are the directories among the handed-in fds: the trampoline's
	// Landlock domain allows reading and writing beneath them (never
	// executing); the plugin's own policy may narrow that.
	DirFDs []int `json:"dir_fds,omitempty"`
	// DirsReadOnly narrows that to reading (LaunchConfig.ReadOnlyDirs).
	DirsReadOnly bool `json:"dirs_read_only,omitempty"`
	// SocketDir is go-plugin's socket directory (PLUGIN_UNIX_SOCKET_DIR):
	// a private tmpfs in the plugin's root, the only place it may create
	// files.
	SocketDir string `json:"socket_dir,omitempty"`
	// SocketFD, without the empty root, is the plugin's fd of SocketDir:
	// PLUGIN_UNIX_SOCKET_DIR is /proc/self/fd/SocketFD, and it stays open.
	SocketFD int `json:"socket_fd,omitempty"`
	// TrampolineFD is the trampoline binary's fd, when it is not the
	// launcher's own executable; close-on-exec in the plugin.
	TrampolineFD int `json:"trampoline_fd,omitempty"`
}

// launchEnvVersion 2: the trampoline applies the sandbox before exec.
const launchEnvVersion = 2

func (e launchEnv) encode() string {
	b, err := json.Marshal(e)
	if err != nil {
		panic(err) // plain struct of strings and integers: cannot fail
	}
	return envName + "=" + string(b)
}

func decodeLaunchEnv(v string) (launchEnv, error) {
	var e launchEnv
	dec := json.NewDecoder(strings.NewReader(v))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return e, fmt.Errorf("decode %s: %w", envName, err)
	}
	if e.Version != launchEnvVersion {
		return e, fmt.Errorf("%s version %d, want %d (launcher and plugin from different builds?)", envName, e.Version, launchEnvVersion)
	}
	d, err := normalizeDisabled(e.Disabled)
	if err != nil {
		return e, fmt.Errorf("%s: %w", envName, err)
	}
	e.Disabled = d
	if e.Limits, err = e.Limits.withDefaults(); err != nil {
		return e, fmt.Errorf("%s: %w", envName, err)
	}
	if !slices.Contains(e.Disabled, LayerRoot) && !validRoot(e.Root) {
		return e, fmt.Errorf("%s: root %q is not an absolute directory path other than /", envName, e.Root)
	}
	if e.SocketDir != "" && !validRoot(e.SocketDir) {
		return e, fmt.Errorf("%s: socket directory %q is not an absolute path other than /", envName, e.SocketDir)
	}
	if e.ExecFD < 3 || e.ChanFD < 3 || e.ExecFD == e.ChanFD {
		return e, fmt.Errorf("%s: exec fd %d and channel fd %d must be distinct fds above 2", envName, e.ExecFD, e.ChanFD)
	}
	if e.SocketFD != 0 && (e.SocketFD < 3 || e.SocketFD == e.ExecFD || e.SocketFD == e.ChanFD || e.SocketDir == "") {
		return e, fmt.Errorf("%s: socket fd %d", envName, e.SocketFD)
	}
	if t := e.TrampolineFD; t != 0 && (t < 3 || t == e.ExecFD || t == e.ChanFD || t == e.SocketFD) {
		return e, fmt.Errorf("%s: trampoline fd %d", envName, t)
	}
	if err := (Policy{Kind: "launch", Syscalls: e.Syscalls, ExtraSyscalls: e.Extra}).Validate(); err != nil {
		return e, fmt.Errorf("%s: %w", envName, err)
	}
	return e, nil
}

func validRoot(p string) bool {
	return strings.HasPrefix(p, "/") && p != "/" && !strings.ContainsRune(p, 0)
}

// ParseHostID parses a --plugin-uid or --plugin-gid value: "" is 0, the
// default (LaunchConfig.PluginIDs); otherwise a host id from 1 to
// 4294967294. 0 is refused: a plugin never runs as host root.
func ParseHostID(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	switch {
	case err != nil || n == 1<<32-1:
		return 0, fmt.Errorf("%q is not a host id (1 to 4294967294)", s)
	case n == 0:
		return 0, errors.New("0: plugins never run as host root")
	}
	return int(n), nil
}
