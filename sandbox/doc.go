// Package sandbox confines krun-core plugin processes. A plugin parses bytes
// the guest and the disk image control; if such bytes compromise it, the
// process must hold nothing worth having: no files but the ones it was
// handed, no network, no other processes, no way to widen its own rights.
// docs/SECURITY.md has the threat model; this comment is the API.
//
// # Two halves
//
// The launcher (core/pluginhost, imgtool) prepares the plugin's exec.Cmd:
//
//	lc := sandbox.LaunchConfig{Kind: kind, Disable: userDisabled, HostUID: uid, HostGID: gid, Log: log}
//	if err := lc.Apply(cmd); err != nil { ... }   // last change before cmd.Start (or go-plugin's RunnerFunc)
//	... start ...
//	... Describe, Configure ...
//	if err := lc.Verify(pid); err != nil { ... }   // checks from outside that the plugin is confined
//
// Apply turns the command into the trampoline: the launcher's own binary
// (/proc/self/exe, argv[0] TrampolineName; this package's init recognizes
// it) in new user, mount, pid, net, ipc, uts and cgroup namespaces (id 0
// inside mapped to the plugin's host ids: PluginIDs, never root), with
// Pdeathsig SIGKILL, a new session, only cmd.Env as its environment (plus
// KRUN_SANDBOX, the settings, and GODEBUG settings the sandbox needs), and
// every launcher fd above 2 marked close-on-exec. It also hands the
// trampoline the plugin binary (an O_PATH fd) and one end of a socket pair.
// The trampoline applies, to itself: rlimits; the empty read-only root (with
// go-plugin's socket directory as a small tmpfs of its own); no_new_privs;
// empty capability sets; a Landlock domain (read-write beneath the
// directories among cmd.ExtraFiles, creating the gRPC socket in the socket
// directory, executing the plugin binary, nothing else); and the seccomp
// filter of the launch profile (KindProfile(Kind)) plus the start-up calls.
// It hands the filter's notification listener to the launcher over the
// socket pair, closes it, and execs the plugin from its fd. The plugin's
// first instruction runs inside every layer, and it never holds the
// listener: the launcher answers each refused call with EPERM and logs it.
//
// A plugin built with pluginsdk then narrows its sandbox to its own policy,
// once, before it reads any guest or image byte:
//
//	if err := sandbox.Restrict(policy, log); err != nil { log.Error(...); exit }
//
// Restrict checks the trampoline's layers are there and stacks, on every
// thread, a Landlock domain with only the policy's directory rules and a
// seccomp filter that refuses (EPERM) what the trampoline's filter allows
// but the policy does not: the start-up calls and the part of the launch
// profile the policy lacks. Each step fails closed with a one-line error
// naming the layer ("sandbox: landlock: ..."); the trampoline fails the
// same way before the plugin runs. Only the layers the user turned off
// (LaunchConfig.Disable, from an explicit flag) are skipped, with a warning
// from both Apply and Restrict.
//
// # Policy
//
// A plugin declares a Policy (plain fields, JSON-encodable; sent in the
// Describe reply; ParsePolicy decodes and validates it on the host):
//
//	type Policy struct {
//		Kind            string    // "blk", "net", "fs" or a third-party name
//		Syscalls        Profile   // "minimal", "net", "block" or "fs"
//		ExtraSyscalls   []Syscall // {Name, Reason}; never ForbiddenSyscalls()
//		ReadWriteDirFDs []int     // landlock: read/write beneath these dir fds (virtio-fs)
//		ReadOnlyDirFDs  []int     // landlock: read beneath these dir fds
//	}
//
// DefaultPolicy(kind, sharedFD) returns the built-in kinds' policies. The
// seccomp profiles are unions of layers with a reason per system call
// (Rules lists them): go-runtime (what any Go program and hclog need), ipc
// (gRPC and vhost-user on sockets the plugin holds; no socket, connect,
// bind or listen), stream (shutdown and setsockopt, which act on a socket
// for every process that holds it: net and fs only), disk-io (positioned
// I/O, fdatasync, fallocate without KEEP_SIZE but to punch a hole,
// block-device ioctls) and fs-tree (the *at calls of virtio-fs, confined by
// Landlock to the shared directory). Arguments are checked where it
// matters: clone only with the Go runtime's thread flags, mmap never
// PROT_EXEC nor huge pages, kill/tgkill only of itself, fcntl and ioctl only with listed
// commands, prlimit64 only to read. The trampoline's filter adds the launch
// layer (the start-up calls: exec of the plugin binary's fd, go-plugin's
// unix listener, Restrict's own calls), which a plugin's policy never has.
// A plugin's policy can only narrow what its launcher allows: extra system
// calls it declares work only when the launcher grants them too
// (LaunchConfig.ExtraSyscalls).
//
// # Refused system calls
//
// A refused call returns EPERM and is logged in the launcher's log
// ("seccomp refused a system call", with the plugin's kind, the call's name
// and arguments). The trampoline's filter returns SECCOMP_RET_USER_NOTIF and
// the launcher, which holds the listener, answers each notification with
// EPERM (SECCOMP_RET_TRAP is unusable in Go: the runtime treats SIGSYS as
// fatal). It never answers SECCOMP_USER_NOTIF_FLAG_CONTINUE and never reads
// the caller's memory, so there is no time-of-check race. No plugin can
// make a listener of its own (seccomp with SECCOMP_FILTER_FLAG_NEW_LISTENER
// is refused). The calls that only a plugin's own Restrict refuses get EPERM
// without a log line.
//
// # Threads
//
// no_new_privs, capabilities, Landlock domains and seccomp filters belong
// to threads. The trampoline applies them to the thread that execs the
// plugin (execve keeps that thread's and ends the others), so the plugin
// starts with all of them on its only thread. Restrict stacks its domain
// with syscall.AllThreadsSyscall (landlock_restrict_self restricts only the
// calling thread; the TSYNC flag exists only after Landlock ABI 7) and its
// filter with SECCOMP_FILTER_FLAG_TSYNC. AllThreadsSyscall refuses to run
// in binaries linked with cgo, so plugins must be built with CGO_ENABLED=0
// (Restrict fails closed otherwise, saying so). The trampoline works in any
// binary.
//
// # Shares and the launcher's own privileges
//
// A plugin reaches the files of a shared directory (virtio-fs) by name,
// with its own ids. LaunchConfig.IDMapShare turns the directory into an
// ID-mapped detached mount on which the launcher's ids and the plugin's are
// swapped (every other id maps to itself), to hand over instead: the
// plugin, running as nobody, acts in the share as the launcher's ids. It
// returns nil where no mapping is needed (the plugin has the launcher's
// ids) and an error where the host cannot make the mount; the caller then
// hands over the plain directory. PluginSeesShareIDs and ShareSwaps say how
// a plugin without a user namespace sees the swapped ids.
//
// Once set-up is done, a launcher calls DropPrivileges(lc.KeepCapabilities()):
// no_new_privs on every thread, and only the capabilities it still needs
// to signal what it started and to launch plugins again.
//
// # Visibility
//
// Status reports which layers this host supports (probing user namespaces
// with a short-lived child), the host ids plugins run as, the start-up
// calls and, per built-in kind, the namespaces, root, limits, Landlock
// rules and allowed system calls with reasons; `krun-core sandbox status`
// prints it.
package sandbox
