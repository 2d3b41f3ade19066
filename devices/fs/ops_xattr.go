package fs

import (
	"bytes"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Extended attributes: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.
//
// Values are passed verbatim but for POSIX ACLs, whose named user and
// group ids go through the uidmap and gidmap as owners do (mapACL): an
// id outside the maps cannot be set (EINVAL) and reads as 65534.
//
// The f*xattr calls need an open file, so directories and regular files
// are reopened (openNode), or a file without a name reached through an
// open handle (openAny); symlinks and special files, which the server
// never opens, have no extended attributes as far as the guest can tell.

func xattrName(b []byte) (string, []byte, unix.Errno) {
	name, rest, err := fuse.CString(b)
	if err != nil || len(name) == 0 {
		return "", nil, unix.EINVAL
	}
	if len(name) > fuse.MaxXattrNameLen {
		return "", nil, unix.ERANGE
	}
	return string(name), rest, 0
}

func (s *Server) opSetxattr(r *request) unix.Errno {
	if s.noXattr {
		return unix.ENOSYS
	}
	if len(r.in) < fuse.SetxattrInSize {
		return unix.EINVAL
	}
	size, _ := fuse.U32(r.in, 0)
	flags, _ := fuse.U32(r.in, 4)
	name, rest, e := xattrName(r.in[fuse.SetxattrInSize:])
	if e != 0 {
		return e
	}
	if size > fuse.MaxXattrSize {
		return unix.E2BIG
	}
	if uint64(size) > uint64(len(rest)) {
		return unix.EINVAL
	}
	if flags&^uint32(unix.XATTR_CREATE|unix.XATTR_REPLACE) != 0 {
		return unix.EINVAL
	}
	if s.readOnly {
		return unix.EROFS
	}
	if !s.maySetXattr(name) || trustedXattr(name) {
		// File capabilities, like set-id bits, need suid=on; trusted.*
		// is never the guest's.
		return unix.EPERM
	}
	value := rest[:size]
	if s.mapsIDs() && isACLXattr(name) && size > 0 && !mapACL(s.uids, s.gids, value, true) {
		// value is the request's own copy (scratch space).
		return unix.EINVAL
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		return unix.EPERM
	}
	fd, h, e := s.openAny(r, n)
	if e != 0 {
		return e
	}
	defer s.closeAny(fd, h)
	if err := unix.Fsetxattr(fd, name, value, int(flags)); err != nil {
		return errno(err)
	}
	return r.reply()
}

// opGetxattr serves GETXATTR and (list) LISTXATTR.
func (s *Server) opGetxattr(r *request, list bool) unix.Errno {
	if s.noXattr {
		return unix.ENOSYS
	}
	size, ok := fuse.U32(r.in, 0)
	if !ok {
		return unix.EINVAL
	}
	var name string
	if !list {
		if len(r.in) < fuse.GetxattrInSize {
			return unix.EINVAL
		}
		var e unix.Errno
		if name, _, e = xattrName(r.in[fuse.GetxattrInSize:]); e != 0 {
			return e
		}
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	buf := r.sc.big[:min(uint64(size), uint64(len(r.sc.big)))]
	if list {
		// The whole list, whatever size the guest asked for: the names
		// it must not see come out before its size is known.
		buf = r.sc.big[:]
	}
	var k int
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR || !list && trustedXattr(name) {
		if !list {
			return unix.ENODATA
		}
	} else {
		fd, h, e := s.openAny(r, n)
		if e != 0 {
			return e
		}
		var err error
		if list {
			k, err = unix.Flistxattr(fd, buf)
			if err == nil {
				k = dropTrustedNames(buf[:k])
			}
		} else {
			k, err = unix.Fgetxattr(fd, name, buf)
		}
		s.closeAny(fd, h)
		if err != nil {
			return errno(err)
		}
	}
	if list && size > 0 && uint64(k) > uint64(size) {
		return unix.ERANGE
	}
	if !list && size > 0 && k > 0 && s.mapsIDs() && isACLXattr(name) && !mapACL(s.uids, s.gids, buf[:k], false) {
		return unix.EIO // the host's own ACL does not parse
	}
	if size == 0 {
		var b [fuse.GetxattrOutSize]byte
		fuse.PutU32(b[:], 0, uint32(k))
		return r.reply(b[:])
	}
	if uint64(k) > r.room() {
		return unix.ERANGE
	}
	return r.reply(buf[:k])
}

func (s *Server) opRemovexattr(r *request) unix.Errno {
	if s.noXattr {
		return unix.ENOSYS
	}
	name, _, e := xattrName(r.in)
	if e != 0 {
		return e
	}
	if s.readOnly {
		return unix.EROFS
	}
	if trustedXattr(name) {
		return unix.EPERM
	}
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		return unix.EPERM
	}
	fd, h, e := s.openAny(r, n)
	if e != 0 {
		return e
	}
	defer s.closeAny(fd, h)
	if err := unix.Fremovexattr(fd, name); err != nil {
		return errno(err)
	}
	return r.reply()
}

// trustedXattr reports whether name is in the trusted.* namespace: root's
// private metadata on the host (overlayfs keeps the structure of its
// layers there, trusted.overlay.*). The guest never gets it: setting or
// removing one is EPERM, reading one ENODATA, and a list leaves them out,
// which is what the kernel answers a process without CAP_SYS_ADMIN: the
// sandboxed plugin gets that from the host anyway, and the C virtiofsd
// (which drops CAP_SYS_ADMIN) answers the same. It matters where the
// plugin holds the capability: `--sandbox off` as root, where a guest
// could otherwise write overlay metadata into a directory the host also
// uses as a layer.
func trustedXattr(name string) bool { return strings.HasPrefix(name, trustedPrefix) }

const trustedPrefix = "trusted."

// dropTrustedNames removes the trusted.* names from list (NUL-terminated
// names, as listxattr returns them) in place and returns its new length.
func dropTrustedNames(list []byte) int {
	w := 0
	for r := 0; r < len(list); {
		end := bytes.IndexByte(list[r:], 0)
		if end < 0 {
			end = len(list) - r - 1 // a last name without its NUL: kept as it is
		}
		name := list[r : r+end+1]
		if !bytes.HasPrefix(name, []byte(trustedPrefix)) {
			w += copy(list[w:], name)
		}
		r += end + 1
	}
	return w
}
