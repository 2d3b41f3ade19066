package sandbox

// Extra attack probes: a sandboxed plugin (this test binary, helper mode
// "attack" with a mode starting "x-", which attackMain hands over) tries
// what a hostile plugin would.

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

func extraAttackMain(mode, arg string) int {
	res := attackResult{Mode: mode, Errnos: map[string]int{}, Values: map[string]uint64{}, Details: map[string]string{}}
	try := func(name string, f func() error) { res.Errnos[name] = errnoOf(f()) }
	restricted := func(kind string) bool {
		if arg != "restrict" {
			return true
		}
		p, _ := DefaultPolicy(kind, -1)
		if kind == "thirdparty" {
			p = Policy{Kind: kind, Syscalls: ProfileFS}
		}
		if err := Restrict(p, nil); err != nil {
			res.Err = "restrict: " + err.Error()
			return false
		}
		return true
	}
	switch mode {
	case "x-oob":
		// A compromised block plugin sends out-of-band data on a unix
		// socket it holds (fd 5, its other end the launcher's, as its
		// vhost-user socket's is) and asks for some on its own end: the
		// AF_UNIX MSG_OOB code.
		if !restricted("blk") {
			break
		}
		b := []byte("U")
		try("sendto_oob", func() error {
			_, err := sys(unix.SYS_SENDTO, revExtra, uintptr(unsafe.Pointer(&b[0])), 1, unix.MSG_OOB, 0, 0)
			return err
		})
		try("sendmsg_oob", func() error { return unix.Sendmsg(revExtra, b, nil, nil, unix.MSG_OOB) })
		try("recvfrom_oob", func() error {
			_, err := sys(unix.SYS_RECVFROM, revExtra, uintptr(unsafe.Pointer(&b[0])), 1, unix.MSG_OOB|unix.MSG_DONTWAIT, 0, 0)
			return err
		})
		try("recvmsg_oob", func() error {
			_, _, _, _, err := unix.Recvmsg(revExtra, b, nil, unix.MSG_OOB|unix.MSG_DONTWAIT)
			return err
		})
	case "x-rofile":
		// A hostile third-party plugin handed a file read-only
		// (--plugin KIND,file.NAME=PATH, fd 5) changes its mode (set-uid,
		// world-writable), group, times and extended attributes.
		if !restricted("thirdparty") {
			break
		}
		try("fchmod", func() error { return unix.Fchmod(revExtra, 0o4777) })
		try("fchmodat_empty", func() error {
			_, err := sys(unix.SYS_FCHMODAT2, revExtra, uintptr(unsafe.Pointer(cstr(""))), 0o4777, unix.AT_EMPTY_PATH)
			return err
		})
		try("fchown_group", func() error { return unix.Fchown(revExtra, -1, 0) })
		try("fsetxattr", func() error { return unix.Fsetxattr(revExtra, "user.planted", []byte("x"), 0) })
		try("futimens", func() error {
			ts := []unix.Timespec{{Sec: 1}, {Sec: 1}}
			_, err := sys(unix.SYS_UTIMENSAT, revExtra, 0, uintptr(unsafe.Pointer(&ts[0])), 0)
			return err
		})
	default:
		res.Err = "unknown extra attack mode " + mode
	}
	attackEmit(res)
	return 0
}
