package sandbox

// Raw system calls that pass pointers to the kernel. Everything that needs
// package unsafe lives in this file.

import (
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rulesetAttr is struct landlock_ruleset_attr up to ABI 6 (scoped). The
// size passed to the kernel is cut to what the running ABI knows.
type rulesetAttr struct {
	handledFS  uint64
	handledNet uint64
	scoped     uint64
}

// pathBeneathAttr is struct landlock_path_beneath_attr, which the kernel
// declares packed: it reads 12 bytes, the Go padding after parentFD is unused.
type pathBeneathAttr struct {
	allowed  uint64
	parentFD int32
}

func landlockCreateRuleset(attr *rulesetAttr, size uintptr, flags uintptr) (int, error) {
	var r uintptr
	var e syscall.Errno
	if attr == nil {
		r, _, e = unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, size, flags)
	} else {
		r, _, e = unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, uintptr(unsafe.Pointer(attr)), size, flags)
	}
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func landlockAddPathBeneath(ruleset int, allowed uint64, dirFD int) error {
	attr := pathBeneathAttr{allowed: allowed, parentFD: int32(dirFD)}
	_, _, e := unix.Syscall6(unix.SYS_LANDLOCK_ADD_RULE, uintptr(ruleset),
		unix.LANDLOCK_RULE_PATH_BENEATH, uintptr(unsafe.Pointer(&attr)), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// landlockRestrictAllThreads enforces a ruleset on every OS thread of the
// process: landlock_restrict_self only restricts the calling thread, and
// the Go runtime has several. syscall.AllThreadsSyscall stops the world and
// runs the call on each thread; threads created later are cloned from a
// restricted one and inherit the domain.
func landlockRestrictAllThreads(ruleset int) error {
	_, _, e := syscall.AllThreadsSyscall(unix.SYS_LANDLOCK_RESTRICT_SELF, uintptr(ruleset), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// landlockRestrictSelf enforces a ruleset on the calling thread only: the
// trampoline's thread, whose credentials the plugin inherits at exec.
func landlockRestrictSelf(ruleset int) error {
	_, _, e := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, uintptr(ruleset), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// capsetZero empties the calling thread's permitted, effective and
// inheritable capability sets.
func capsetZero() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	return unix.Capset(&hdr, &data[0])
}

// execveatEmpty executes the file open at fd (execveat with AT_EMPTY_PATH):
// no path is looked up, so it works from the empty root. It returns only on
// failure.
func execveatEmpty(fd int, argv, envv []string) error {
	empty, err := unix.BytePtrFromString("")
	if err != nil {
		return err
	}
	av, err := syscall.SlicePtrFromStrings(argv)
	if err != nil {
		return err
	}
	ev, err := syscall.SlicePtrFromStrings(envv)
	if err != nil {
		return err
	}
	_, _, e := unix.Syscall6(unix.SYS_EXECVEAT, uintptr(fd), uintptr(unsafe.Pointer(empty)),
		uintptr(unsafe.Pointer(&av[0])), uintptr(unsafe.Pointer(&ev[0])), unix.AT_EMPTY_PATH, 0)
	return e
}

// capget returns the calling thread's effective, permitted and inheritable
// sets as 64-bit masks.
func capget() (eff, perm, inh uint64, err error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, 0, 0, err
	}
	join := func(lo, hi uint32) uint64 { return uint64(hi)<<32 | uint64(lo) }
	return join(data[0].Effective, data[1].Effective), join(data[0].Permitted, data[1].Permitted),
		join(data[0].Inheritable, data[1].Inheritable), nil
}

// seccompInstall loads a filter with seccomp(SECCOMP_SET_MODE_FILTER). With
// SECCOMP_FILTER_FLAG_NEW_LISTENER the result is the notification fd.
func seccompInstall(prog []unix.SockFilter, flags uintptr) (int, error) {
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(&fprog)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// seccompActionAvail reports whether the kernel knows a filter action.
func seccompActionAvail(action uint32) error {
	_, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_GET_ACTION_AVAIL, 0, uintptr(unsafe.Pointer(&action)))
	if e != 0 {
		return e
	}
	return nil
}

// seccompNotif is struct seccomp_notif (80 bytes).
type seccompNotif struct {
	id    uint64
	pid   uint32
	flags uint32
	nr    int32
	arch  uint32
	ip    uint64
	args  [6]uint64
}

// seccompNotifResp is struct seccomp_notif_resp (24 bytes).
type seccompNotifResp struct {
	id    uint64
	val   int64
	error int32
	flags uint32
}

// notifSizes is struct seccomp_notif_sizes.
type notifSizes struct {
	notif, resp, data uint16
}

// checkNotifSizes makes sure the kernel's notification structures are the
// ones this package was written for (the ioctl numbers encode the sizes).
func checkNotifSizes() error {
	var s notifSizes
	_, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_GET_NOTIF_SIZES, 0, uintptr(unsafe.Pointer(&s)))
	if e != 0 {
		return e
	}
	if uintptr(s.notif) != unsafe.Sizeof(seccompNotif{}) || uintptr(s.resp) != unsafe.Sizeof(seccompNotifResp{}) {
		return unix.EPROTO
	}
	return nil
}

// notifRecv receives a refused call from a plugin's listener (the launcher
// calls it once poll says one is waiting).
func notifRecv(fd int, n *seccompNotif) error {
	*n = seccompNotif{} // the kernel requires a zeroed buffer
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_RECV, uintptr(unsafe.Pointer(n)))
	if e != 0 {
		return e
	}
	return nil
}

func notifSend(fd int, r *seccompNotifResp) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_SEND, uintptr(unsafe.Pointer(r)))
	if e != 0 {
		return e
	}
	return nil
}

// capsetAllThreads sets the permitted and effective capability sets of
// every OS thread of the process to keep and empties the inheritable set
// (syscall.AllThreadsSyscall, as for Landlock: capabilities belong to
// threads).
func capsetAllThreads(keep uint64) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32)},
	}
	_, _, e := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	runtime.KeepAlive(&hdr)
	runtime.KeepAlive(&data)
	if e != 0 {
		return e
	}
	return nil
}
