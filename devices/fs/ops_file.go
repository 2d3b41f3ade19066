package fs

import (
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// File operations: OPEN, CREATE, READ, WRITE, RELEASE(DIR), FLUSH,
// FSYNC(DIR), FALLOCATE, LSEEK, SYNCFS.

// openFlags filters the guest's open flags down to what the host open may
// carry. O_CREAT, O_EXCL and O_TRUNC are handled by the callers; O_NOFOLLOW,
// O_CLOEXEC and O_NONBLOCK are added by openNode/openBeneath. O_DIRECT and
// O_NOATIME are dropped: the first is not supported by every host file
// system, the second needs ownership the guest cannot claim.
func openFlags(f uint32) int {
	const keep = unix.O_ACCMODE | unix.O_APPEND | unix.O_SYNC | unix.O_DSYNC
	return int(f) & keep
}

func writes(f uint32) bool {
	return int(f)&unix.O_ACCMODE != unix.O_RDONLY || int(f)&unix.O_TRUNC != 0
}

func (r *request) replyOpen(fh uint64) unix.Errno {
	var b [fuse.OpenOutSize]byte
	fuse.PutU64(b[:], 0, fh)
	return r.reply(b[:])
}

func (s *Server) opOpen(r *request) unix.Errno {
	flags, ok := fuse.U32(r.in, 0)
	if !ok {
		return unix.EINVAL
	}
	if int(flags)&unix.O_ACCMODE == unix.O_ACCMODE {
		return unix.EINVAL
	}
	if s.readOnly && writes(flags) {
		return unix.EROFS
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	switch n.typ {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		return unix.EISDIR
	default:
		// FIFOs, sockets and devices are opened by the guest's own kernel;
		// the host must never open them.
		return unix.ENXIO
	}
	// The handle's slot is taken before the file is opened: a refusal
	// (ENFILE) must come before O_TRUNC empties it.
	if e := s.reserveHandle(false); e != 0 {
		return e
	}
	fd, fdStatus, e := s.openFile(r, n, openFlags(flags))
	if e != 0 {
		s.t.cancelHandle(false)
		return e
	}
	if int(flags)&unix.O_TRUNC != 0 {
		// Truncate only now that the fd is known to be this node.
		openFl, _ := fuse.U32(r.in, 4)
		reopen := func() (int, unix.Errno) { return s.openForTruncate(r, n) }
		if e := s.truncateOpen(fd, flags, openFl, reopen); e != 0 {
			unix.Close(fd)
			s.t.cancelHandle(false)
			return e
		}
	}
	fh := s.t.addHandle(fd, n, nil, openFlags(flags), fdStatus)
	if e := r.replyOpen(fh); e != 0 {
		s.t.releaseHandle(fh)
		return e
	}
	return 0
}

// openFile opens regular file n for an OPEN: by one of its names
// (openNode), or, with none left (unlinked while the guest holds it
// open), as a duplicate of one of the guest's open handles of it that
// serves flags (dupHandleFd). A guest reopens such a file through
// /proc/self/fd/N; that was ESTALE (the differential test against the C
// virtiofsd, which reopens through its own /proc/self/fd).
// It returns the fd's own status flags as well (handle.fdStatus).
func (s *Server) openFile(r *request, n *node, flags int) (int, int, unix.Errno) {
	fd, e := s.openNode(r, n, flags)
	if e == unix.ESTALE {
		return s.t.dupHandleFd(n, flags, false)
	}
	return fd, flags & statusFlags, e
}

// openForTruncate opens regular file n write-only for a truncation only,
// as openFile does.
func (s *Server) openForTruncate(r *request, n *node) (int, unix.Errno) {
	fd, e := s.openNode(r, n, unix.O_WRONLY)
	if e == unix.ESTALE {
		fd, _, e = s.t.dupHandleFd(n, unix.O_WRONLY, true)
	}
	return fd, e
}

// truncateOpen applies O_TRUNC to the freshly opened fd, clearing the
// set-id bits first where setid.go says so (flags: the guest's open flags,
// openFl: the request's open_flags). A read-only fd cannot be truncated:
// for O_RDONLY|O_TRUNC (which Linux honours when the caller may write,
// and the server is sent as such, ATOMIC_O_TRUNC) reopen opens the same
// inode write-only, which the host's own permission check then decides;
// that answered EINVAL before (found in review).
func (s *Server) truncateOpen(fd int, flags, openFl uint32, reopen func() (int, unix.Errno)) unix.Errno {
	if int(flags)&unix.O_ACCMODE == unix.O_RDONLY {
		wfd, e := reopen()
		if e != 0 {
			return e
		}
		defer unix.Close(wfd)
		fd = wfd
	}
	if s.mustKill(openFl&fuse.OpenKillSuidgid != 0) {
		if e := killFd(fd); e != 0 {
			return e
		}
	}
	return errno(unix.Ftruncate(fd, 0))
}

func (s *Server) opCreate(r *request) unix.Errno {
	if len(r.in) < fuse.CreateInSize {
		return unix.EINVAL
	}
	flags, _ := fuse.U32(r.in, 0)
	mode, _ := fuse.U32(r.in, 4)
	openFl, _ := fuse.U32(r.in, 12)
	mode = s.guestMode(unix.S_IFREG, mode)
	name, _, e := nameArg(r.in[fuse.CreateInSize:])
	if e != 0 {
		return e
	}
	if int(flags)&unix.O_ACCMODE == unix.O_ACCMODE {
		return unix.EINVAL
	}
	if s.readOnly {
		return unix.EROFS
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)

	// Create exclusively first so that we know whether this request made
	// the file (and may give it to the caller); without O_EXCL from the
	// guest, fall back to opening the existing file. The handle's slot and
	// room for the node come first: a refusal leaves no file behind, and
	// an existing one untruncated.
	if e := s.reserveHandle(false); e != 0 {
		return e
	}
	added := false
	defer func() {
		if !added {
			s.t.cancelHandle(false)
		}
	}()
	if e := s.t.roomForNew(parent, name); e != 0 {
		return e
	}
	oflags := openFlags(flags) | unix.O_NONBLOCK | unix.O_NOCTTY
	made := true
	fd, err := openBeneath(parent.fd, name, oflags|unix.O_CREAT|unix.O_EXCL, mode)
	var st unix.Stat_t
	if err == unix.EEXIST && int(flags)&unix.O_EXCL == 0 {
		// Without O_EXCL the existing file is opened, if it is a
		// regular one: a FIFO or a device is refused before it is
		// opened (openRegular).
		made = false
		fd, err = openRegular(parent.fd, name, oflags, &st)
		if err == errNotRegular {
			return unix.EEXIST
		}
	} else if err == nil {
		if err = statFd(fd, &st); err != nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		return errno(err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return unix.EEXIST // made with O_EXCL: cannot happen
	}
	if int(flags)&unix.O_TRUNC != 0 && !made {
		reopen := func() (int, unix.Errno) {
			var wst unix.Stat_t
			wfd, err := openRegular(parent.fd, name, unix.O_WRONLY, &wst)
			if err == errNotRegular {
				return -1, unix.ESTALE
			}
			if err != nil {
				return -1, errno(err)
			}
			if wst.Dev != st.Dev || wst.Ino != st.Ino {
				unix.Close(wfd) // the name changed between the two opens
				return -1, unix.ESTALE
			}
			return wfd, 0
		}
		if e := s.truncateOpen(fd, flags, openFl, reopen); e != 0 {
			return e
		}
	}
	pfd, err := openPath(parent.fd, name)
	if err != nil {
		return errno(err)
	}
	var pst unix.Stat_t
	if err := statFd(pfd, &pst); err != nil || pst.Dev != st.Dev || pst.Ino != st.Ino {
		// The name changed between the two opens.
		unix.Close(pfd)
		return unix.ESTALE
	}
	if made && s.chownNew(r, parent, pfd) {
		if mode&setIDBits != 0 {
			// suid=on: the chown cleared the set-id bits the guest asked
			// for; put them back.
			if err := unix.Fchmod(fd, mode); err != nil {
				s.log.Debug("restore set-id bits after chown", "error", err)
			}
		}
		statFd(pfd, &pst) // owner, mode and ctime changed
	}
	n, e := s.t.insertHeld(parent, name, pfd, &pst)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	fh := s.t.addHandle(fd, n, nil, oflags, oflags&statusFlags)
	added, ok = true, true
	var b [fuse.EntryOutSize + fuse.OpenOutSize]byte
	en := s.entry(n, &pst)
	en.Encode(b[:])
	fuse.PutU64(b[:], fuse.EntryOutSize, fh)
	if e := r.reply(b[:]); e != 0 {
		s.t.releaseHandle(fh)
		s.t.forget(n.id, 1)
		return e
	}
	return 0
}

// fileHandle takes the handle of a READ/WRITE/... request; it must be an
// open file, not a directory.
func (s *Server) fileHandle(fh uint64, dir bool) (*handle, unix.Errno) {
	h, e := s.t.getHandle(fh)
	if e != 0 {
		return nil, e
	}
	if (h.dir != nil) != dir {
		s.t.putHandle(h)
		if dir {
			return nil, unix.ENOTDIR
		}
		return nil, unix.EISDIR
	}
	return h, 0
}

func (s *Server) opRead(r *request) unix.Errno {
	in, err := fuse.DecodeReadIn(r.in)
	if err != nil {
		return unix.EINVAL
	}
	if e := checkOffset(in.Offset, uint64(in.Size)); e != 0 {
		return e
	}
	h, e := s.fileHandle(in.Fh, false)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	if !h.readable {
		return unix.EBADF // as the guest opened it, whatever fd allows
	}
	// Clamped to the reply area and to maxRead: no guest that keeps to
	// INIT's max_pages asks for more, and the reply area alone (up to
	// 4 GiB of guest buffers) let one READ read that much (found in
	// review, helper-141).
	size := min(uint64(in.Size), s.maxRead, r.room())
	if !r.begin() {
		return unix.ENOBUFS
	}
	if size == 0 {
		return 0
	}
	segs := r.c.PeekWritable(r.sc.segs[:0], size)
	n, err := r.sc.iov.transfer(h.fd, segs, int64(in.Offset), false)
	clear(segs)
	r.sc.segs = segs[:0]
	if err != nil {
		return errno(err)
	}
	if err := r.c.SkipWrite(uint64(n)); err != nil {
		return unix.EIO
	}
	s.stats.ReadBytes.Add(uint64(n))
	return 0
}

func (s *Server) opWrite(r *request) unix.Errno {
	in, err := fuse.DecodeWriteIn(r.in)
	if err != nil {
		return unix.EINVAL
	}
	if uint64(in.Size) > r.data || in.Size > s.maxWrite {
		// More than INIT's max_write: no guest that kept to it sends
		// that (the message's length alone bounded it, at 4 GiB).
		return unix.EINVAL
	}
	if e := checkOffset(in.Offset, uint64(in.Size)); e != 0 {
		return unix.EFBIG
	}
	if s.readOnly {
		return unix.EROFS
	}
	h, e := s.fileHandle(in.Fh, false)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	if !h.writable {
		return unix.EBADF // as write(2) on such an fd, before any change
	}
	n := 0
	if in.Size > 0 {
		if s.mustKill(in.Flags&fuse.WriteKillSuidgid != 0) {
			if e := killFd(h.fd); e != 0 {
				return e
			}
		}
		// The guest places its O_APPEND writes itself (at its EOF);
		// the host fd's O_APPEND keeps them appends there too. A page
		// written back from the guest's cache through such a handle
		// (an mmap'd file) belongs at its offset, not at the end:
		// RWF_NOAPPEND (Linux 6.9) overrides O_APPEND for that write.
		// A duplicated fd (dupHandleFd) may lack the O_APPEND, O_SYNC
		// or O_DSYNC the guest opened with: each write gets them.
		flags := 0
		switch {
		case in.Flags&fuse.WriteCache != 0:
			if h.fdStatus&unix.O_APPEND != 0 {
				flags = unix.RWF_NOAPPEND
			}
		case h.appends && h.fdStatus&unix.O_APPEND == 0:
			flags = unix.RWF_APPEND
		}
		switch {
		case h.oflags&unix.O_SYNC == unix.O_SYNC && h.fdStatus&unix.O_SYNC != unix.O_SYNC:
			flags |= unix.RWF_SYNC
		case h.oflags&unix.O_DSYNC != 0 && h.fdStatus&unix.O_DSYNC == 0:
			flags |= unix.RWF_DSYNC
		}
		segs := r.c.PeekReadable(r.sc.segs[:0], uint64(in.Size))
		n, err = r.sc.iov.transferFlags(h.fd, segs, int64(in.Offset), true, flags)
		if flags&unix.RWF_NOAPPEND != 0 && err == unix.EOPNOTSUPP {
			// An older host kernel: an error beats data appended
			// where the guest wrote a page in place.
			if s.noAppendWarned.CompareAndSwap(false, true) {
				s.log.Warn("a page written back through an O_APPEND handle cannot be placed at its offset on this host kernel (RWF_NOAPPEND needs Linux 6.9); such writes fail")
			}
			err = unix.EIO
		}
		clear(segs)
		r.sc.segs = segs[:0]
		if err != nil {
			return errno(err)
		}
	}
	s.stats.WriteBytes.Add(uint64(n))
	var b [fuse.WriteOutSize]byte
	fuse.PutU32(b[:], 0, uint32(n))
	return r.reply(b[:])
}

func (s *Server) opRelease(r *request) unix.Errno {
	fh, ok := fuse.U64(r.in, 0)
	if !ok {
		return unix.EINVAL
	}
	h, e := s.fileHandle(fh, r.h.Opcode == fuse.OpReleasedir)
	if e != 0 {
		return e
	}
	s.t.putHandle(h)
	if e := s.t.releaseHandle(fh); e != 0 {
		return e
	}
	return r.reply()
}

func (s *Server) opFlush(r *request) unix.Errno {
	fh, ok := fuse.U64(r.in, 0)
	if !ok {
		return unix.EINVAL
	}
	h, e := s.fileHandle(fh, false)
	if e != 0 {
		return e
	}
	s.t.putHandle(h)
	// No POSIX locks are held on the host (the guest kernel keeps them),
	// and data is written through, so there is nothing to flush.
	return r.reply()
}

func (s *Server) opFsync(r *request) unix.Errno {
	if len(r.in) < fuse.FsyncInSize {
		return unix.EINVAL
	}
	fh, _ := fuse.U64(r.in, 0)
	flags, _ := fuse.U32(r.in, 8)
	h, e := s.fileHandle(fh, r.h.Opcode == fuse.OpFsyncdir)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	var err error
	if flags&fuse.FsyncFdatasync != 0 {
		err = unix.Fdatasync(h.fd)
	} else {
		err = unix.Fsync(h.fd)
	}
	if err != nil {
		return errno(err)
	}
	return r.reply()
}

// fallocModeOK reports whether mode is one fallocate(2) accepts on every
// file system (which then may still refuse it, EOPNOTSUPP): one operation
// (allocate, punch a hole, zero, collapse, insert or unshare a range),
// with FALLOC_FL_KEEP_SIZE where it may go, as vfs_fallocate checks them
// (Linux 6.11; older kernels answer EINVAL for some of these). Checked
// before the set-id bits are cleared, so that a refused request changes
// nothing: an unknown mode was refused before, a bad combination only by
// the host, after the bits were gone. FUSE from a Linux guest sends
// KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE only.
func fallocModeOK(mode uint32) bool {
	keep := mode&unix.FALLOC_FL_KEEP_SIZE != 0
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case 0, unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_UNSHARE_RANGE:
		return true
	case unix.FALLOC_FL_PUNCH_HOLE:
		return keep
	case unix.FALLOC_FL_COLLAPSE_RANGE, unix.FALLOC_FL_INSERT_RANGE:
		return !keep
	}
	return false
}

func (s *Server) opFallocate(r *request) unix.Errno {
	if len(r.in) < fuse.FallocateInSize {
		return unix.EINVAL
	}
	fh, _ := fuse.U64(r.in, 0)
	off, _ := fuse.U64(r.in, 8)
	length, _ := fuse.U64(r.in, 16)
	mode, _ := fuse.U32(r.in, 24)
	if !fallocModeOK(mode) {
		return unix.EOPNOTSUPP
	}
	if length == 0 {
		return unix.EINVAL
	}
	if e := checkOffset(off, length); e != 0 {
		return unix.EFBIG
	}
	if s.readOnly {
		return unix.EROFS
	}
	h, e := s.fileHandle(fh, false)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	if !h.writable {
		return unix.EBADF // as fallocate(2) on such an fd, before any change
	}
	// Not every host file system clears set-id bits on fallocate (WRITE
	// and truncate always do, for a process without CAP_FSETID), so a
	// nosuid share does it here whatever the process's capabilities.
	if !s.allowSetID {
		if e := killFd(h.fd); e != 0 {
			return e
		}
	}
	if err := unix.Fallocate(h.fd, mode, int64(off), int64(length)); err != nil {
		return errno(err)
	}
	return r.reply()
}

func (s *Server) opLseek(r *request) unix.Errno {
	if len(r.in) < fuse.LseekInSize {
		return unix.EINVAL
	}
	fh, _ := fuse.U64(r.in, 0)
	off, _ := fuse.U64(r.in, 8)
	whence, _ := fuse.U32(r.in, 16)
	switch whence {
	case unix.SEEK_SET, unix.SEEK_CUR, unix.SEEK_END, unix.SEEK_DATA, unix.SEEK_HOLE:
	default:
		return unix.EINVAL
	}
	h, e := s.fileHandle(fh, false)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	// The fd's own position is never used for I/O (pread/pwrite), so
	// moving it is harmless.
	pos, err := unix.Seek(h.fd, int64(off), int(whence))
	if err != nil {
		return errno(err)
	}
	var b [fuse.LseekOutSize]byte
	fuse.PutU64(b[:], 0, uint64(pos))
	return r.reply(b[:])
}

func (s *Server) opSyncfs(r *request) unix.Errno {
	if !s.readOnly {
		// syncfs refuses an O_PATH descriptor (EBADF), which the root's
		// is: it takes a directory opened for reading, as virtiofsd's does.
		fd, err := s.reopenDir(s.rootFd)
		if err != nil {
			return errno(err)
		}
		err = unix.Syncfs(fd)
		unix.Close(fd)
		if err != nil {
			if err == unix.EPERM || err == unix.ENOSYS {
				// Refused by the sandbox: ENOSYS makes the guest stop
				// sending SYNCFS (fsync of each file still works).
				return unix.ENOSYS
			}
			return errno(err)
		}
	}
	return r.reply()
}
