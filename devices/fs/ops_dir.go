package fs

import (
	"bytes"
	"encoding/binary"
	"math"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Directory operations: OPENDIR, READDIR, READDIRPLUS.

// dirBufSize is the getdents64 buffer of one open directory.
const dirBufSize = 16 << 10

// dirStream is the read position of an open directory. Entries come from
// getdents64 in batches; a batch's unread entries are kept so that a reply
// that fills up resumes exactly at the next entry without seeking. Offsets
// given to the guest are the host's d_off cookies, so a guest seekdir or a
// resumed listing lseeks to them.
type dirStream struct {
	buf      []byte
	pos, end int
	off      uint64 // d_off of the last entry handed out: where the stream is
}

func (s *Server) opOpendir(r *request) unix.Errno {
	n, e := s.t.get(r.h.NodeID)
	if e != 0 {
		return e
	}
	defer s.t.put(n)
	if !n.isDir() {
		return unix.ENOTDIR
	}
	if e := s.reserveHandle(true); e != 0 {
		return e
	}
	fd, err := s.reopenDir(n.fd)
	if err != nil {
		s.t.cancelHandle(true)
		return errno(err)
	}
	fh := s.t.addHandle(fd, n, &dirStream{buf: make([]byte, dirBufSize)}, unix.O_RDONLY, 0)
	if e := r.replyOpen(fh); e != 0 {
		s.t.releaseHandle(fh)
		return e
	}
	return 0
}

// linux_dirent64 layout: ino u64, off s64, reclen u16, type u8, name.
const direntNameOff = 19

func (s *Server) opReaddir(r *request, plus bool) unix.Errno {
	in, err := fuse.DecodeReadIn(r.in)
	if err != nil {
		return unix.EINVAL
	}
	if in.Offset > math.MaxInt64 {
		return unix.EINVAL
	}
	h, e := s.fileHandle(in.Fh, true)
	if e != 0 {
		return e
	}
	defer s.t.putHandle(h)
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.dir
	if in.Offset != d.off {
		if _, err := unix.Seek(h.fd, int64(in.Offset), unix.SEEK_SET); err != nil {
			return errno(err)
		}
		d.pos, d.end, d.off = 0, 0, in.Offset
	}
	if plus {
		// Lookups below this directory use its O_PATH fd.
		if e := s.t.acquire(h.node); e != 0 {
			return e
		}
		defer s.t.release(h.node)
	}
	limit := min(uint64(in.Size), r.room())
	written := uint64(0)
	rec := r.sc.out[:]
	for {
		if d.pos >= d.end {
			n, err := getdents(h.fd, d.buf)
			if err != nil {
				if written == 0 {
					return errno(err)
				}
				break
			}
			if n == 0 {
				break
			}
			d.pos, d.end = 0, n
		}
		ent := d.buf[d.pos:d.end]
		if len(ent) < direntNameOff+1 {
			d.pos = d.end // the kernel never does this; drop the batch
			continue
		}
		ino := binary.LittleEndian.Uint64(ent[0:])
		off := binary.LittleEndian.Uint64(ent[8:])
		reclen := int(binary.LittleEndian.Uint16(ent[16:]))
		typ := uint32(ent[18])
		if reclen <= direntNameOff || reclen > len(ent) {
			d.pos = d.end
			continue
		}
		name := ent[direntNameOff:reclen]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		if len(name) == 0 || len(name) > fuse.MaxNameLen {
			d.pos += reclen
			d.off = off
			continue
		}
		var size int
		if plus {
			size = fuse.DirentplusSize(len(name))
		} else {
			size = fuse.DirentSize(len(name))
		}
		if written+uint64(size) > limit {
			break
		}
		var b []byte
		if plus {
			var st unix.Stat_t
			var en fuse.EntryOut
			if !isDots(name) {
				if m := s.direntNode(h.node, name, ino, &st); m != nil {
					en = s.entry(m, &st)
				}
			}
			en.Encode(rec)
			fuse.PutDirent(rec[fuse.EntryOutSize:], ino, off, typ, name)
			b = rec[:size]
		} else {
			b = rec[:fuse.PutDirent(rec, ino, off, typ, name)]
		}
		if !r.begin() {
			return unix.ENOBUFS
		}
		if _, err := r.c.Write(b); err != nil {
			// room() said it fits; a short chain here is the guest's doing.
			break
		}
		written += uint64(size)
		d.pos += reclen
		d.off = off
	}
	if !r.begin() {
		return unix.ENOBUFS
	}
	return 0
}

func isDots(name []byte) bool {
	return (len(name) == 1 && name[0] == '.') || (len(name) == 2 && name[0] == '.' && name[1] == '.')
}

// direntNode looks up one READDIRPLUS entry, adding a guest reference. A
// name the server already knows with the same inode number is answered
// from its node (one fstat); anything else takes a full lookup. Failures
// yield nil: the entry is then listed without attributes.
func (s *Server) direntNode(parent *node, name []byte, ino uint64, st *unix.Stat_t) *node {
	if n := s.t.known(parent, string(name), ino); n != nil {
		if s.t.acquire(n) == 0 {
			ok := statFd(n.fd, st) == nil && st.Ino == ino
			s.t.release(n)
			if ok {
				s.t.unpinRef(n)
				return n
			}
		}
		// Changed under us: drop the reference taken and look up afresh.
		s.t.forgetPinned(n)
	}
	nameStr := string(name)
	if checkName(name) != 0 {
		return nil
	}
	n, e := s.lookupName(parent, nameStr, st)
	if e != 0 {
		return nil
	}
	return n
}

// getdents reads directory entries, retrying EINTR.
func getdents(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		return n, err
	}
}
