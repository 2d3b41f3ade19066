package sandbox

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// How a refused system call is reported.
//
// SECCOMP_RET_TRAP is no use in Go: the runtime treats SIGSYS as fatal
// (sigtable: _SigThrow) and the trapped call would return its own number.
// SECCOMP_RET_ERRNO reports nothing, and RET_LOG allows the call. So the
// trampoline's filter returns SECCOMP_RET_USER_NOTIF for every refused call
// and the trampoline hands the filter's listener to the launcher over a
// socket (SCM_RIGHTS) and closes it before it execs the plugin: the plugin
// never holds it. A listener lets its holder answer
// SECCOMP_USER_NOTIF_FLAG_CONTINUE, which runs the refused call; in the
// plugin's hands it would undo the filter. The launcher answers every
// notification with EPERM (the call is never executed) and logs it; it
// never reads the caller's memory and never lets a call continue, so user
// notification's usual time-of-check race does not apply.
//
// The filter also lets no one make a new listener (seccomp with
// SECCOMP_FILTER_FLAG_NEW_LISTENER is refused): the kernel hands a refused
// call to the listener of the newest filter that returns USER_NOTIF, so a
// plugin's own listening filter would catch, and could let through, what
// the launcher's filter refuses.
//
// Where the kernel has no user notification, refused calls get EPERM from
// the filter itself, unlogged.
const refusedErrno = unix.EPERM

// Speculation mitigations and seccomp.
//
// Unless a filter is installed with SECCOMP_FILTER_FLAG_SPEC_ALLOW, the
// kernel force-disables speculation for the filtered task where its
// policy is "seccomp" (spec_store_bypass_disable= and spectre_v2_user=;
// the default on x86 before Linux 5.16): Speculative Store Bypass Disable
// (SSBD, on every load of the task) and indirect-branch speculation
// (STIBP while it runs, IBPB when the CPU switches to or from it). Both
// filters are installed with SPEC_ALLOW, and the trampoline asks for the
// one that isolates processes from each other itself
// (speculationIsolate), so:
//
//   - SSBD is dropped. It protects a process from code that runs inside
//     it (a JIT, an interpreter): a plugin runs no guest-supplied code, so
//     it guards nothing here, and it slows every load of the plugin on the
//     hosts that apply it.
//   - Indirect-branch isolation stays, on every kernel that can give it
//     (spectre_v2_user= prctl or seccomp): IBPB on a switch to or from the
//     plugin keeps a compromised plugin from steering the core's or another
//     process's indirect branches and the reverse. With the kernel's
//     policy "off" or "on" the request changes nothing.
//
// The filters' allow-lists are unchanged: SPEC_ALLOW is no part of what a
// filter allows.
const specAllow = unix.SECCOMP_FILTER_FLAG_SPEC_ALLOW

// speculationIsolate asks the kernel to isolate the calling thread's
// indirect-branch prediction from other processes (inherited by the
// threads it creates and kept across exec). Kernels that cannot
// (spectre_v2_user=off, no IBPB/STIBP, not affected) answer EPERM, ENXIO
// or EINVAL: there is nothing to apply, which is no failure.
func speculationIsolate() error {
	err := unix.Prctl(unix.PR_SET_SPECULATION_CTRL, unix.PR_SPEC_INDIRECT_BRANCH, unix.PR_SPEC_FORCE_DISABLE, 0, 0)
	switch {
	case err == nil, errors.Is(err, unix.EPERM), errors.Is(err, unix.ENXIO), errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENODEV):
		return nil
	default:
		return fmt.Errorf("indirect-branch speculation control: %w", err)
	}
}

// notifyAvailable reports whether refused calls can be handed to the
// launcher (SECCOMP_RET_USER_NOTIF with the structure sizes this package
// knows).
func notifyAvailable() bool {
	return seccompActionAvail(unix.SECCOMP_RET_USER_NOTIF) == nil && checkNotifSizes() == nil
}

