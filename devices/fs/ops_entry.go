package fs

import (
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Name-space operations: LOOKUP, MKNOD, MKDIR, SYMLINK, UNLINK, RMDIR,
// RENAME, RENAME2, LINK.

// encodeDev and decodeDev convert between a host dev_t and the kernel's
// 32-bit "new" encoding that FUSE carries in fuse_attr.rdev and
// fuse_mknod_in.rdev.
func encodeDev(dev uint64) uint32 {
	maj, mnr := unix.Major(dev), unix.Minor(dev)
	return (mnr & 0xff) | (maj&0xfff)<<8 | (mnr&^0xff)<<12
}

func decodeDev(x uint32) uint64 {
	maj := (x & 0xfff00) >> 8
	mnr := (x & 0xff) | ((x >> 12) & 0xfff00)
	return unix.Mkdev(maj, mnr)
}

// attr converts host attributes to what the guest sees.
func (s *Server) attr(st *unix.Stat_t) fuse.Attr {
	return fuse.Attr{
		Ino:       st.Ino,
		Size:      uint64(st.Size),
		Blocks:    uint64(st.Blocks),
		Atime:     uint64(st.Atim.Sec),
		Atimensec: uint32(st.Atim.Nsec),
		Mtime:     uint64(st.Mtim.Sec),
		Mtimensec: uint32(st.Mtim.Nsec),
		Ctime:     uint64(st.Ctim.Sec),
		Ctimensec: uint32(st.Ctim.Nsec),
		Mode:      st.Mode,
		Nlink:     uint32(st.Nlink),
		UID:       s.uids.toGuest(st.Uid),
		GID:       s.gids.toGuest(st.Gid),
		Rdev:      encodeDev(st.Rdev),
		Blks:      uint32(st.Blksize),
	}
}

// replyEntry answers with fuse_entry_out for n (nil: a negative entry the
// guest may cache for the entry timeout).
func (r *request) replyEntry(n *node, st *unix.Stat_t, extra []byte) unix.Errno {
	var b [fuse.EntryOutSize]byte
	e := r.s.entry(n, st)
	e.Encode(b[:])
	return r.reply(b[:], extra)
}

func (s *Server) entry(n *node, st *unix.Stat_t) fuse.EntryOut {
	e := fuse.EntryOut{EntryValid: s.entryTO.sec, EntryValidNs: s.entryTO.nsec}
	if n != nil {
		e.NodeID = n.id
		e.AttrValid, e.AttrValidNs = s.attrTO.sec, s.attrTO.nsec
		e.Attr = s.attr(st)
	}
	return e
}

// nameArg takes one NUL-terminated path component from b.
func nameArg(b []byte) (string, []byte, unix.Errno) {
	name, rest, err := fuse.CString(b)
	if err != nil {
		return "", nil, unix.EINVAL
	}
	if e := checkName(name); e != 0 {
		return "", nil, e
	}
	return string(name), rest, 0
}

// lookupName resolves name below parent and records one guest reference.
func (s *Server) lookupName(parent *node, name string, st *unix.Stat_t) (*node, unix.Errno) {
	fd, err := openPath(parent.fd, name)
	if err != nil {
		return nil, errno(err)
	}
	if err := statFd(fd, st); err != nil {
		unix.Close(fd)
		return nil, errno(err)
	}
	return s.t.insert(parent, name, fd, st)
}

func (s *Server) opLookup(r *request) unix.Errno {
	name, _, e := nameArg(r.in)
	if e != 0 {
		return e
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)
	var st unix.Stat_t
	n, e := s.lookupName(parent, name, &st)
	if e == unix.ENOENT {
		return r.replyEntry(nil, nil, nil)
	}
	if e != 0 {
		return e
	}
	if e := r.replyEntry(n, &st, nil); e != 0 {
		s.t.forget(n.id, 1)
		return e
	}
	return 0
}

// created finishes MKNOD, MKDIR and SYMLINK: it gives the new inode to the
// requesting guest user where the process may do so, then looks it up.
// mode is the permission bits the inode was made with.
func (s *Server) created(r *request, parent *node, name string, mode uint32) unix.Errno {
	var st unix.Stat_t
	fd, err := openPath(parent.fd, name)
	if err != nil {
		return errno(err)
	}
	chowned := s.chownNew(r, parent, fd)
	if err := statFd(fd, &st); err != nil {
		unix.Close(fd)
		return errno(err)
	}
	n, e := s.t.insertHeld(parent, name, fd, &st)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if chowned && mode&setIDBits&^st.Mode != 0 {
		// suid=on: the chown cleared set-id bits the guest asked for.
		if e := s.chmod(r, n, nil, mode); e != 0 {
			s.log.Debug("restore set-id bits after chown", "error", e)
		}
		statFd(n.fd, &st)
	}
	if e := r.replyEntry(n, &st, nil); e != 0 {
		s.t.forget(n.id, 1)
		return e
	}
	return 0
}

// chownNew makes a freshly created inode (fd, O_PATH or open) belong to the
// guest caller's mapped ids when they differ from the process's and the
// process has CAP_CHOWN. Without it the inode stays the process's: see
// docs/VIRTIOFS.md. The group is left alone under a set-group-id directory,
// where the host kernel already applied the inherited group. It reports
// whether it changed the owner.
func (s *Server) chownNew(r *request, parent *node, fd int) bool {
	if !s.canChown {
		return false
	}
	uid, uok := s.uids.toHost(r.h.UID)
	gid, gok := s.gids.toHost(r.h.GID)
	ouid, ogid := -1, -1
	if uok && uid != s.euid {
		ouid = int(uid)
	}
	if gok && gid != s.egid {
		var pst unix.Stat_t
		if statFd(parent.fd, &pst) == nil && pst.Mode&unix.S_ISGID == 0 {
			ogid = int(gid)
		}
	}
	if ouid == -1 && ogid == -1 {
		return false
	}
	if err := unix.Fchownat(fd, "", ouid, ogid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		s.log.Debug("give new inode to guest caller", "uid", ouid, "gid", ogid, "error", err)
		return false
	}
	return true
}

func (s *Server) opMknod(r *request) unix.Errno {
	if len(r.in) < fuse.MknodInSize {
		return unix.EINVAL
	}
	mode, _ := fuse.U32(r.in, 0)
	rdev, _ := fuse.U32(r.in, 4)
	name, _, e := nameArg(r.in[fuse.MknodInSize:])
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	switch mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFIFO, unix.S_IFSOCK:
		rdev = 0
	case unix.S_IFCHR, unix.S_IFBLK:
		// Device nodes would give the guest a way to have the host (or
		// anyone on it) open host devices. Only the 0/0 character device,
		// overlayfs' whiteout, is allowed.
		if mode&unix.S_IFMT != unix.S_IFCHR || rdev != 0 {
			return unix.EPERM
		}
	default:
		return unix.EINVAL
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)
	perm := s.guestMode(mode&unix.S_IFMT, mode)
	if e := s.t.roomForNew(parent, name); e != 0 {
		return e
	}
	if err := unix.Mknodat(parent.fd, name, mode&unix.S_IFMT|perm, int(decodeDev(rdev))); err != nil {
		return errno(err)
	}
	return s.created(r, parent, name, perm)
}

