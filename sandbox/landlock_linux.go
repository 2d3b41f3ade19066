package sandbox

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// landlockABI returns the Landlock ABI version of the running kernel, or an
// error when Landlock is not built in or not enabled (lsm= boot option).
func landlockABI() (int, error) {
	v, err := landlockCreateRuleset(nil, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			return 0, fmt.Errorf("landlock not enabled in this kernel: %w", err)
		}
		return 0, fmt.Errorf("landlock ABI version: %w", err)
	}
	return v, nil
}

// landlockAccess is what the sandbox handles (and so denies unless a rule
// allows it) at a given ABI.
type landlockAccess struct {
	fs, net, scoped uint64
	attrSize        uintptr
}

func landlockAccessFor(abi int) landlockAccess {
	a := landlockAccess{
		fs: unix.LANDLOCK_ACCESS_FS_EXECUTE | unix.LANDLOCK_ACCESS_FS_WRITE_FILE |
			unix.LANDLOCK_ACCESS_FS_READ_FILE | unix.LANDLOCK_ACCESS_FS_READ_DIR |
			unix.LANDLOCK_ACCESS_FS_REMOVE_DIR | unix.LANDLOCK_ACCESS_FS_REMOVE_FILE |
			unix.LANDLOCK_ACCESS_FS_MAKE_CHAR | unix.LANDLOCK_ACCESS_FS_MAKE_DIR |
			unix.LANDLOCK_ACCESS_FS_MAKE_REG | unix.LANDLOCK_ACCESS_FS_MAKE_SOCK |
			unix.LANDLOCK_ACCESS_FS_MAKE_FIFO | unix.LANDLOCK_ACCESS_FS_MAKE_BLOCK |
			unix.LANDLOCK_ACCESS_FS_MAKE_SYM,
		attrSize: 8,
	}
	if abi >= 2 {
		a.fs |= unix.LANDLOCK_ACCESS_FS_REFER
	}
	if abi >= 3 {
		a.fs |= unix.LANDLOCK_ACCESS_FS_TRUNCATE
	}
	if abi >= 4 {
		a.net = unix.LANDLOCK_ACCESS_NET_BIND_TCP | unix.LANDLOCK_ACCESS_NET_CONNECT_TCP
		a.attrSize = 16
	}
	if abi >= 5 {
		a.fs |= unix.LANDLOCK_ACCESS_FS_IOCTL_DEV
	}
	if abi >= 6 {
		a.scoped = unix.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | unix.LANDLOCK_SCOPE_SIGNAL
		a.attrSize = 24
	}
	return a
}

// Rights granted beneath a policy's directories. Never execute, never block
// devices, never device ioctls. Character devices may be made (beneath a
// read-write directory): seccomp allows only the 0/0 one, overlayfs'
// whiteout, and the kernel wants CAP_MKNOD in the initial namespace for any
// other.
const (
	landlockReadOnly = unix.LANDLOCK_ACCESS_FS_READ_FILE | unix.LANDLOCK_ACCESS_FS_READ_DIR
	landlockNever    = unix.LANDLOCK_ACCESS_FS_EXECUTE | unix.LANDLOCK_ACCESS_FS_MAKE_BLOCK |
		unix.LANDLOCK_ACCESS_FS_IOCTL_DEV
	// landlockSocketDir is what go-plugin does in the private socket
	// directory: a temporary file (created, removed) names the socket.
	landlockSocketDir = unix.LANDLOCK_ACCESS_FS_MAKE_REG | unix.LANDLOCK_ACCESS_FS_READ_FILE |
		unix.LANDLOCK_ACCESS_FS_WRITE_FILE | unix.LANDLOCK_ACCESS_FS_REMOVE_FILE |
		unix.LANDLOCK_ACCESS_FS_MAKE_SOCK
	// landlockExec is what the trampoline's execveat of the plugin binary
	// needs (the kernel opens it for reading and executing).
	landlockExec = unix.LANDLOCK_ACCESS_FS_EXECUTE | unix.LANDLOCK_ACCESS_FS_READ_FILE
)

