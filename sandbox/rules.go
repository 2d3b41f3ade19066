package sandbox

import (
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Rule is one allowed system call of a profile, as reported by Status.
type Rule struct {
	Syscall string `json:"syscall"`
	Args    string `json:"args,omitempty"` // constraint on the arguments; empty: any
	Reason  string `json:"reason"`
	Layer   string `json:"layer"` // the seccomp layer that grants it
}

// argCond is one test on a system call argument: (arg & mask) == value, on
// all 64 bits. When self is set, value is the caller's pid, filled in when
// the filter is built.
type argCond struct {
	arg   int
	mask  uint64
	value uint64
	self  bool
}

// rule allows one system call, unconditionally (alts == nil) or when the
// arguments match any of alts (each an AND of conditions).
type rule struct {
	name   string
	args   string // human-readable form of alts
	reason string
	layer  string
	alts   [][]argCond
}

func allow(name, reason string) rule { return rule{name: name, reason: reason} }

func allowIf(name, args, reason string, alts ...[]argCond) rule {
	return rule{name: name, args: args, reason: reason, alts: alts}
}

func eq(arg int, v uint64) argCond { return argCond{arg: arg, mask: ^uint64(0), value: v} }

func masked(arg int, mask, v uint64) argCond { return argCond{arg: arg, mask: mask, value: v} }

func isSelf(arg int) argCond { return argCond{arg: arg, mask: ^uint64(0), self: true} }

func all(c ...argCond) []argCond { return c }

// oneOf allows the call when argument arg equals any of vs.
func oneOf(arg int, vs ...uint64) [][]argCond {
	out := make([][]argCond, len(vs))
	for i, v := range vs {
		out[i] = all(eq(arg, v))
	}
	return out
}

// goThreadCloneFlags are the flags the Go runtime passes to clone for a new
// OS thread (runtime/os_linux.go cloneFlags). Anything else (a fork, a new
// namespace) is refused.
const goThreadCloneFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES |
	unix.CLONE_SIGHAND | unix.CLONE_SYSVSEM | unix.CLONE_THREAD

// Seccomp layer names.
const (
	layerGoRuntime = "go-runtime"
	layerIPC       = "ipc"
	layerStream    = "stream"
	layerDiskIO    = "disk-io"
	layerFSTree    = "fs-tree"
	layerExtra     = "declared"
	layerLaunch    = "launch"
)

// goRuntimeLayer is what any Go program needs once running, plus logging
// through hclog to stderr. The seccomp listener is not the plugin's: the
// launcher holds it (see supervise), so no SECCOMP_IOCTL_NOTIF_* here.
func goRuntimeLayer() []rule {
	// No executable mappings, and no huge pages: those come from the
	// host's reserved pool (vm.nr_hugepages), which other VMs may count
	// on and which a memory cgroup does not charge.
	noExec := all(masked(2, unix.PROT_EXEC, 0), masked(3, unix.MAP_HUGETLB, 0))
	return []rule{
		allow("futex", "goroutine parking, runtime locks"),
		allow("read", "pipes, eventfds, sockets and handed-in files"),
		allow("write", "log lines to stderr, eventfd signals, sockets, handed-in files"),
		allow("epoll_pwait", "netpoller wait"),
		allow("epoll_wait", "netpoller wait (amd64)"),
		allow("nanosleep", "runtime usleep (spinning, sysmon)"),
		allow("sched_yield", "runtime osyield"),
		allow("close", "closing fds the plugin owns"),
		allowIf("mmap", "prot & PROT_EXEC == 0 && flags & MAP_HUGETLB == 0",
			"Go heap; mapping guest memory fds (never executable, never from the host's huge page pool)", noExec),
		allow("munmap", "Go heap; unmapping guest memory on memory-table change"),
		allow("madvise", "GC scavenger returns memory to the kernel"),
		allow("clock_gettime", "time.Now when the vDSO is not used"),
		allow("rt_sigaction", "runtime signal handlers (signal.Notify)"),
		allow("rt_sigprocmask", "runtime signal masks on new threads"),
		allow("rt_sigreturn", "return from signal handlers"),
		allow("sigaltstack", "signal stack of each new thread"),
		allow("restart_syscall", "kernel restart of an interrupted call"),
		allowIf("clone", "flags == CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_SYSVSEM|CLONE_THREAD [|CLONE_SETTLS]",
			"new OS threads for the Go scheduler (amd64 adds CLONE_SETTLS); no fork, no namespaces",
			all(eq(0, goThreadCloneFlags)), all(eq(0, goThreadCloneFlags|unix.CLONE_SETTLS))),
		allow("exit", "OS thread exit"),
		allow("exit_group", "process exit"),
		allow("gettid", "runtime thread ids"),
		allow("getpid", "runtime signal forwarding"),
		allowIf("tgkill", "tgid == self", "goroutine preemption signals to its own threads", all(isSelf(0))),
		allowIf("kill", "pid == self", "runtime raise of a fatal signal on itself", all(isSelf(0))),
		allow("epoll_create1", "netpoller setup"),
		allow("epoll_ctl", "netpoller registration of fds"),
		allow("eventfd2", "netpoller wakeups; vhost-user kick and call fds"),
		allow("pipe2", "os.Pipe (go-plugin stdio forwarding)"),
		allow("getrandom", "crypto/rand (go-plugin AutoMTLS), map seeds"),
		allow("sched_getaffinity", "runtime CPU count"),
		allowIf("fcntl", "cmd in F_GETFD, F_SETFD, F_GETFL, F_DUPFD_CLOEXEC; or cmd == F_SETFL && flags & (O_DIRECT|O_ASYNC) == 0",
			"os.NewFile and SetNonblock on handed-in fds; dup of kick/call fds. F_SETFL never sets O_DIRECT or O_ASYNC: "+
				"a file handed over as it is (krun-core's stdout or stderr) shares its open file description with "+
				"krun-core and the user's shell, whose unaligned writes O_DIRECT would make fail, and O_ASYNC would "+
				"send SIGIO to the description's owner",
			append(oneOf(1, unix.F_GETFD, unix.F_SETFD, unix.F_GETFL, unix.F_DUPFD_CLOEXEC),
				all(eq(1, unix.F_SETFL), masked(2, unix.O_DIRECT|unix.O_ASYNC, 0)))...),
		allow("fstat", "os.File.Stat of handed-in fds (image size, file type)"),
		allow("lseek", "size of a block-device image (SEEK_END)"),
		allowIf("ioctl", "request == TCGETS", "isatty check of the log output", oneOf(1, unix.TCGETS)...),
		allowIf("prlimit64", "new_limit == NULL", "reading limits (getrlimit); setting any is refused", all(eq(2, 0))),
		allow("getuid", "os.Getuid (harmless: the namespace's uid 0)"),
		allow("geteuid", "os.Geteuid"),
		allow("getgid", "os.Getgid"),
		allow("getegid", "os.Getegid"),
		allow("getppid", "os.Getppid (0 in the plugin's pid namespace)"),
		allow("capget", "reading its own (empty) capability sets, e.g. virtio-fs's CAP_CHOWN check"),
		allow("readv", "vectored reads on sockets and pipes"),
		allow("writev", "vectored writes on sockets and pipes"),
	}
}

// ipcLayer covers gRPC on go-plugin's listener, the vhost-user socket (fd 3)
// and any other socket the plugin was handed. No socket can be created,
// bound or connected.
func ipcLayer() []rule {
	// Never out-of-band data: no plugin needs it (vhost-user, gRPC and
	// passt are plain streams), and the AF_UNIX MSG_OOB code is kernel
	// attack surface with a record of its own (CVE-2025-38236).
	noOOB := func(arg int) []argCond { return all(masked(arg, unix.MSG_OOB, 0)) }
	const oob = "flags & MSG_OOB == 0"
	return []rule{
		allowIf("recvmsg", oob, "vhost-user messages with SCM_RIGHTS fds (memory, kick, call); never MSG_OOB", noOOB(2)),
		allowIf("sendmsg", oob, "vhost-user replies; gRPC; never MSG_OOB", noOOB(2)),
		allow("accept4", "gRPC connection from the host; vhost-user front-end on a listening socket"),
		allowIf("recvfrom", oob, "gRPC and socket reads; never MSG_OOB", noOOB(3)),
		allowIf("sendto", oob, "gRPC and socket writes; never MSG_OOB", noOOB(3)),
		allow("getsockopt", "SO_ACCEPTCONN on fd 3; SO_ERROR after accept"),
		allow("getsockname", "gRPC peer address bookkeeping"),
		allow("getpeername", "gRPC peer address bookkeeping"),
		allowIf("memfd_create", "flags & MFD_HUGETLB == 0",
			"the vhost-user inflight region (GET_INFLIGHT_FD) that lets a restarted plugin resubmit requests; "+
				"never huge pages (the host's reserved pool)",
			all(masked(1, unix.MFD_HUGETLB, 0))),
		allow("ftruncate", "sizing the inflight region's memfd"),
	}
}

// streamLayer acts on a socket itself, not on the plugin's descriptor of
// it: shutting it down, or setting its options, changes it for every
// process that holds it. The net plugin half-closes its connection to
// passt. The console plugin goes without: the sockets it is handed
// (krun-core's stdout and stderr, when they are sockets: a systemd
// service's journal stream) cannot be opened again, so they are
// krun-core's very own, shared with krun-core and whatever else writes
// to that stream.
func streamLayer() []rule {
	return []rule{
		allow("shutdown", "half-closing the connection to passt (net)"),
		allow("setsockopt", "options of the sockets the plugin was handed"),
	}
}

// diskIOLayer is what a disk image back-end needs on the image fds it was
// handed: positioned and vectored I/O, flushes, discard and write-zeroes.
func diskIOLayer() []rule {
	return []rule{
		allow("pread64", "image reads (ReadAt)"),
		allow("pwrite64", "image writes (WriteAt)"),
		allow("preadv", "vectored image reads into guest buffers"),
		allow("pwritev", "vectored image writes from guest buffers"),
		allow("preadv2", "vectored image reads with flags"),
		allow("pwritev2", "vectored image writes with flags"),
		allow("fdatasync", "virtio-blk FLUSH"),
		allow("fsync", "virtio-blk FLUSH (metadata too, qcow2)"),
		allowIf("fallocate", "mode in PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, 0",
			"DISCARD (PUNCH_HOLE) and WRITE_ZEROES (ZERO_RANGE; or a hole allocated again, mode 0). "+
				"Never KEEP_SIZE without PUNCH_HOLE: that allocates past the end of the file without "+
				"changing its size, which RLIMIT_FSIZE does not bound",
			oneOf(1, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_ZERO_RANGE, 0)...),
		allow("ftruncate", "qcow2 image growth and img create/convert output (a disk plugin's RLIMIT_FSIZE bounds the size)"),
		allowIf("ioctl", "request in BLKGETSIZE64, BLKSSZGET, BLKDISCARD, BLKZEROOUT",
			"size, sector size, discard and zeroing of block-device images",
			oneOf(1, unix.BLKGETSIZE64, unix.BLKSSZGET, unix.BLKDISCARD, blkZeroOut)...),
	}
}

// blkZeroOut is BLKZEROOUT, _IO(0x12, 127), absent from x/sys.
const blkZeroOut = 0x127f

// fsTreeLayer is what virtio-fs needs beneath its shared directory; landlock
// confines every path to that directory.
func fsTreeLayer() []rule {
	return []rule{
		allow("openat", "FUSE LOOKUP/OPEN/CREATE relative to the shared directory fd"),
		allow("openat2", "opens with RESOLVE_BENEATH"),
		allow("newfstatat", "FUSE GETATTR/LOOKUP"),
		allow("statx", "FUSE GETATTR/LOOKUP"),
		allow("fstatfs", "FUSE STATFS"),
		allow("getdents64", "FUSE READDIR"),
		allow("mkdirat", "FUSE MKDIR"),
		allowIf("mknodat", "mode & S_IFMT in S_IFREG, S_IFIFO, S_IFSOCK; or S_IFCHR with dev == 0",
			"FUSE MKNOD of regular files, fifos and sockets, and of the 0/0 character device "+
				"(an overlayfs whiteout; docs/VIRTIOFS.md); never a real device",
			all(masked(2, unix.S_IFMT, unix.S_IFREG)), all(masked(2, unix.S_IFMT, unix.S_IFIFO)),
			all(masked(2, unix.S_IFMT, unix.S_IFSOCK)), all(masked(2, unix.S_IFMT, unix.S_IFCHR), eq(3, 0))),
		allow("unlinkat", "FUSE UNLINK/RMDIR"),
		allow("renameat", "FUSE RENAME"),
		allow("renameat2", "FUSE RENAME2"),
		allow("linkat", "FUSE LINK"),
		allow("symlinkat", "FUSE SYMLINK"),
		allow("readlinkat", "FUSE READLINK"),
		allow("fchmod", "FUSE SETATTR mode"),
		allow("fchmodat", "FUSE SETATTR mode"),
		allow("fchmodat2", "FUSE SETATTR mode of a node's O_PATH fd (AT_EMPTY_PATH; Linux 6.6+)"),
		allow("umask", "fs-virtio clears its umask at start: the guest kernel already applied the guest's"),
		allow("fchown", "FUSE SETATTR owner"),
		allow("fchownat", "FUSE SETATTR owner"),
		allow("utimensat", "FUSE SETATTR times"),
		allow("faccessat", "FUSE ACCESS"),
		allow("faccessat2", "FUSE ACCESS"),
		allow("fgetxattr", "FUSE GETXATTR"),
		allow("fsetxattr", "FUSE SETXATTR"),
		allow("flistxattr", "FUSE LISTXATTR"),
		allow("fremovexattr", "FUSE REMOVEXATTR"),
		allow("syncfs", "FUSE SYNCFS of the shared directory's file system"),
		allow("fallocate", "FUSE FALLOCATE, every mode the guest asks for"),
		allow("dup", "opendir on a dup of a directory fd"),
	}
}

// archSetFS is ARCH_SET_FS, the arch_prctl code that sets the FS base.
const archSetFS = 0x1002

// launchLayer is what a plugin needs from its first instruction until its
// own Restrict narrows the sandbox: the trampoline's exec, the start-up of
// the Go runtime and of go-plugin's server, and the calls Restrict itself
// makes. The trampoline's filter has it on top of the launch profile; it is
// never part of a plugin's own profile, so a plugin that calls Restrict
// refuses all of it again for the rest of its life. Landlock and the empty
// root bound the file calls: the only writable place is the plugin's
// private socket directory (a small tmpfs of its own).
func launchLayer(execFD int) []rule {
	return []rule{
		allowIf("execveat", "dirfd == the plugin binary's fd && flags == AT_EMPTY_PATH",
			"the trampoline execs the plugin binary from the fd the launcher opened (Landlock allows executing that one file)",
			all(eq(0, uint64(execFD)), eq(4, unix.AT_EMPTY_PATH))),
		allowIf("arch_prctl", "code == ARCH_SET_FS", "Go runtime start-up: the first thread's TLS (amd64)",
			all(eq(0, archSetFS))),
		allow("openat", "go-plugin names its gRPC socket with a temporary file in the private socket directory; "+
			"the Go runtime's start-up probes of /sys and /proc and the time zone find nothing in the empty root"),
		allow("readlinkat", "protobuf reads /proc/self/exe at start-up (there is no /proc)"),
		allow("unlinkat", "go-plugin removes that temporary file"),
		allowIf("socket", "domain == AF_UNIX && type & 0xf == SOCK_STREAM",
			"go-plugin's gRPC listener; never a network or netlink socket",
			all(eq(0, unix.AF_UNIX), masked(1, 0xf, unix.SOCK_STREAM))),
		allow("bind", "names the gRPC listener in the private socket directory (Landlock: nowhere else)"),
		allow("listen", "the gRPC listener"),
		allowIf("setsockopt", "level == SOL_SOCKET && optname == SO_REUSEADDR",
			"Go's net.Listen sets SO_REUSEADDR on the gRPC listener", all(eq(1, unix.SOL_SOCKET), eq(2, unix.SO_REUSEADDR))),
		allow("fsync", "go-plugin syncs stdout after its handshake line"),
		allowIf("fchownat", "owner == -1 && flags == 0",
			"go-plugin gives its socket to the group it shares with a root launcher (PLUGIN_UNIX_SOCKET_GROUP, LaunchConfig.SocketGroup); never changes an owner",
			all(eq(2, ^uint64(0)), eq(4, 0))),
		allowIf("fchmodat", "mode == 0660", "go-plugin makes its socket writable by that group",
			all(eq(2, 0o660))),
		allowIf("prctl", "option == PR_GET_SECCOMP", "Restrict checks that the launcher's filter is in place",
			all(eq(0, unix.PR_GET_SECCOMP))),
		allow("landlock_create_ruleset", "Restrict stacks the plugin's own Landlock domain (a domain only takes rights away)"),
		allow("landlock_add_rule", "Restrict stacks the plugin's own Landlock domain"),
		allow("landlock_restrict_self", "Restrict stacks the plugin's own Landlock domain"),
		allowIf("seccomp", "op == SECCOMP_SET_MODE_FILTER && flags & SECCOMP_FILTER_FLAG_NEW_LISTENER == 0",
			"Restrict adds the plugin's own, narrower filter; never with a notification listener, "+
				"through which a plugin could let its own refused calls continue",
			all(eq(0, unix.SECCOMP_SET_MODE_FILTER), masked(1, unix.SECCOMP_FILTER_FLAG_NEW_LISTENER, 0))),
	}
}

// profileLayers lists the layers of a built-in profile.
func profileLayers(p Profile) ([]func() []rule, []string, error) {
	switch p {
	case ProfileMinimal:
		return []func() []rule{goRuntimeLayer, ipcLayer}, []string{layerGoRuntime, layerIPC}, nil
	case ProfileNet:
		return []func() []rule{goRuntimeLayer, ipcLayer, streamLayer}, []string{layerGoRuntime, layerIPC, layerStream}, nil
	case ProfileBlock:
		return []func() []rule{goRuntimeLayer, ipcLayer, diskIOLayer},
			[]string{layerGoRuntime, layerIPC, layerDiskIO}, nil
	case ProfileIO:
		return []func() []rule{goRuntimeLayer, ipcLayer, streamLayer, diskIOLayer},
			[]string{layerGoRuntime, layerIPC, layerStream, layerDiskIO}, nil
	case ProfileFS:
		return []func() []rule{goRuntimeLayer, ipcLayer, streamLayer, diskIOLayer, fsTreeLayer},
			[]string{layerGoRuntime, layerIPC, layerStream, layerDiskIO, layerFSTree}, nil
	}
	return nil, nil, fmt.Errorf("%w: unknown syscall profile %q", ErrPolicy, p)
}

// policyRules returns the rules of a policy: its profile's layers plus its
// extra system calls, merged per system call (conditions are OR'ed; an
// unconditional rule wins). Names absent on this architecture are dropped.
func policyRules(p Policy) ([]rule, error) {
	layers, names, err := profileLayers(p.Syscalls)
	if err != nil {
		return nil, err
	}
	var rules []rule
	for i, l := range layers {
		for _, r := range l() {
			r.layer = names[i]
			rules = append(rules, r)
		}
	}
	for _, s := range p.ExtraSyscalls {
		rules = append(rules, rule{name: s.Name, reason: s.Reason, layer: layerExtra})
	}
	return mergeRules(rules), nil
}

// launchRules are the rules of the filter the trampoline installs before
// the plugin's first instruction: the launch profile with the host's extra
// grants, plus the launch layer.
func launchRules(e launchEnv) ([]rule, error) {
	rules, err := policyRules(Policy{Syscalls: e.Syscalls, ExtraSyscalls: e.Extra})
	if err != nil {
		return nil, err
	}
	for _, r := range launchLayer(e.ExecFD) {
		r.layer = layerLaunch
		rules = append(rules, r)
	}
	return mergeRules(rules), nil
}

// mergeRules orders rules for the filter and merges them per system call:
// conditions are OR'ed, an unconditional rule wins. Names absent on this
// architecture are dropped.
func mergeRules(rules []rule) []rule {
	// The filter tests numbers in this order: the hot calls go first.
	hot := []string{"futex", "read", "write", "pread64", "pwrite64", "preadv", "pwritev",
		"epoll_pwait", "epoll_wait", "recvmsg", "sendmsg", "nanosleep", "sched_yield"}
	rank := func(r rule) int {
		if i := slices.Index(hot, r.name); i >= 0 {
			return i
		}
		return len(hot)
	}
	slices.SortStableFunc(rules, func(a, b rule) int { return rank(a) - rank(b) })
	nums := syscallNumbers()
	var out []rule
	index := map[string]int{}
	for _, r := range rules {
		if _, ok := nums[r.name]; !ok {
			continue
		}
		i, seen := index[r.name]
		if !seen {
			index[r.name] = len(out)
			out = append(out, r)
			continue
		}
		m := &out[i]
		if m.alts == nil || r.alts == nil {
			m.alts, m.args = nil, ""
		} else {
			m.alts = append(slices.Clone(m.alts), r.alts...)
			m.args = m.args + "; or " + r.args
		}
		m.reason += "; " + r.reason
		if !strings.Contains(m.layer, r.layer) {
			m.layer += "+" + r.layer
		}
	}
	return out
}

// Rules returns the allowed system calls of a policy with their argument
// constraints and reasons, in filter order.
func Rules(p Policy) ([]Rule, error) {
	rs, err := policyRules(p)
	if err != nil {
		return nil, err
	}
	out := make([]Rule, len(rs))
	for i, r := range rs {
		out[i] = Rule{Syscall: r.name, Args: r.args, Reason: r.reason, Layer: r.layer}
	}
	return out, nil
}