func (s *Server) opMkdir(r *request) unix.Errno {
	if len(r.in) < fuse.MkdirInSize {
		return unix.EINVAL
	}
	mode, _ := fuse.U32(r.in, 0)
	name, _, e := nameArg(r.in[fuse.MkdirInSize:])
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)
	perm := s.guestMode(unix.S_IFDIR, mode)
	if e := s.t.roomForNew(parent, name); e != 0 {
		return e
	}
	if err := unix.Mkdirat(parent.fd, name, perm); err != nil {
		return errno(err)
	}
	return s.created(r, parent, name, perm)
}

func (s *Server) opSymlink(r *request) unix.Errno {
	name, rest, e := nameArg(r.in)
	if e != 0 {
		return e
	}
	target, _, err := fuse.CString(rest)
	if err != nil || len(target) == 0 {
		return unix.EINVAL
	}
	if len(target) >= fuse.MaxSymlinkLen {
		return unix.ENAMETOOLONG
	}
	if s.readOnly {
		return unix.EROFS
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)
	if e := s.t.roomForNew(parent, name); e != 0 {
		return e
	}
	// The target is stored verbatim: it is only text on the host, which
	// the server never follows.
	if err := unix.Symlinkat(string(target), parent.fd, name); err != nil {
		return errno(err)
	}
	return s.created(r, parent, name, 0)
}

