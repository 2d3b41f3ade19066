// Package sandbox confines krun-core plugin processes. A plugin parses bytes
// the guest and the disk image control; if such bytes compromise it, the
// process must hold nothing worth having: no files but the ones it was
// handed, no network, no other processes, no way to widen its own rights.
// docs/SECURITY.md has the threat model; this comment is the API.
//
// # Two halves
//
// The launcher (core/pluginhost) prepares the plugin's exec.Cmd:
//
//	lc := sandbox.LaunchConfig{Limits: sandbox.DefaultLimits(kind), Disable: userDisabled, Log: log}
//	if err := lc.Apply(cmd); err != nil { ... }   // before cmd.Start (or go-plugin's ClientConfig.Cmd)
//	... start ...
//	lc.ApplyLimits(pid)                            // optional, right after start (prlimit from outside)
//	... Describe, Configure ...
//	if err := lc.Verify(pid); err != nil { ... }   // after the plugin reported it restricted itself
//
// Apply gives the child new user, mount, pid, net, ipc, uts and cgroup
// namespaces (id 0 inside mapped to LaunchConfig.HostUID/HostGID, default the
// launcher's ids), Pdeathsig SIGKILL, a new session, only cmd.Env as its
// environment (plus KRUN_SANDBOX, the settings Restrict reads, and a GODEBUG
// that keeps the runtime from holding cgroup files open), and marks every
// launcher fd above 2 close-on-exec so the plugin gets only stdio and
// cmd.ExtraFiles. Go runs no code between fork and exec, so everything else
// happens in the plugin.
//
// The plugin (pluginsdk) calls, once, after its gRPC listener exists and
// before it reads any guest or image byte:
//
//	if err := sandbox.Restrict(policy, log); err != nil { log.Error(...); exit }
//
// Restrict applies, in order: a check that the launcher's namespaces are
// really there; rlimits (RLIMIT_CORE 0, RLIMIT_MEMLOCK 0, RLIMIT_NOFILE and
// RLIMIT_DATA from LaunchConfig.Limits, soft = hard); pivot_root into an
// empty read-only tmpfs with the old root detached (on an initramfs root,
// which pivot_root cannot move: the tmpfs moved over / and a chroot into
// it); no_new_privs; empty
// capability sets (bounding, permitted, effective, inheritable, ambient);
// Landlock; the seccomp allowlist of Policy.Syscalls. All of them apply to
// every thread of the process. Each step fails closed: Restrict returns a
// one-line error naming the layer ("sandbox: landlock: ...") and the plugin
// must exit. Only the layers the user turned off on the launcher side
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
// (Rules lists them): go-runtime (what any Go program, hclog and the
// seccomp supervisor need), ipc (gRPC and vhost-user on sockets the plugin
// holds; no socket, connect, bind or listen), disk-io (positioned I/O,
// fdatasync, fallocate, block-device ioctls) and fs-tree (the *at calls
// of virtio-fs, confined by Landlock to the shared directory). Arguments are
// checked where it matters: clone only with the Go runtime's thread flags,
// mmap and never PROT_EXEC, kill/tgkill only of itself, fcntl and ioctl only
// with listed commands, prlimit64 only to read.
//
// # Refused system calls
//
// A refused call returns EPERM and is logged in the plugin's log ("seccomp
// refused a system call", with its name and arguments). The filter returns
// SECCOMP_RET_USER_NOTIF and a goroutine in the plugin answers each
// notification with EPERM and logs it (SECCOMP_RET_TRAP is unusable in Go:
// the runtime treats SIGSYS as fatal). The call itself never runs, so the
// supervisor has no time-of-check race. Caveat: a refused call made with
// syscall.RawSyscall holds its P while it waits for the answer; if a
// stop-the-world begins meanwhile the process deadlocks. Allowed calls never
// wait, so only code already doing something forbidden is exposed.
//
// # Threads
//
// no_new_privs, capabilities and Landlock are per-thread kernel state, and
// landlock_restrict_self restricts only the calling thread (the TSYNC flag
// exists only in kernels newer than Landlock ABI 7). Restrict uses
// syscall.AllThreadsSyscall, which stops the world and runs the call on
// every OS thread; threads created later are cloned from restricted ones.
// seccomp uses SECCOMP_FILTER_FLAG_TSYNC. AllThreadsSyscall refuses to run
// in binaries linked with cgo, so plugins must be built with CGO_ENABLED=0
// (Restrict fails closed otherwise, saying so).
//
// # Visibility
//
// Status reports which layers this host supports (probing user namespaces
// with a short-lived child) and, per built-in kind, the namespaces, root,
// limits, Landlock rules and allowed system calls with reasons; `krun-core
// sandbox status` prints it.
package sandbox
