package fs

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

// outside makes a directory next to (not inside) the share with a secret
// file, and returns the directory and the file's inode number.
func outside(t *testing.T) (string, uint64) {
	t.Helper()
	dir := t.TempDir()
	must(t, "write secret", os.WriteFile(filepath.Join(dir, "secret"), []byte("secret"), 0o644))
	var st unix.Stat_t
	must(t, "stat secret", unix.Stat(filepath.Join(dir, "secret"), &st))
	return dir, st.Ino
}

func checkSecret(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "secret"))
	if err != nil || string(b) != "secret" {
		t.Fatalf("the file outside the share changed: %q %v", b, err)
	}
	st, err := os.Stat(filepath.Join(dir, "secret"))
	if err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("the file outside the share changed mode: %v %v", st.Mode(), err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("the directory outside the share has %d entries", len(ents))
	}
}

func TestBadNames(t *testing.T) {
	out, _ := outside(t)
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "mkdir", os.Mkdir(e.path("sub"), 0o755))
	sub := e.lookup(fuse.RootID, "sub")
	rel, err := filepath.Rel(e.path("sub"), out)
	must(t, "rel", err)
	long := strings.Repeat("n", 256)
	names := []struct {
		name string
		want syscall.Errno
	}{
		{"..", syscall.EINVAL},
		{".", syscall.EINVAL},
		{"", syscall.EINVAL},
		{"a/b", syscall.EINVAL},
		{"../" + filepath.Base(out), syscall.EINVAL},
		{rel + "/secret", syscall.EINVAL},
		{out + "/secret", syscall.EINVAL},
		{"/", syscall.EINVAL},
		{long, syscall.ENAMETOOLONG},
	}
	for _, parent := range []uint64{fuse.RootID, sub.NodeID} {
		for _, n := range names {
			_, err := c.Lookup(parent, n.name)
			wantErrno(t, "LOOKUP "+n.name, err, n.want)
			_, err = c.Mkdir(parent, n.name, 0o755)
			wantErrno(t, "MKDIR "+n.name, err, n.want)
			_, _, err = c.Create(parent, n.name, unix.O_RDWR, 0o644)
			wantErrno(t, "CREATE "+n.name, err, n.want)
			_, err = c.Symlink(parent, n.name, "x")
			wantErrno(t, "SYMLINK "+n.name, err, n.want)
			_, err = c.Mknod(parent, n.name, unix.S_IFIFO|0o644, 0)
			wantErrno(t, "MKNOD "+n.name, err, n.want)
			wantErrno(t, "UNLINK "+n.name, c.Unlink(parent, n.name), n.want)
			wantErrno(t, "RMDIR "+n.name, c.Rmdir(parent, n.name), n.want)
			wantErrno(t, "RENAME from "+n.name, c.Rename(parent, n.name, parent, "ok", 0), n.want)
			must(t, "create ok", os.WriteFile(e.path("ok"), nil, 0o644))
			wantErrno(t, "RENAME to "+n.name, c.Rename(fuse.RootID, "ok", parent, n.name, 0), n.want)
			ok := e.lookup(fuse.RootID, "ok")
			_, err = c.Link(ok.NodeID, parent, n.name)
			wantErrno(t, "LINK "+n.name, err, n.want)
		}
	}
	// A name without its NUL terminator.
	_, err = c.Raw(fuse.InHeader{Opcode: fuse.OpLookup, NodeID: fuse.RootID}, [][]byte{[]byte("sub")}, 4096)
	wantErrno(t, "LOOKUP without NUL", err, syscall.EINVAL)
	// An embedded NUL cuts the name: "sub\x00/../x" is "sub".
	en, err := c.Lookup(fuse.RootID, "sub\x00/../x")
	must(t, "LOOKUP with embedded NUL", err)
	if en.NodeID != sub.NodeID {
		t.Fatalf("embedded NUL gave node %d", en.NodeID)
	}
	checkSecret(t, out)
}

