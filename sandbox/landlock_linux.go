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
)

// landlockMinABI is the oldest ABI the layer accepts: file system rules
// exist since ABI 1. Newer ABIs add rights (see landlockAccessFor); Status
// reports which ones the running kernel lacks.
const landlockMinABI = 1

// applyLandlock builds and enforces the ruleset of a policy on every thread.
func applyLandlock(p Policy) (landlockAccess, error) {
	abi, err := landlockABI()
	if err != nil {
		return landlockAccess{}, err
	}
	if abi < landlockMinABI {
		return landlockAccess{}, fmt.Errorf("landlock ABI %d below %d", abi, landlockMinABI)
	}
	acc := landlockAccessFor(abi)
	attr := rulesetAttr{handledFS: acc.fs, handledNet: acc.net, scoped: acc.scoped}
	fd, err := landlockCreateRuleset(&attr, acc.attrSize, 0)
	if err != nil {
		return acc, fmt.Errorf("create ruleset (ABI %d): %w", abi, err)
	}
	defer unix.Close(fd)
	add := func(dir int, rights uint64) error {
		var st unix.Stat_t
		if err := unix.Fstat(dir, &st); err != nil {
			return fmt.Errorf("directory fd %d: %w", dir, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("fd %d is not a directory", dir)
		}
		if err := landlockAddPathBeneath(fd, rights&acc.fs, dir); err != nil {
			return fmt.Errorf("rule for directory fd %d: %w", dir, err)
		}
		return nil
	}
	for _, d := range p.ReadWriteDirFDs {
		if err := add(d, acc.fs&^landlockNever); err != nil {
			return acc, err
		}
	}
	for _, d := range p.ReadOnlyDirFDs {
		if err := add(d, landlockReadOnly); err != nil {
			return acc, err
		}
	}
	if err := landlockRestrictAllThreads(fd); err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return acc, fmt.Errorf("restrict all threads: %w (binary built with cgo? build plugins with CGO_ENABLED=0)", err)
		}
		return acc, fmt.Errorf("restrict all threads: %w", err)
	}
	return acc, nil
}
