package fs

import (
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Attribute operations: GETATTR, SETATTR, READLINK, STATFS, ACCESS, and the
// reopening of a node for I/O.

func (r *request) replyAttr(st *unix.Stat_t) unix.Errno {
	var b [fuse.AttrOutSize]byte
	out := fuse.AttrOut{AttrValid: r.s.attrTO.sec, AttrValidNs: r.s.attrTO.nsec, Attr: r.s.attr(st)}
	out.Encode(b[:])
	return r.reply(b[:])
}

func (s *Server) opGetattr(r *request) unix.Errno {
	flags, _ := fuse.U32(r.in, 0)
	if fh, ok := fuse.U64(r.in, 8); ok && flags&fuse.GetattrFh != 0 {
		// fstat of an open file: works even when the file has no name left.
		if h, e := s.t.getHandle(fh); e == 0 {
			defer s.t.putHandle(h)
			if h.node.id == r.h.NodeID {
				var st unix.Stat_t
				if err := statFd(h.fd, &st); err != nil {
					return errno(err)
				}
				return r.replyAttr(&st)
			}
		}
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	var st unix.Stat_t
	if err := statFd(n.fd, &st); err != nil {
		return errno(err)
	}
	return r.replyAttr(&st)
}

// openNode opens node n for I/O (flags: access mode and O_APPEND, O_SYNC,
// ...; never O_CREAT or O_TRUNC). A directory reopens itself through ".";
// a regular file is reopened by one of its known names below the parent's
// fd and must turn out to be the same inode. Other file types are never
// opened: opening a FIFO or a device on the host has side effects.
func (s *Server) openNode(r *request, n *node, flags int) (int, unix.Errno) {
	switch n.typ {
	case unix.S_IFDIR:
		fd, err := s.reopenDir(n.fd)
		if err != nil {
			return -1, errno(err)
		}
		return fd, 0
	case unix.S_IFREG:
	default:
		return -1, unix.EOPNOTSUPP
	}
	as := s.t.aliases(n, r.sc.al[:0])
	defer func() {
		s.t.putAliases(as)
		clear(as)
		r.sc.al = as[:0]
	}()
	var last unix.Errno = unix.ESTALE
	for _, a := range as {
		if s.t.acquire(a.parent) != 0 {
			continue
		}
		// Only a regular file is opened: if the name is now a FIFO or a
		// device, it is refused before it is opened (openRegular).
		var st unix.Stat_t
		fd, err := openRegular(a.parent.fd, a.name, flags|s.noatime(), &st)
		if err == unix.EPERM && s.noatime() != 0 {
			fd, err = openRegular(a.parent.fd, a.name, flags, &st) // not the file's owner
		}
		s.t.release(a.parent)
		if err == errNotRegular {
			s.t.dropName(a.parent.id, a.name)
			last = unix.ESTALE
			continue
		}
		if err != nil {
			e := errno(err)
			switch e {
			case unix.ENOENT, unix.ELOOP, unix.ENOTDIR, unix.ENXIO, unix.EISDIR:
				s.t.dropName(a.parent.id, a.name)
				continue
			}
			// Permission and the like: the file is there but refuses us.
			return -1, e
		}
		if st.Dev == n.key.dev && st.Ino == n.key.ino {
			// O_NONBLOCK stays set: it does not change I/O on regular
			// files, and clearing it would take an fcntl the seccomp
			// profile does not grant.
			return fd, 0
		}
		unix.Close(fd)
		s.t.dropName(a.parent.id, a.name)
		last = unix.ESTALE
	}
	return -1, last
}

// openAny opens n read-only, or write-only when read access is refused
// (metadata calls such as fsetxattr only need some open file) and the
// share is not read-only: there an open for writing is a change host
// watchers see (IN_CLOSE_WRITE; found in review).
//
// A regular file with no name left to reopen it by (unlinked while the
// guest holds it open) is reached through one of the guest's open handles
// instead: the f*xattr calls on its fd reach the server by node id, without
// the handle, and answered ESTALE (found by the differential test against
// the C virtiofsd). The caller gives the result back with closeAny.
func (s *Server) openAny(r *request, n *node) (int, *handle, unix.Errno) {
	fd, e := s.openNode(r, n, unix.O_RDONLY)
	if e == unix.EACCES && n.typ == unix.S_IFREG && !s.readOnly {
		fd, e = s.openNode(r, n, unix.O_WRONLY)
	}
	if e == unix.ESTALE && n.typ == unix.S_IFREG {
		if h := s.t.anyHandle(n); h != nil {
			return h.fd, h, 0
		}
	}
	return fd, nil, e
}

// closeAny gives back what openAny returned.
func (s *Server) closeAny(fd int, h *handle) {
	if h != nil {
		s.t.putHandle(h)
		return
	}
	unix.Close(fd)
}

// noatime is O_NOATIME on a read-only share, whose files serving reads
// must not change (a read or a directory listing moved their access time
// on the host; found in review), else 0. The kernel allows it to the
// file's owner only; the opens fall back without it (EPERM).
func (s *Server) noatime() int {
	if s.readOnly {
		return unix.O_NOATIME
	}
	return 0
}

// reopenDir is reopenDir with noatime.
func (s *Server) reopenDir(fd int) (int, error) {
	if s.noatime() != 0 {
		dfd, err := openBeneath(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|s.noatime(), 0)
		if err != unix.EPERM {
			return dfd, err
		}
	}
	return reopenDir(fd)
}

func (s *Server) opSetattr(r *request) unix.Errno {
	in, err := fuse.DecodeSetattrIn(r.in)
	if err != nil {
		return unix.EINVAL
	}
	if s.readOnly {
		return unix.EROFS
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	var h *handle
	if in.Valid&fuse.FattrFh != 0 {
		if h, e = s.t.getHandle(in.Fh); e != 0 {
			return e
		}
		defer s.t.putHandle(h)
		if h.node != n {
			return unix.EBADF
		}
	}

	// Every field is checked before anything changes: a request refused
	// (EINVAL) changes nothing (before, the mode or the size was already
	// set when a later field was found bad; found in review).
	uid, gid := -1, -1
	if in.Valid&fuse.FattrUID != 0 {
		u, ok := s.uids.toHost(in.UID)
		if !ok {
			return unix.EINVAL
		}
		uid = int(u)
	}
	if in.Valid&fuse.FattrGID != 0 {
		g, ok := s.gids.toHost(in.GID)
		if !ok {
			return unix.EINVAL
		}
		gid = int(g)
	}
	// The size is checked, and the file it truncates opened, before
	// anything changes too: a directory, a FIFO, a handle opened
	// read-only or a file the server may not open for writing refuses
	// the whole request (the mode was set first; found in review,
	// helper-85).
	tfd := -1
	if in.Valid&fuse.FattrSize != 0 {
		if in.Size > 1<<63-1 {
			return unix.EINVAL
		}
		var e unix.Errno
		if tfd, e = s.truncFd(r, n, h); e != 0 {
			return e
		}
		if h == nil {
			defer unix.Close(tfd)
		}
	}
	ts := [2]unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
	for i, f := range []struct {
		valid, now uint32
		sec        uint64
		nsec       uint32
	}{{fuse.FattrAtime, fuse.FattrAtimeNow, in.Atime, in.Atimensec}, {fuse.FattrMtime, fuse.FattrMtimeNow, in.Mtime, in.Mtimensec}} {
		switch {
		case in.Valid&f.now != 0:
			ts[i] = unix.Timespec{Nsec: unix.UTIME_NOW}
		case in.Valid&f.valid != 0:
			if f.nsec > 999999999 {
				return unix.EINVAL
			}
			ts[i] = unix.Timespec{Sec: int64(f.sec), Nsec: int64(f.nsec)}
		}
	}

	// The mode goes after the owner and the size: a chown clears the
	// set-id bits, and so does a truncate by a process without
	// CAP_FSETID, so a mode asked for in the same request (with suid=on)
	// lost them when it went first. One setattr of mode and owner gives
	// the file the mode asked for on Linux (found in review, helper-141).
	chowned := false
	if in.Valid&(fuse.FattrUID|fuse.FattrGID) != 0 {
		if err := unix.Fchownat(n.fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errno(err)
		}
		chowned = true
	}
	if in.Valid&fuse.FattrSize != 0 {
		if s.mustKill(in.Valid&fuse.FattrKillSuidgid != 0) {
			if e := killFd(tfd); e != 0 {
				return e
			}
		}
		if err := unix.Ftruncate(tfd, int64(in.Size)); err != nil {
			return errno(err)
		}
	}
	if in.Valid&fuse.FattrMode != 0 {
		if e := s.chmod(r, n, h, s.guestMode(n.typ, in.Mode)); e != 0 {
			return e
		}
	}
	if ts[0].Nsec != unix.UTIME_OMIT || ts[1].Nsec != unix.UTIME_OMIT {
		if err := unix.UtimesNanoAt(n.fd, "", ts[:], unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errno(err)
		}
	}
	var st unix.Stat_t
	if err := statFd(n.fd, &st); err != nil {
		return errno(err)
	}
	if k := killBits(st.Mode); chowned && in.Valid&fuse.FattrMode == 0 && k != 0 {
		// A chown clears the set-id bits (the host kernel does so itself
		// on local file systems; this covers the others), unless the
		// request set the mode itself.
		if e := s.chmod(r, n, h, st.Mode&07777&^k); e != 0 {
			return e
		}
		if err := statFd(n.fd, &st); err != nil {
			return errno(err)
		}
	}
	return r.replyAttr(&st)
}

// chmod changes n's mode: through an open handle, with fchmodat2 on the
// O_PATH fd (Linux 6.6+), or by reopening the node.
func (s *Server) chmod(r *request, n *node, h *handle, mode uint32) unix.Errno {
	if n.typ == unix.S_IFLNK {
		return unix.EOPNOTSUPP
	}
	if h != nil {
		return errno(unix.Fchmod(h.fd, mode))
	}
	var err error = unix.ENOSYS
	if !s.noFchmodat2.Load() {
		err = unix.Fchmodat(n.fd, "", mode, unix.AT_EMPTY_PATH)
		switch err {
		case unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL, unix.EPERM:
			// No fchmodat2 (before Linux 6.6), or a seccomp profile that
			// refuses it with EPERM: try the reopen path, which tells a
			// genuine EPERM apart.
		default:
			return errno(err)
		}
	}
	fd, oh, e := s.openAny(r, n)
	if e != 0 {
		if err == unix.EPERM && e == unix.EACCES {
			e = unix.EPERM
		}
		return e
	}
	defer s.closeAny(fd, oh)
	e = errno(unix.Fchmod(fd, mode))
	if e == 0 {
		// fchmodat2 failed where fchmod works: it is unusable here.
		s.noFchmodat2.Store(true)
	}
	return e
}

// truncFd returns the fd a truncation of n goes through: the handle's, or
// (h nil) a writable reopen the caller closes.
func (s *Server) truncFd(r *request, n *node, h *handle) (int, unix.Errno) {
	if n.typ == unix.S_IFDIR {
		return -1, unix.EISDIR
	}
	if n.typ != unix.S_IFREG {
		return -1, unix.EINVAL
	}
	if h != nil {
		if !h.writable {
			return -1, unix.EINVAL // as ftruncate(2) on such an fd
		}
		return h.fd, 0
	}
	return s.openForTruncate(r, n)
}

func (s *Server) opReadlink(r *request) unix.Errno {
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if n.typ != unix.S_IFLNK {
		return unix.EINVAL
	}
	buf := r.sc.big[:fuse.MaxSymlinkLen]
	k, err := unix.Readlinkat(n.fd, "", buf)
	if err != nil {
		return errno(err)
	}
	return r.reply(buf[:k])
}

func (s *Server) opStatfs(r *request) unix.Errno {
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	var st unix.Statfs_t
	if err := unix.Fstatfs(n.fd, &st); err != nil {
		return errno(err)
	}
	k := fuse.Kstatfs{
		Blocks: st.Blocks, Bfree: st.Bfree, Bavail: st.Bavail, Files: st.Files, Ffree: st.Ffree,
		Bsize: uint32(st.Bsize), Namelen: uint32(st.Namelen), Frsize: uint32(st.Frsize),
	}
	var b [fuse.StatfsOutSize]byte
	k.Encode(b[:])
	return r.reply(b[:])
}

func (s *Server) opAccess(r *request) unix.Errno {
	mask, ok := fuse.U32(r.in, 0)
	if !ok {
		return unix.EINVAL
	}
	if mask&^uint32(unix.R_OK|unix.W_OK|unix.X_OK) != 0 {
		return unix.EINVAL
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if mask&unix.W_OK != 0 && s.readOnly && (n.typ == unix.S_IFREG || n.typ == unix.S_IFDIR || n.typ == unix.S_IFLNK) {
		// As a read-only mount answers (the kernel's sb_permission): a
		// FIFO, a socket or a device node stays writable, since
		// writing to one changes nothing in the file system.
		return unix.EROFS
	}
	// The host checks with the process's credentials; the guest kernel
	// (default_permissions) has already checked the guest caller's.
	if err := unix.Faccessat2(n.fd, "", mask, unix.AT_EMPTY_PATH|unix.AT_EACCESS); err != nil {
		return errno(err)
	}
	return r.reply()
}