func (s *Server) opRemove(r *request, flags int) unix.Errno {
	name, _, e := nameArg(r.in)
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	parent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(parent)
	victim, e := s.t.getName(parent.id, name)
	if e != 0 {
		return e
	}
	defer s.t.put(victim)
	if err := unix.Unlinkat(parent.fd, name, flags); err != nil {
		return errno(err)
	}
	s.t.dropName(parent.id, name)
	return r.reply()
}

const renameFlags = unix.RENAME_NOREPLACE | unix.RENAME_EXCHANGE | unix.RENAME_WHITEOUT

func (s *Server) opRename(r *request, v2 bool) unix.Errno {
	size := fuse.RenameInSize
	if v2 {
		size = fuse.Rename2InSize
	}
	if len(r.in) < size {
		return unix.EINVAL
	}
	newdir, _ := fuse.U64(r.in, 0)
	var flags uint32
	if v2 {
		flags, _ = fuse.U32(r.in, 8)
	}
	if flags&^renameFlags != 0 {
		return unix.EINVAL
	}
	oldName, rest, e := nameArg(r.in[size:])
	if e != 0 {
		return e
	}
	newName, _, e := nameArg(rest)
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	oldParent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(oldParent)
	newParent, e := s.t.get(newdir)
	if e != 0 {
		return e
	}
	defer s.t.put(newParent)
	if flags&unix.RENAME_EXCHANGE == 0 {
		// The node over which the rename goes must stay reachable; an
		// exchange gives it the old name instead.
		victim, e := s.t.getName(newParent.id, newName)
		if e != 0 {
			return e
		}
		defer s.t.put(victim)
	}
	if err := unix.Renameat2(oldParent.fd, oldName, newParent.fd, newName, uint(flags)); err != nil {
		return errno(err)
	}
	s.t.renamed(oldParent, oldName, newParent, newName, flags&unix.RENAME_EXCHANGE != 0)
	return r.reply()
}

func (s *Server) opLink(r *request) unix.Errno {
	if len(r.in) < fuse.LinkInSize {
		return unix.EINVAL
	}
	oldID, _ := fuse.U64(r.in, 0)
	name, _, e := nameArg(r.in[fuse.LinkInSize:])
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	n, e := s.t.get(oldID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if n.isDir() {
		return unix.EPERM
	}
	newParent, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(newParent)

	// linkat(fd, "", AT_EMPTY_PATH) links exactly this inode, but the
	// kernel allows it only with CAP_DAC_READ_SEARCH; otherwise link one of
	// the node's known names and check that the new name is this inode.
	err := unix.Linkat(n.fd, "", newParent.fd, name, unix.AT_EMPTY_PATH)
	if err != nil && (err == unix.ENOENT || err == unix.EPERM) {
		err = s.linkByAlias(n, newParent, name)
	}
	if err != nil {
		return errno(err)
	}
	var st unix.Stat_t
	m, e := s.lookupName(newParent, name, &st)
	if e != 0 {
		return e
	}
	if e := r.replyEntry(m, &st, nil); e != 0 {
		s.t.forget(m.id, 1)
		return e
	}
	return 0
}

// linkByAlias links one of n's names to name in dir.
func (s *Server) linkByAlias(n, dir *node, name string) error {
	as := s.t.aliases(n, nil)
	defer s.t.putAliases(as)
	if len(as) == 0 {
		return unix.ENOENT
	}
	var lastErr error = unix.ENOENT
	for _, a := range as {
		if s.t.acquire(a.parent) != 0 {
			continue
		}
		err := unix.Linkat(a.parent.fd, a.name, dir.fd, name, 0)
		s.t.release(a.parent)
		if err != nil {
			lastErr = err
			if err == unix.EEXIST {
				return err
			}
			continue
		}
		var st unix.Stat_t
		if unix.Fstatat(dir.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Dev == n.key.dev && st.Ino == n.key.ino {
			return nil
		}
		// The alias named another inode by now (a rename raced us): take
		// the wrong link back and try the next name.
		unix.Unlinkat(dir.fd, name, 0)
		s.t.dropName(a.parent.id, a.name)
		lastErr = unix.ESTALE
	}
	return lastErr
}