func TestHostSymlinksOutside(t *testing.T) {
	out, secretIno := outside(t)
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "symlink dir", os.Symlink(out, e.path("outdir")))
	must(t, "symlink file", os.Symlink(filepath.Join(out, "secret"), e.path("outfile")))
	must(t, "symlink rel", os.Symlink("../"+filepath.Base(out), e.path("reldir")))
	must(t, "symlink root", os.Symlink("/", e.path("root")))

	for _, name := range []string{"outdir", "reldir", "root"} {
		l := e.lookup(fuse.RootID, name)
		if l.Attr.Mode&unix.S_IFMT != unix.S_IFLNK {
			t.Fatalf("%s: mode %o, want a symlink", name, l.Attr.Mode)
		}
		target, err := c.Readlink(l.NodeID)
		must(t, "READLINK", err)
		want, _ := os.Readlink(e.path(name))
		if target != want {
			t.Fatalf("READLINK %s = %q, want %q", name, target, want)
		}
		_, err = c.Lookup(l.NodeID, "secret")
		wantErrno(t, "LOOKUP through "+name, err, syscall.ENOTDIR)
		_, err = c.Lookup(l.NodeID, "etc")
		wantErrno(t, "LOOKUP etc through "+name, err, syscall.ENOTDIR)
		_, err = c.Opendir(l.NodeID)
		wantErrno(t, "OPENDIR "+name, err, syscall.ENOTDIR)
		_, _, err = c.Create(l.NodeID, "new", unix.O_RDWR, 0o644)
		wantErrno(t, "CREATE in "+name, err, syscall.ENOTDIR)
		_, err = c.Mkdir(l.NodeID, "new", 0o755)
		wantErrno(t, "MKDIR in "+name, err, syscall.ENOTDIR)
	}
	f := e.lookup(fuse.RootID, "outfile")
	if f.Attr.Ino == secretIno {
		t.Fatal("LOOKUP followed the symlink")
	}
	_, err := c.Open(f.NodeID, unix.O_RDWR|unix.O_TRUNC)
	wantErrno(t, "OPEN symlink", err, syscall.ENXIO)
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o777})
	wantErrno(t, "chmod symlink", err, syscall.EOPNOTSUPP)
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: 0})
	wantErrno(t, "truncate symlink", err, syscall.EINVAL)
	err = c.Setxattr(f.NodeID, "user.x", []byte("1"), 0)
	wantErrno(t, "SETXATTR symlink", err, syscall.EPERM)
	_, err = c.Getxattr(f.NodeID, "user.x", 10)
	wantErrno(t, "GETXATTR symlink", err, syscall.ENODATA)
	// Times and ownership change the link itself, not the target.
	var before unix.Stat_t
	must(t, "stat", unix.Stat(filepath.Join(out, "secret"), &before))
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMtime | fuse.FattrAtime, Mtime: 5, Atime: 5})
	must(t, "utimens symlink", err)
	if os.Geteuid() == 0 {
		_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrUID, UID: 4321})
		must(t, "chown symlink", err)
	}
	var after unix.Stat_t
	must(t, "stat", unix.Stat(filepath.Join(out, "secret"), &after))
	if after.Mtim != before.Mtim || after.Uid != before.Uid {
		t.Fatal("SETATTR on a symlink reached its target")
	}
	// A hard link to the symlink links the symlink.
	l2, err := c.Link(f.NodeID, fuse.RootID, "outfile2")
	must(t, "LINK symlink", err)
	if l2.Attr.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Fatal("LINK of a symlink made something else")
	}
	checkSecret(t, out)
}

