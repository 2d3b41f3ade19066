package fs

import (
	"golang.org/x/sys/unix"
)

// Set-user-ID and set-group-ID bits. A file the guest writes lives on the
// host, where any host user may execute it: a set-id bit there would run
// guest-chosen code with the host owner's ids (root's, when krun-core runs
// as root). So by default a share is nosuid from the host's point of view:
//
//   - Modes the guest asks for (CREATE, MKNOD, MKDIR, SETATTR) lose S_ISUID
//     and S_ISGID, silently, as the kernel itself drops S_ISGID from a chmod
//     by a non-member of the group; the reply carries the mode the file
//     really got. A directory keeps S_ISGID (it only makes new entries
//     inherit the directory's group, and directories are not executed).
//   - A modification of a regular file's data or size by the guest (WRITE,
//     truncate through SETATTR, OPEN or CREATE with O_TRUNC, FALLOCATE)
//     clears S_ISUID, and S_ISGID when group-execute is set, whoever the
//     guest caller is: the kernel's rule for a writer without CAP_FSETID.
//     A READ, or an OPEN without O_TRUNC, leaves them: the host's own
//     set-id files stay usable as long as the guest does not change them.
//   - A chown clears them the same way (the kernel's rule for every chown).
//   - security.capability cannot be set (file capabilities are the other
//     half of what a nosuid mount ignores).
//
// With suid=on (ServerConfig.AllowSetID) the guest kernel decides: modes are
// applied as asked, and the bits are cleared where the guest says so
// (FUSE_HANDLE_KILLPRIV_V2: FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID,
// FUSE_OPEN_KILL_SUIDGID, which Linux sends for callers without
// CAP_FSETID) and on chown.
//
// Who clears the bits on a write: a process without CAP_FSETID (the
// sandboxed plugin holds no capabilities) has the host kernel do it on
// every write and truncate, atomically and at no cost; the server then does
// nothing more. A process with CAP_FSETID (root without the sandbox) has
// the server do it before the modification: one fstat, and an fchmod when a
// bit is set. FALLOCATE on a nosuid share is always cleared by the server:
// whether fallocate(2) clears the bits is up to each host file system.
// With suid=on and no CAP_FSETID the host kernel still clears the bits on
// every write, even for a guest caller that holds CAP_FSETID: the safe
// side of the difference.

// setIDBits are the bits a nosuid share refuses to set.
const setIDBits = unix.S_ISUID | unix.S_ISGID

// guestMode filters the permission bits of a mode the guest asks for
// (mode & 07777) for a file of type typ.
func (s *Server) guestMode(typ, mode uint32) uint32 {
	mode &= 07777
	if s.allowSetID {
		return mode
	}
	if typ == unix.S_IFDIR {
		return mode &^ unix.S_ISUID
	}
	return mode &^ setIDBits
}

// killBits returns the set-id bits a modification of a file with mode must
// clear: S_ISUID, and S_ISGID if group-execute is set (without it S_ISGID
// grants nothing on exec), on regular files only.
func killBits(mode uint32) uint32 {
	if mode&unix.S_IFMT != unix.S_IFREG {
		return 0
	}
	k := mode & unix.S_ISUID
	if mode&(unix.S_ISGID|unix.S_IXGRP) == unix.S_ISGID|unix.S_IXGRP {
		k |= unix.S_ISGID
	}
	return k
}

// mustKill reports whether the server itself must clear the set-id bits
// before it modifies a file's data or size. asked: the guest set the
// request's KILL_SUIDGID flag.
func (s *Server) mustKill(asked bool) bool {
	return s.canFsetid && (asked || !s.allowSetID)
}

// killFd clears the set-id bits killBits names on the open file fd.
func killFd(fd int) unix.Errno {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return errno(err)
	}
	if k := killBits(st.Mode); k != 0 {
		return errno(unix.Fchmod(fd, st.Mode&07777&^k))
	}
	return 0
}

// maySetXattr reports whether the guest may set the extended attribute
// name: security.capability only with suid=on.
func (s *Server) maySetXattr(name string) bool {
	return s.allowSetID || name != "security.capability"
}