// installLaunchFilter installs the trampoline's filter on the calling
// thread only (the thread that execs the plugin: its filter is what the
// plugin inherits). With user notification it returns the listener fd,
// else -1.
func installLaunchFilter(e launchEnv) (listener int, instructions int, err error) {
	rules, err := launchRules(e)
	if err != nil {
		return -1, 0, err
	}
	notify := notifyAvailable()
	deny := uint32(unix.SECCOMP_RET_ERRNO | uint32(refusedErrno))
	flags := uintptr(specAllow)
	if notify {
		deny = unix.SECCOMP_RET_USER_NOTIF
		flags |= unix.SECCOMP_FILTER_FLAG_NEW_LISTENER
	}
	prog, err := compileFilter(filterSpec{
		arch:      auditArch,
		x32Bit:    x32SyscallBit,
		self:      uint64(os.Getpid()),
		rules:     rules,
		nums:      syscallNumbers(),
		deny:      deny,
		wrongArch: unix.SECCOMP_RET_KILL_PROCESS,
	})
	if err != nil {
		return -1, 0, err
	}
	fd, err := seccompInstall(prog, flags)
	if err != nil {
		return -1, 0, fmt.Errorf("install filter of %d instructions: %w", len(prog), err)
	}
	if !notify {
		return -1, len(prog), nil
	}
	return fd, len(prog), nil
}

// applyNarrowing stacks the plugin's own filter on the trampoline's, on
// every thread (TSYNC): what the trampoline allows but the policy does not
// gets EPERM from it (unlogged); everything else is left to the
// trampoline's filter, whose refusals the launcher logs.
func applyNarrowing(p Policy, e launchEnv) (int, error) {
	outer, err := launchRules(e)
	if err != nil {
		return 0, err
	}
	inner, err := policyRules(p)
	if err != nil {
		return 0, err
	}
	prog, err := compileNarrowing(narrowSpec{
		arch:   auditArch,
		x32Bit: x32SyscallBit,
		self:   uint64(os.Getpid()),
		outer:  outer,
		inner:  inner,
		nums:   syscallNumbers(),
		deny:   unix.SECCOMP_RET_ERRNO | uint32(refusedErrno),
	})
	if err != nil {
		return 0, err
	}
	r, err := seccompInstall(prog, unix.SECCOMP_FILTER_FLAG_TSYNC|specAllow)
	if err != nil {
		return 0, fmt.Errorf("install filter of %d instructions: %w", len(prog), err)
	}
	if r != 0 {
		// Without TSYNC_ESRCH a positive result is the thread that could
		// not be synchronized.
		return 0, fmt.Errorf("thread %d could not be synchronized", r)
	}
	return len(prog), nil
}

// Log volume: the first few refusals of each system call are logged, then
// every logEvery-th with the running count.
const (
	logFirst = 3
	logEvery = 1000
)

// refusal is the only answer the launcher ever gives: the call fails with
// EPERM and does not run. Flags stay 0: never
// SECCOMP_USER_NOTIF_FLAG_CONTINUE.
// unnamedSyscall is the count key of every refused number without a name.
const unnamedSyscall = -1

func refusal(id uint64) seccompNotifResp {
	return seccompNotifResp{id: id, error: -int32(refusedErrno)}
}

// supervise answers every notification on a plugin's listener with EPERM
// and logs it. It returns when the plugin is gone (the listener hangs up)
// or the listener breaks, and closes it.
func supervise(l *os.File, kind string, log Logger) {
	defer l.Close()
	rc, err := l.SyscallConn()
	if err != nil {
		log.Error("seccomp supervisor: listener", "plugin", kind, "error", err)
		return
	}
	names := reverseNumbers(syscallNumbers())
	counts := map[int32]uint64{}
	handle := func(n *seccompNotif) {
		// Numbers without a name (x32, beyond the table, a foreign
		// arch) share one count: a plugin could otherwise pick a new
		// one for every call and get a line and a map entry each.
		name, ok := names[n.nr]
		key := n.nr
		if !ok || n.arch != auditArch {
			name, key = fmt.Sprintf("#%d", n.nr), unnamedSyscall
		}
		counts[key]++
		c := counts[key]
		if c > logFirst && c%logEvery != 0 {
			return
		}
		log.Warn("seccomp refused a system call", "plugin", kind, "syscall", name, "nr", n.nr, "pid", n.pid,
			"args", fmt.Sprintf("%#x", n.args[:]), "count", c)
	}
	var n seccompNotif
	for {
		var done bool
		var loopErr error
		err := rc.Read(func(fd uintptr) bool {
			for {
				pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				if _, err := unix.Poll(pfd, 0); err != nil {
					if errors.Is(err, unix.EINTR) {
						continue
					}
					loopErr, done = err, true
					return true
				}
				if pfd[0].Revents&unix.POLLIN == 0 {
					if pfd[0].Revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0 {
						done = true // no task uses the filter any more
						return true
					}
					return false // wait for the next notification
				}
				// The kernel blocks here only if another reader took the
				// notification first; there is no other reader.
				if err := notifRecv(int(fd), &n); err != nil {
					if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOENT) {
						continue // a signal, or the caller went away before we read it
					}
					loopErr, done = err, true
					return true
				}
				resp := refusal(n.id)
				if err := notifSend(int(fd), &resp); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINTR) {
					log.Error("seccomp supervisor: answer", "plugin", kind, "error", err)
				}
				handle(&n)
			}
		})
		if err != nil || done {
			if err == nil {
				err = loopErr
			}
			if err != nil && !errors.Is(err, os.ErrClosed) {
				log.Error("seccomp supervisor stopped; the plugin's refused calls now fail with ENOSYS, unlogged",
					"plugin", kind, "error", err)
			}
			return
		}
	}
}