func TestSwapBetweenRequests(t *testing.T) {
	out, secretIno := outside(t)
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "mkdir", os.Mkdir(e.path("d"), 0o755))
	must(t, "write", os.WriteFile(e.path("d/f"), []byte("inside"), 0o644))
	d := e.lookup(fuse.RootID, "d")
	f := e.lookup(d.NodeID, "f")

	// The directory is replaced by a symlink to the outside.
	must(t, "rename", os.Rename(e.path("d"), e.path("d.old")))
	must(t, "symlink", os.Symlink(out, e.path("d")))
	_, err := c.Lookup(d.NodeID, "secret")
	wantErrno(t, "LOOKUP in the moved directory", err, syscall.ENOENT)
	nd := e.lookup(fuse.RootID, "d")
	if nd.Attr.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Fatal("new d is not seen as a symlink")
	}
	_, err = c.Lookup(nd.NodeID, "secret")
	wantErrno(t, "LOOKUP through the swapped-in symlink", err, syscall.ENOTDIR)
	// The old node still names the moved directory, inside the share.
	fh, err := c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN file in moved dir", err)
	data, err := c.Read(f.NodeID, fh, 0, 100)
	must(t, "READ", err)
	if string(data) != "inside" {
		t.Fatalf("read %q", data)
	}
	must(t, "RELEASE", c.Release(f.NodeID, fh, false))

	// The file's name is replaced by a symlink to the outside file: a
	// reopen must not follow it.
	must(t, "rename file", os.Rename(e.path("d.old/f"), e.path("d.old/f.old")))
	must(t, "symlink file", os.Symlink(filepath.Join(out, "secret"), e.path("d.old/f")))
	_, err = c.Open(f.NodeID, unix.O_RDWR|unix.O_TRUNC)
	wantErrno(t, "OPEN through swapped name", err, syscall.ESTALE)
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: 0})
	wantErrno(t, "truncate through swapped name", err, syscall.ESTALE)
	err = c.Setxattr(f.NodeID, "user.x", []byte("1"), 0)
	wantErrno(t, "SETXATTR through swapped name", err, syscall.ESTALE)
	_, err = c.Link(f.NodeID, fuse.RootID, "grab")
	if err == nil {
		g := e.lookup(fuse.RootID, "grab")
		if g.Attr.Ino == secretIno {
			t.Fatal("LINK reached the outside file")
		}
	}
	if err == nil {
		must(t, "UNLINK grab", c.Unlink(fuse.RootID, "grab"))
	}
	// Replaced by another regular file inside: a different inode.
	must(t, "remove", os.Remove(e.path("d.old/f")))
	must(t, "write other", os.WriteFile(e.path("d.old/f"), []byte("other"), 0o644))
	_, err = c.Open(f.NodeID, unix.O_RDONLY)
	wantErrno(t, "OPEN of a replaced file", err, syscall.ESTALE)
	// GETATTR still works on the O_PATH fd: it is the original inode.
	a, err := c.Getattr(f.NodeID)
	must(t, "GETATTR", err)
	if a.Ino != f.Attr.Ino {
		t.Fatal("GETATTR changed inode")
	}
	checkSecret(t, out)
}

// TestRenameRace has the host flip a directory and a symlink to the
// outside under the same name while the guest looks names up through it.
func TestRenameRace(t *testing.T) {
	out, secretIno := outside(t)
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "mkdir", os.Mkdir(e.path("real"), 0o755))
	must(t, "write", os.WriteFile(e.path("real/secret"), []byte("inside"), 0o644))
	must(t, "symlink", os.Symlink(out, e.path("link")))
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			// Swap "x" between the directory and the symlink atomically.
			if i%2 == 0 {
				unix.Renameat2(unix.AT_FDCWD, e.path("real"), unix.AT_FDCWD, e.path("x"), unix.RENAME_EXCHANGE)
				os.Rename(e.path("real"), e.path("x"))
			} else {
				os.Rename(e.path("x"), e.path("real"))
				unix.Renameat2(unix.AT_FDCWD, e.path("link"), unix.AT_FDCWD, e.path("x"), unix.RENAME_NOREPLACE)
				os.Rename(e.path("x"), e.path("link"))
			}
		}
	}()
	seenDir := 0
	for i := 0; i < 3000; i++ {
		x, err := c.Lookup(fuse.RootID, "x")
		if err != nil {
			continue
		}
		s, err := c.Lookup(x.NodeID, "secret")
		if err == nil {
			if s.Attr.Ino == secretIno {
				stop.Store(true)
				wg.Wait()
				t.Fatal("a lookup reached the file outside the share")
			}
			seenDir++
			if fh, err := c.Open(s.NodeID, unix.O_RDWR); err == nil {
				c.Write(s.NodeID, fh, 0, []byte("INSIDE"))
				c.Release(s.NodeID, fh, false)
			}
			c.Forget(s.NodeID, 1)
		}
		c.Forget(x.NodeID, 1)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d lookups went through the directory", seenDir)
	checkSecret(t, out)
}

