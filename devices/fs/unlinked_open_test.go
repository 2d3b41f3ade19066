package fs

import (
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestOpenUnlinkedFile: a regular file unlinked while the guest holds it
// open has no name to reopen it by, and a second OPEN of it (a guest's
// open of /proc/self/fd/N, or a truncate(2) of that path) was ESTALE. It
// is now served by a duplicate of the fd of one of the guest's open
// handles that allows it, with the access the guest asked for (found by
// the differential test against the C virtiofsd, which reopens through
// its own /proc/self/fd).
func TestOpenUnlinkedFile(t *testing.T) {
	e := newEnv(t, 0, nil)
	en, rw, err := e.c.Create(fuse.RootID, "u", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	_, err = e.c.Write(en.NodeID, rw, 0, []byte("abc"))
	must(t, "WRITE", err)
	must(t, "UNLINK", e.c.Unlink(fuse.RootID, "u"))

	// Read-only: reads, and refuses writes.
	ro, err := e.c.Open(en.NodeID, unix.O_RDONLY)
	must(t, "OPEN O_RDONLY of the unlinked file", err)
	if b, err := e.c.Read(en.NodeID, ro, 0, 10); err != nil || string(b) != "abc" {
		t.Errorf("READ through the new handle: %q %v, want abc", b, err)
	}
	_, err = e.c.Write(en.NodeID, ro, 0, []byte("x"))
	wantErrno(t, "WRITE through a read-only handle", err, syscall.EBADF)

	// Write-only: writes, and refuses reads, though its fd is the
	// read-write handle's.
	wo, err := e.c.Open(en.NodeID, unix.O_WRONLY)
	must(t, "OPEN O_WRONLY of the unlinked file", err)
	_, err = e.c.Write(en.NodeID, wo, 3, []byte("def"))
	must(t, "WRITE through the new handle", err)
	_, err = e.c.Read(en.NodeID, wo, 0, 10)
	wantErrno(t, "READ through a write-only handle", err, syscall.EBADF)
	if b, err := e.c.Read(en.NodeID, ro, 0, 10); err != nil || string(b) != "abcdef" {
		t.Errorf("READ after the write: %q %v, want abcdef", b, err)
	}

	// An append through a duplicate of an fd without O_APPEND: each
	// write is made an append (RWF_APPEND), wherever the guest placed it.
	ap, err := e.c.Open(en.NodeID, unix.O_WRONLY|unix.O_APPEND)
	must(t, "OPEN O_WRONLY|O_APPEND of the unlinked file", err)
	_, err = e.c.Write(en.NodeID, ap, 0, []byte("gh"))
	must(t, "WRITE through the append handle", err)
	if b, _ := e.c.Read(en.NodeID, ro, 0, 10); string(b) != "abcdefgh" {
		t.Errorf("after an append at offset 0: %q, want abcdefgh", b)
	}
	sy, err := e.c.Open(en.NodeID, unix.O_RDWR|unix.O_SYNC)
	must(t, "OPEN O_RDWR|O_SYNC of the unlinked file", err)
	_, err = e.c.Write(en.NodeID, sy, 8, []byte("i"))
	must(t, "WRITE through the O_SYNC handle", err)
	for _, fh := range []uint64{ap, sy} {
		must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
	}

	// A file whose only handle's fd has O_APPEND: reads and appends are
	// served, a write in place is not (every write through that
	// description would need RWF_NOAPPEND).
	ven, vh, err := e.c.Create(fuse.RootID, "v", unix.O_RDWR|unix.O_APPEND, 0o644)
	must(t, "CREATE v", err)
	must(t, "UNLINK v", e.c.Unlink(fuse.RootID, "v"))
	for _, tc := range []struct {
		flags uint32
		want  syscall.Errno
	}{{unix.O_RDONLY, 0}, {unix.O_WRONLY | unix.O_APPEND, 0}, {unix.O_WRONLY, syscall.ESTALE}, {unix.O_RDWR, syscall.ESTALE}} {
		fh, err := e.c.Open(ven.NodeID, tc.flags)
		if tc.want != 0 {
			wantErrno(t, "OPEN for writes in place through an O_APPEND description", err, tc.want)
			continue
		}
		must(t, "OPEN of v", err)
		must(t, "RELEASE", e.c.Release(ven.NodeID, fh, false))
	}
	must(t, "RELEASE v", e.c.Release(ven.NodeID, vh, false))

	// A truncate without a handle, and O_TRUNC.
	_, err = e.c.Setattr(en.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: 2})
	must(t, "SETATTR size of the unlinked file", err)
	if b, _ := e.c.Read(en.NodeID, ro, 0, 10); string(b) != "ab" {
		t.Errorf("after truncating to 2: %q", b)
	}
	tr, err := e.c.Open(en.NodeID, unix.O_RDONLY|unix.O_TRUNC)
	must(t, "OPEN O_RDONLY|O_TRUNC of the unlinked file", err)
	if b, _ := e.c.Read(en.NodeID, tr, 0, 10); len(b) != 0 {
		t.Errorf("after O_TRUNC: %q", b)
	}

	// Once the guest has released every handle, nothing reaches it.
	for _, fh := range []uint64{rw, ro, wo, tr} {
		must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
	}
	_, err = e.c.Open(en.NodeID, unix.O_RDONLY)
	wantErrno(t, "OPEN with no handle left", err, syscall.ESTALE)
}