func reverseNumbers(nums map[string]uint32) map[int32]string {
	out := make(map[int32]string, len(nums))
	for n, v := range nums {
		out[int32(v)] = n
	}
	return out
}

// Messages on the launcher's channel. The trampoline sends exactly one.
const (
	chanListener = "listener" // with the listener fd (SCM_RIGHTS)
	chanNone     = "none"     // refusals are not reported (no seccomp layer or no USER_NOTIF)
	chanFailed   = "failed: " // the sandbox could not be applied; the plugin exits
)

// chanWait bounds how long the launcher waits for the trampoline's message
// (a process that never started, or was killed before it sent anything).
const chanWait = 2 * time.Minute

// receiveListener waits (at most wait) for the trampoline's one message on
// the launcher's end of the channel and supervises the listener it carries.
// peer is the launcher's copy of the trampoline's end: it keeps the channel
// open until the child has it, so a trampoline that dies without a word
// costs the wait.
func receiveListener(ch *os.File, peer *os.File, kind string, wait time.Duration, log Logger) {
	fd, msg, err := recvOne(ch, wait)
	// The trampoline sent its message (or never will): our copy of its end
	// of the socket pair is no longer needed (nil: closed already).
	if peer != nil {
		peer.Close()
	}
	ch.Close()
	switch {
	case err != nil:
		log.Debug("sandbox: no word from the trampoline", "plugin", kind, "error", err)
		return
	case msg == chanListener && fd >= 0:
		if err := checkListener(fd); err != nil {
			unix.Close(fd)
			log.Error("sandbox: the trampoline sent something other than a seccomp listener", "plugin", kind, "error", err)
			return
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			log.Error("sandbox: seccomp listener", "plugin", kind, "error", err)
			return
		}
		supervise(os.NewFile(uintptr(fd), "seccomp-listener"), kind, log)
	default:
		if fd >= 0 {
			unix.Close(fd)
		}
		if len(msg) > len(chanFailed) && msg[:len(chanFailed)] == chanFailed {
			log.Debug("sandbox: the trampoline failed", "plugin", kind, "error", msg[len(chanFailed):])
		}
	}
}

// checkListener makes sure fd is a seccomp notification listener.
func checkListener(fd int) error {
	target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return err
	}
	if target != "anon_inode:seccomp notify" {
		return fmt.Errorf("fd is %q", target)
	}
	return nil
}

// recvOne receives one message with at most one fd, waiting at most wait.
func recvOne(ch *os.File, wait time.Duration) (int, string, error) {
	if err := ch.SetReadDeadline(time.Now().Add(wait)); err != nil {
		return -1, "", err
	}
	rc, err := ch.SyscallConn()
	if err != nil {
		return -1, "", err
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4*4))
	var n, oobn int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
		return !errors.Is(rerr, unix.EAGAIN)
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return -1, "", err
	}
	fd := -1
	msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, f := range fds {
			if fd < 0 {
				fd = f
			} else {
				unix.Close(f) // at most one is expected
			}
		}
	}
	if n == 0 && fd < 0 {
		return -1, "", errors.New("channel closed without a message")
	}
	return fd, string(buf[:n]), nil
}