func TestHostileNumbers(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	f, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	_, err = c.Write(f.NodeID, fh, 0, []byte("0123456789"))
	must(t, "WRITE", err)
	dh, err := c.Opendir(fuse.RootID)
	must(t, "OPENDIR", err)

	_, err = c.Read(f.NodeID, fh, 1<<63, 10)
	wantErrno(t, "READ offset 2^63", err, syscall.EINVAL)
	_, err = c.Read(f.NodeID, fh, math.MaxUint64, 10)
	wantErrno(t, "READ offset -1", err, syscall.EINVAL)
	_, err = c.Read(f.NodeID, fh, math.MaxInt64-5, 10)
	wantErrno(t, "READ offset+size overflow", err, syscall.EINVAL)
	// A huge size with a small reply buffer: clamped to the buffer.
	out, err := c.Call(fuse.OpRead, f.NodeID, 16+4, func() []byte {
		b := make([]byte, fuse.ReadInSize)
		r := fuse.ReadIn{Fh: fh, Size: math.MaxUint32}
		r.Encode(b)
		return b
	}())
	must(t, "READ huge size", err)
	if string(out) != "0123" {
		t.Fatalf("clamped read %q", out)
	}
	_, err = c.Write(f.NodeID, fh, math.MaxInt64-5, []byte("0123456789"))
	wantErrno(t, "WRITE past 2^63", err, syscall.EFBIG)
	_, err = c.Write(f.NodeID, fh, 1<<63, []byte("x"))
	wantErrno(t, "WRITE offset 2^63", err, syscall.EFBIG)
	// The size field claims more data than the request carries.
	in := make([]byte, fuse.WriteInSize)
	w := fuse.ReadIn{Fh: fh, Size: 1 << 20}
	w.Encode(in)
	_, err = c.Raw(fuse.InHeader{Opcode: fuse.OpWrite, NodeID: f.NodeID}, [][]byte{in, []byte("abc")}, 4096)
	wantErrno(t, "WRITE size beyond data", err, syscall.EINVAL)
	err = c.Fallocate(f.NodeID, fh, math.MaxInt64, 10, 0)
	wantErrno(t, "FALLOCATE overflow", err, syscall.EFBIG)
	err = c.Fallocate(f.NodeID, fh, 0, math.MaxUint64, 0)
	wantErrno(t, "FALLOCATE huge length", err, syscall.EFBIG)
	err = c.Fallocate(f.NodeID, fh, 0, 10, 0x80000000)
	wantErrno(t, "FALLOCATE unknown mode", err, syscall.EOPNOTSUPP)
	_, err = c.Lseek(f.NodeID, fh, math.MaxUint64, unix.SEEK_SET)
	wantErrno(t, "LSEEK -1", err, syscall.EINVAL)
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: 1 << 63})
	wantErrno(t, "truncate to 2^63", err, syscall.EINVAL)
	_, err = c.Readdir(fuse.RootID, dh, 1<<63, 4096)
	wantErrno(t, "READDIR offset 2^63", err, syscall.EINVAL)
	// Huge readdir size: bounded by the reply buffer.
	rd := make([]byte, fuse.ReadInSize)
	ri := fuse.ReadIn{Fh: dh, Size: math.MaxUint32}
	ri.Encode(rd)
	out, err = c.Call(fuse.OpReaddir, fuse.RootID, 200, rd)
	must(t, "READDIR huge size", err)
	if ents, err := fuse.DecodeDirents(out); err != nil || len(ents) == 0 || len(out) > 200-fuse.OutHeaderSize {
		t.Fatalf("READDIR huge size: %d bytes, %v", len(out), err)
	}
	// SETXATTR value size beyond the payload, and beyond the limit.
	_, err = c.Call(fuse.OpSetxattr, f.NodeID, 4096, []byte{0xff, 0xff, 0, 0, 0, 0, 0, 0}, []byte("user.a\x00xyz"))
	wantErrno(t, "SETXATTR size beyond payload", err, syscall.EINVAL)
	_, err = c.Call(fuse.OpSetxattr, f.NodeID, 4096, []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, []byte("user.a\x00xyz"))
	wantErrno(t, "SETXATTR size 4G", err, syscall.E2BIG)
	v, err := c.Call(fuse.OpGetxattr, f.NodeID, 64, []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, []byte("user.none\x00"))
	if err == nil {
		t.Fatalf("GETXATTR of a missing name answered %q", v)
	}
	// Handles of the wrong kind or unknown.
	_, err = c.Read(f.NodeID, dh, 0, 10)
	wantErrno(t, "READ with a directory handle", err, syscall.EISDIR)
	_, err = c.Readdir(fuse.RootID, fh, 0, 4096)
	wantErrno(t, "READDIR with a file handle", err, syscall.ENOTDIR)
	_, err = c.Read(f.NodeID, 12345, 0, 10)
	wantErrno(t, "READ unknown handle", err, syscall.EBADF)
	wantErrno(t, "RELEASE unknown", c.Release(f.NodeID, 12345, false), syscall.EBADF)
	wantErrno(t, "RELEASEDIR of a file handle", c.Release(f.NodeID, fh, true), syscall.ENOTDIR)
	// Node ids that do not exist or are of the wrong type.
	_, err = c.Getattr(0)
	wantErrno(t, "GETATTR node 0", err, syscall.ESTALE)
	_, err = c.Getattr(math.MaxUint64)
	wantErrno(t, "GETATTR node -1", err, syscall.ESTALE)
	_, err = c.Lookup(f.NodeID, "x")
	wantErrno(t, "LOOKUP in a file", err, syscall.ENOTDIR)
	_, err = c.Readlink(f.NodeID)
	wantErrno(t, "READLINK of a file", err, syscall.EINVAL)
	_, err = c.Link(fuse.RootID, fuse.RootID, "rootlink")
	wantErrno(t, "LINK of a directory", err, syscall.EPERM)
	// Forgets that do not match anything.
	must(t, "FORGET unknown", c.Forget(1<<60, 1))
	must(t, "FORGET huge", c.Forget(f.NodeID, math.MaxUint64))
	must(t, "FORGET again", c.Forget(f.NodeID, 1))
	// BATCH_FORGET whose count lies: only the entries present count.
	args := make([]byte, 8+16)
	fuse.PutU32(args, 0, math.MaxUint32)
	fuse.PutU64(args, 8, 1<<50)
	fuse.PutU64(args, 16, 1)
	_, err = c.Call(fuse.OpBatchForget, 0, 0, args)
	must(t, "BATCH_FORGET lying count", err)
	// The file is still open, so its node lives on for I/O.
	got, err := c.Read(f.NodeID, fh, 0, 3)
	must(t, "READ after forgets", err)
	if string(got) != "012" {
		t.Fatalf("read %q", got)
	}
	must(t, "RELEASE", c.Release(f.NodeID, fh, false))
	must(t, "RELEASEDIR", c.Release(fuse.RootID, dh, true))
	if n, h := e.live(); n != 1 || h != 0 {
		t.Fatalf("%d nodes and %d handles left", n, h)
	}
	// Ids without a mapping.
	e2 := newEnv(t, 0, func(c *ServerConfig) { c.UIDMap = []IDMap{{Guest: 0, Host: uint32(os.Geteuid()), Count: 1}} })
	g, _, err := e2.c.Create(fuse.RootID, "g", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	_, err = e2.c.Setattr(g.NodeID, fuse.SetattrIn{Valid: fuse.FattrUID, UID: 77})
	wantErrno(t, "chown to an unmapped uid", err, syscall.EINVAL)
	if g.Attr.UID != 0 {
		t.Fatalf("owner seen as %d, want 0 (mapped from the host user)", g.Attr.UID)
	}
}