// landlockMinABI is the oldest ABI the layer accepts: file system rules
// exist since ABI 1. Newer ABIs add rights (see landlockAccessFor); Status
// reports which ones the running kernel lacks.
const landlockMinABI = 1

// landlockRule allows rights beneath a directory fd, or on a file fd.
type landlockRule struct {
	fd     int
	rights uint64
	file   bool // fd is a regular file (the plugin binary)
}

// policyLandlockRules are the directory rules of a policy.
func policyLandlockRules(p Policy) []landlockRule {
	var out []landlockRule
	for _, d := range p.ReadWriteDirFDs {
		out = append(out, landlockRule{fd: d, rights: ^uint64(0) &^ landlockNever})
	}
	for _, d := range p.ReadOnlyDirFDs {
		out = append(out, landlockRule{fd: d, rights: landlockReadOnly})
	}
	return out
}

// landlockRuleset creates a ruleset that handles every right of the
// running ABI and allows rules; the caller enforces and closes it.
func landlockRuleset(rules []landlockRule) (int, landlockAccess, error) {
	abi, err := landlockABI()
	if err != nil {
		return -1, landlockAccess{}, err
	}
	if abi < landlockMinABI {
		return -1, landlockAccess{}, fmt.Errorf("landlock ABI %d below %d", abi, landlockMinABI)
	}
	acc := landlockAccessFor(abi)
	attr := rulesetAttr{handledFS: acc.fs, handledNet: acc.net, scoped: acc.scoped}
	fd, err := landlockCreateRuleset(&attr, acc.attrSize, 0)
	if err != nil {
		return -1, acc, fmt.Errorf("create ruleset (ABI %d): %w", abi, err)
	}
	for _, r := range rules {
		var st unix.Stat_t
		if err := unix.Fstat(r.fd, &st); err != nil {
			unix.Close(fd)
			return -1, acc, fmt.Errorf("fd %d: %w", r.fd, err)
		}
		switch typ := st.Mode & unix.S_IFMT; {
		case r.file && typ != unix.S_IFREG:
			unix.Close(fd)
			return -1, acc, fmt.Errorf("fd %d is not a regular file", r.fd)
		case !r.file && typ != unix.S_IFDIR:
			unix.Close(fd)
			return -1, acc, fmt.Errorf("fd %d is not a directory", r.fd)
		}
		if err := landlockAddPathBeneath(fd, r.rights&acc.fs, r.fd); err != nil {
			unix.Close(fd)
			return -1, acc, fmt.Errorf("rule for fd %d: %w", r.fd, err)
		}
	}
	return fd, acc, nil
}

// applyLandlock stacks the ruleset of a policy on every thread: the
// plugin's own domain, inside the trampoline's.
func applyLandlock(p Policy) (landlockAccess, error) {
	fd, acc, err := landlockRuleset(policyLandlockRules(p))
	if err != nil {
		return acc, err
	}
	defer unix.Close(fd)
	if err := landlockRestrictAllThreads(fd); err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return acc, fmt.Errorf("restrict all threads: %w (binary built with cgo? build plugins with CGO_ENABLED=0)", err)
		}
		return acc, fmt.Errorf("restrict all threads: %w", err)
	}
	return acc, nil
}

// applyLaunchLandlock enforces the trampoline's ruleset on the calling
// thread, whose domain the plugin inherits at exec.
func applyLaunchLandlock(rules []landlockRule) (landlockAccess, error) {
	fd, acc, err := landlockRuleset(rules)
	if err != nil {
		return acc, err
	}
	defer unix.Close(fd)
	if err := landlockRestrictSelf(fd); err != nil {
		return acc, fmt.Errorf("restrict: %w", err)
	}
	return acc, nil
}
