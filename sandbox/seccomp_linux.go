package sandbox

import (
	"errors"
	"fmt"
	"os"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// How a refused system call is reported.
//
// SECCOMP_RET_TRAP is no use in Go: the runtime treats SIGSYS as fatal
// (sigtable: _SigThrow) and the trapped call would return its own number.
// SECCOMP_RET_ERRNO reports nothing, and RET_LOG allows the call. So the
// filter returns SECCOMP_RET_USER_NOTIF for every refused call and the
// plugin runs a supervisor goroutine on the listener fd: it answers each
// notification with EPERM (the call is never executed) and writes a log
// line. Only refusals are sent there: a supervisor that only refuses has no
// time-of-check race on the target's memory, which it never reads.
//
// Where the kernel has no user notification, refused calls get EPERM from
// the filter itself, unlogged.
const refusedErrno = unix.EPERM

// seccompResult describes the installed filter.
type seccompResult struct {
	instructions int
	notify       bool // refusals are logged by the supervisor
}

func applySeccomp(p Policy, log hclog.Logger) (seccompResult, error) {
	rules, err := policyRules(p)
	if err != nil {
		return seccompResult{}, err
	}
	notify := seccompActionAvail(unix.SECCOMP_RET_USER_NOTIF) == nil && checkNotifSizes() == nil
	deny := uint32(unix.SECCOMP_RET_ERRNO | uint32(refusedErrno))
	flags := uintptr(unix.SECCOMP_FILTER_FLAG_TSYNC)
	if notify {
		deny = unix.SECCOMP_RET_USER_NOTIF
		// NEW_LISTENER with TSYNC needs TSYNC_ESRCH (the return value is the fd).
		flags |= unix.SECCOMP_FILTER_FLAG_NEW_LISTENER | unix.SECCOMP_FILTER_FLAG_TSYNC_ESRCH
	} else {
		log.Warn("seccomp user notification unavailable: refused system calls get EPERM without a log line")
	}
	nums := syscallNumbers()
	prog, err := compileFilter(filterSpec{
		arch:      auditArch,
		x32Bit:    x32SyscallBit,
		self:      uint64(os.Getpid()),
		rules:     rules,
		nums:      nums,
		deny:      deny,
		wrongArch: unix.SECCOMP_RET_KILL_PROCESS,
	})
	if err != nil {
		return seccompResult{}, err
	}
	fd, err := seccompInstall(prog, flags)
	if err != nil {
		return seccompResult{}, fmt.Errorf("install filter of %d instructions: %w", len(prog), err)
	}
	if !notify && fd != 0 {
		// Without TSYNC_ESRCH a positive result is the thread that could
		// not be synchronized.
		return seccompResult{}, fmt.Errorf("thread %d could not be synchronized", fd)
	}
	if notify {
		go supervise(fd, reverseNumbers(nums), log)
	}
	return seccompResult{instructions: len(prog), notify: notify}, nil
}

func reverseNumbers(nums map[string]uint32) map[int32]string {
	out := make(map[int32]string, len(nums))
	for n, v := range nums {
		out[int32(v)] = n
	}
	return out
}

// Log volume: the first few refusals of each system call are logged, then
// every logEvery-th with the running count.
const (
	logFirst = 3
	logEvery = 1000
)

// supervise answers every refused system call with EPERM and logs it. It
// runs for the life of the process; it returns only if the listener breaks.
func supervise(fd int, names map[int32]string, log hclog.Logger) {
	counts := map[int32]uint64{}
	var n seccompNotif
	for {
		if err := notifRecv(fd, &n); err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOENT) {
				continue // a signal, or the caller went away before we read it
			}
			log.Error("seccomp supervisor stopped; refused calls now fail with ENOSYS, unlogged", "error", err)
			return
		}
		resp := seccompNotifResp{id: n.id, error: -int32(refusedErrno)}
		if err := notifSend(fd, &resp); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINTR) {
			log.Error("seccomp supervisor: answer", "error", err)
		}
		counts[n.nr]++
		c := counts[n.nr]
		if c <= logFirst || c%logEvery == 0 {
			name, ok := names[n.nr]
			if !ok {
				name = fmt.Sprintf("#%d", n.nr)
			}
			log.Warn("seccomp refused a system call", "syscall", name, "nr", n.nr, "tid", n.pid,
				"args", fmt.Sprintf("%#x", n.args[:]), "count", c)
		}
	}
}