func TestMalformedMessages(t *testing.T) {
	e := newEnv(t, 3, nil)
	c := e.c
	hdr := func(op fuse.Opcode, l uint32, ext uint16) fuse.InHeader {
		return fuse.InHeader{Opcode: op, NodeID: fuse.RootID, Len: l, TotalExtLen: ext}
	}
	// Length fields that lie.
	_, err := c.Raw(hdr(fuse.OpGetattr, 10, 0), [][]byte{make([]byte, 16)}, 4096)
	wantErrno(t, "len < header", err, syscall.EINVAL)
	_, err = c.Raw(hdr(fuse.OpGetattr, 1<<20, 0), [][]byte{make([]byte, 16)}, 4096)
	wantErrno(t, "len > chain", err, syscall.EINVAL)
	_, err = c.Raw(hdr(fuse.OpGetattr, 56, 100), [][]byte{make([]byte, 16)}, 4096)
	wantErrno(t, "extensions beyond payload", err, syscall.EINVAL)
	// Unknown and unimplemented opcodes.
	for _, op := range []fuse.Opcode{0, 7, 19, fuse.OpGetlk, fuse.OpSetlk, fuse.OpSetlkw, fuse.OpBmap, fuse.OpIoctl,
		fuse.OpPoll, fuse.OpInterrupt, fuse.OpCopyFileRange, fuse.OpSetupMapping, fuse.OpRemoveMapping, fuse.OpTmpfile, 4096, math.MaxUint32} {
		_, err := c.Call(op, fuse.RootID, 4096, make([]byte, 64))
		wantErrno(t, op.String(), err, syscall.ENOSYS)
	}
	// Every opcode with every short argument length: an error or a well
	// formed reply, never a crash.
	for op := fuse.Opcode(1); op <= 52; op++ {
		if op == fuse.OpInit || op == fuse.OpDestroy {
			continue
		}
		for n := 0; n <= 96; n += 3 {
			args := make([]byte, n)
			for i := range args {
				args[i] = byte(i*7 + 1)
			}
			replyCap := 4096
			if op == fuse.OpForget || op == fuse.OpBatchForget {
				replyCap = 0
			}
			if _, err := c.Call(op, fuse.RootID, replyCap, args); err != nil && errors.Is(err, fuseclient.ErrBadReply) {
				t.Fatalf("%v with %d argument bytes: %v", op, n, err)
			}
		}
	}
	// No room for a reply header: nothing written, nothing executed.
	local := &fuseclient.Local{Handle: func(m *fuseclient.MemChain) uint32 { return e.s.Handle(m) }}
	for _, capacity := range []int{0, 8, 15} {
		h := make([]byte, fuse.InHeaderSize)
		ih := fuse.InHeader{Len: fuse.InHeaderSize + 4, Opcode: fuse.OpMkdir, NodeID: fuse.RootID, Unique: 9}
		ih.Encode(h)
		out, err := local.RoundTrip([][]byte{h, []byte{0xed, 1, 0, 0}, []byte{0, 0, 0, 0}, []byte("x\x00")}, capacity)
		if err != nil || len(out) != 0 {
			t.Fatalf("reply into %d bytes: %d bytes, %v", capacity, len(out), err)
		}
	}
	if _, err := os.Stat(e.path("x")); err == nil {
		t.Fatal("a request without reply space was executed")
	}
	// A request shorter than its header.
	local.RoundTrip([][]byte{make([]byte, 20)}, 4096)
	if e.s.Stats().Malformed.Load() == 0 {
		t.Fatal("malformed requests not counted")
	}
	if _, err := c.Getattr(fuse.RootID); err != nil {
		t.Fatalf("server unusable after malformed messages: %v", err)
	}
}
