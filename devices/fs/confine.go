package fs

import (
	"bytes"
	"errors"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Confinement. Every host path operation the server performs names at most
// one path component, relative to a directory fd that is itself inside the
// shared directory, and never follows a symbolic link:
//
//   - names from the guest are single components: non-empty, no '/', no NUL,
//     not "." or "..", at most 255 bytes (checkName);
//   - files are opened with openat2(parent, name, ...) and
//     RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS plus
//     O_NOFOLLOW, so neither a ".." nor a symlink (including one swapped in
//     by a host-side rename race) can take the lookup out of the parent;
//   - the other *at calls (mkdirat, unlinkat, renameat2, linkat, symlinkat,
//     mknodat, fstatat) do not follow a final symlink by definition, and
//     their single-component name cannot climb out of the parent;
//   - operations on a node use its O_PATH fd with AT_EMPTY_PATH, never a
//     /proc/self/fd magic link.

// resolveFlags are the openat2 resolve flags for every lookup.
const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// checkName validates one guest-supplied path component.
func checkName(name []byte) unix.Errno {
	switch {
	case len(name) == 0:
		return unix.EINVAL
	case len(name) > fuse.MaxNameLen:
		return unix.ENAMETOOLONG
	case bytes.IndexByte(name, '/') >= 0:
		return unix.EINVAL
	case len(name) == 1 && name[0] == '.':
		return unix.EINVAL
	case len(name) == 2 && name[0] == '.' && name[1] == '.':
		return unix.EINVAL
	}
	return 0
}

// openBeneath opens name (one checked component) below dirfd without
// following symlinks. flags must not contain O_CREAT unless mode applies.
func openBeneath(dirfd int, name string, flags int, mode uint32) (int, error) {
	how := unix.OpenHow{
		Flags:   uint64(flags | unix.O_NOFOLLOW | unix.O_CLOEXEC),
		Mode:    uint64(mode),
		Resolve: resolveFlags,
	}
	for try := 0; ; try++ {
		fd, err := unix.Openat2(dirfd, name, &how)
		// EINTR, and EAGAIN which openat2 answers under RESOLVE_BENEATH
		// when a concurrent rename could have raced a ".." step (we never
		// send one, but bound the retries anyway).
		if (err == unix.EINTR || err == unix.EAGAIN) && try < 8 {
			continue
		}
		return fd, err
	}
}

// openPath opens an O_PATH fd for name below dirfd (a symlink yields an fd
// for the link itself).
func openPath(dirfd int, name string) (int, error) {
	return openBeneath(dirfd, name, unix.O_PATH, 0)
}

// errNotRegular: openRegular found something other than a regular file
// under the name (a directory, symlink, FIFO, socket or device), or the
// name changed to another inode between its two opens.
var errNotRegular = errors.New("not a regular file")

// openRegular opens name below dirfd for I/O (flags: access mode and
// status flags) only if it is a regular file, and fills st with what it
// opened. It looks through an O_PATH fd first, so that an existing FIFO,
// socket or device is never opened: opening one has effects on the host
// (a FIFO's waiting writer released, a device's open handler run). The
// name is then opened, O_NONBLOCK and O_NOCTTY added, and must still be
// the inode it looked at; a name swapped to a special file in between
// could be opened in that window, and is refused all the same.
func openRegular(dirfd int, name string, flags int, st *unix.Stat_t) (int, error) {
	pfd, err := openPath(dirfd, name)
	if err != nil {
		return -1, err
	}
	var pst unix.Stat_t
	err = statFd(pfd, &pst)
	unix.Close(pfd)
	if err != nil {
		return -1, err
	}
	if pst.Mode&unix.S_IFMT != unix.S_IFREG {
		return -1, errNotRegular
	}
	fd, err := openBeneath(dirfd, name, flags|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, err
	}
	if err := statFd(fd, st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if st.Dev != pst.Dev || st.Ino != pst.Ino || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return -1, errNotRegular
	}
	return fd, nil
}

// statFd stats an fd (O_PATH included) without following symlinks.
func statFd(fd int, st *unix.Stat_t) error {
	return unix.Fstatat(fd, "", st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW)
}

// reopenDir opens a directory node's O_PATH fd for reading ("." below it).
func reopenDir(fd int) (int, error) {
	return openBeneath(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY, 0)
}
