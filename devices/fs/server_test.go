package fs

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

var splits = []int{0, 7, 4096}

func TestInitNegotiation(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Open(dir)
	must(t, "open", err)
	defer f.Close()
	s, err := NewServer(ServerConfig{Dir: f, MaxWrite: 256 << 10})
	must(t, "NewServer", err)
	defer s.Close()
	c := fuseclient.New(&fuseclient.Local{Handle: func(c *fuseclient.MemChain) uint32 { return s.Handle(c) }})

	// Nothing but INIT before INIT.
	_, err = c.Getattr(fuse.RootID)
	wantErrno(t, "GETATTR before INIT", err, syscall.EIO)

	tests := []struct {
		name      string
		major     uint32
		minor     uint32
		flags     uint32
		wantErr   syscall.Errno
		wantLen   int
		wantFlags uint32
	}{
		{"linux 6.1", 7, 37, fuseclient.LinuxInitFlags, 0, fuse.InitOutSize, supportedInit},
		{"no readdirplus offered", 7, 37, fuse.InitAsyncRead | fuse.InitMaxPages, 0, fuse.InitOutSize, fuse.InitAsyncRead | fuse.InitMaxPages},
		{"old minor", 7, 22, fuse.InitAsyncRead, 0, fuse.InitOutCompat22, fuse.InitAsyncRead},
		{"newer major", 8, 0, 0, 0, 8, 0},
		{"older major", 6, 0, 0, syscall.EPROTO, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := make([]byte, fuse.InitInSize)
			fuse.PutU32(in, 0, tc.major)
			fuse.PutU32(in, 4, tc.minor)
			fuse.PutU32(in, 8, 65536)
			fuse.PutU32(in, 12, tc.flags)
			out, err := c.Call(fuse.OpInit, 0, 4096, in)
			if tc.wantErr != 0 {
				wantErrno(t, "INIT", err, tc.wantErr)
				return
			}
			must(t, "INIT", err)
			if len(out) != tc.wantLen {
				t.Fatalf("reply of %d bytes, want %d", len(out), tc.wantLen)
			}
			if tc.major != 7 {
				if m, _ := fuse.U32(out, 0); m != 7 {
					t.Fatalf("major %d, want 7", m)
				}
				return
			}
			o, err := fuse.DecodeInitOut(out)
			must(t, "decode", err)
			if o.Major != 7 || o.Minor != min(tc.minor, fuse.KernelMinorVersion) && o.Minor != fuse.KernelMinorVersion {
				t.Fatalf("version %d.%d", o.Major, o.Minor)
			}
			if uint32(o.Flags) != tc.wantFlags {
				t.Fatalf("flags %#x, want %#x", o.Flags, tc.wantFlags)
			}
			if o.MaxWrite != 256<<10 {
				t.Fatalf("max_write %d", o.MaxWrite)
			}
			if tc.wantLen == fuse.InitOutSize && (o.MaxPages != 64 || o.MapAlignment != 0 || o.TimeGran != 1) {
				t.Fatalf("max_pages %d map_alignment %d time_gran %d", o.MaxPages, o.MapAlignment, o.TimeGran)
			}
			if o.MaxReadahead != 65536 {
				t.Fatalf("max_readahead %d", o.MaxReadahead)
			}
		})
	}
	// After a good INIT, DESTROY ends the session.
	_, err = c.Init(fuseclient.LinuxInitFlags)
	must(t, "INIT", err)
	_, err = c.Getattr(fuse.RootID)
	must(t, "GETATTR", err)
	must(t, "DESTROY", c.Destroy())
	_, err = c.Getattr(fuse.RootID)
	wantErrno(t, "GETATTR after DESTROY", err, syscall.EIO)
}

func TestFileLifecycle(t *testing.T) {
	for _, split := range splits {
		t.Run(fmt.Sprintf("split%d", split), func(t *testing.T) {
			e := newEnv(t, split, nil)
			c := e.c
			d, err := c.Mkdir(fuse.RootID, "d", 0o750)
			must(t, "MKDIR", err)
			if d.Attr.Mode != unix.S_IFDIR|0o750 {
				t.Fatalf("mkdir mode %o", d.Attr.Mode)
			}
			f, fh, err := c.Create(d.NodeID, "f", unix.O_RDWR|unix.O_CREAT, 0o640)
			must(t, "CREATE", err)
			data := make([]byte, 300000)
			rand.New(rand.NewSource(1)).Read(data)
			n, err := c.Write(f.NodeID, fh, 0, data)
			must(t, "WRITE", err)
			if int(n) != len(data) {
				t.Fatalf("wrote %d", n)
			}
			got, err := c.Read(f.NodeID, fh, 0, uint32(len(data)+100))
			must(t, "READ", err)
			if !bytes.Equal(got, data) {
				t.Fatalf("read back %d bytes, differ", len(got))
			}
			got, err = c.Read(f.NodeID, fh, 299990, 100)
			must(t, "READ tail", err)
			if !bytes.Equal(got, data[299990:]) {
				t.Fatalf("tail read %d bytes", len(got))
			}
			got, err = c.Read(f.NodeID, fh, 1<<40, 100)
			must(t, "READ past EOF", err)
			if len(got) != 0 {
				t.Fatalf("read past EOF gave %d bytes", len(got))
			}
			host, err := os.ReadFile(e.path("d/f"))
			must(t, "host read", err)
			if !bytes.Equal(host, data) {
				t.Fatal("host sees different data")
			}
			st, err := os.Lstat(e.path("d/f"))
			must(t, "lstat", err)
			if st.Mode().Perm() != 0o640 {
				t.Fatalf("host mode %v", st.Mode())
			}
			// Append through an O_APPEND handle.
			must(t, "RELEASE", c.Release(f.NodeID, fh, false))
			fh, err = c.Open(f.NodeID, unix.O_WRONLY|unix.O_APPEND)
			must(t, "OPEN append", err)
			_, err = c.Write(f.NodeID, fh, 0, []byte("tail"))
			must(t, "append", err)
			must(t, "FLUSH", c.Flush(f.NodeID, fh))
			must(t, "FSYNC", c.Fsync(f.NodeID, fh, false, false))
			must(t, "FDATASYNC", c.Fsync(f.NodeID, fh, true, false))
			must(t, "RELEASE", c.Release(f.NodeID, fh, false))
			host, _ = os.ReadFile(e.path("d/f"))
			if !bytes.HasSuffix(host, []byte("tail")) || len(host) != len(data)+4 {
				t.Fatalf("append: host file %d bytes", len(host))
			}
			// O_TRUNC on open.
			fh, err = c.Open(f.NodeID, unix.O_WRONLY|unix.O_TRUNC)
			must(t, "OPEN trunc", err)
			must(t, "RELEASE", c.Release(f.NodeID, fh, false))
			if st, _ := os.Stat(e.path("d/f")); st.Size() != 0 {
				t.Fatalf("O_TRUNC left %d bytes", st.Size())
			}

			// SETATTR: chmod, truncate (no handle), times, chown.
			a, err := c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o604})
			must(t, "chmod", err)
			if a.Mode&07777 != 0o604 {
				t.Fatalf("chmod gave %o", a.Mode)
			}
			a, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: 12345})
			must(t, "truncate", err)
			if a.Size != 12345 {
				t.Fatalf("truncate gave %d", a.Size)
			}
			a, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrAtime | fuse.FattrMtime, Atime: 1000, Atimensec: 5, Mtime: 2000, Mtimensec: 7})
			must(t, "utimens", err)
			if a.Atime != 1000 || a.Mtime != 2000 || a.Mtimensec != 7 {
				t.Fatalf("times %d.%d %d.%d", a.Atime, a.Atimensec, a.Mtime, a.Mtimensec)
			}
			_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMtime, Mtime: 1, Mtimensec: 1e9})
			wantErrno(t, "bad nsec", err, syscall.EINVAL)
			if os.Geteuid() == 0 {
				a, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrUID | fuse.FattrGID, UID: 1234, GID: 5678})
				must(t, "chown", err)
				if a.UID != 1234 || a.GID != 5678 {
					t.Fatalf("chown gave %d:%d", a.UID, a.GID)
				}
				var hs unix.Stat_t
				must(t, "host stat", unix.Lstat(e.path("d/f"), &hs))
				if hs.Uid != 1234 || hs.Gid != 5678 {
					t.Fatalf("host owner %d:%d", hs.Uid, hs.Gid)
				}
			}

			// Hard link, symlink, readlink.
			l, err := c.Link(f.NodeID, fuse.RootID, "hard")
			must(t, "LINK", err)
			if l.NodeID != f.NodeID || l.Attr.Nlink != 2 {
				t.Fatalf("link: node %d (want %d) nlink %d", l.NodeID, f.NodeID, l.Attr.Nlink)
			}
			sl, err := c.Symlink(fuse.RootID, "sym", "d/f")
			must(t, "SYMLINK", err)
			if sl.Attr.Mode&unix.S_IFMT != unix.S_IFLNK {
				t.Fatalf("symlink mode %o", sl.Attr.Mode)
			}
			target, err := c.Readlink(sl.NodeID)
			must(t, "READLINK", err)
			if target != "d/f" {
				t.Fatalf("readlink %q", target)
			}
			if ht, _ := os.Readlink(e.path("sym")); ht != "d/f" {
				t.Fatalf("host readlink %q", ht)
			}

			// Rename, then unlink the original name: the node must stay
			// usable through the hard link.
			must(t, "RENAME", c.Rename(d.NodeID, "f", d.NodeID, "g", 0))
			if _, err := os.Stat(e.path("d/g")); err != nil {
				t.Fatal("rename not visible on host")
			}
			must(t, "UNLINK", c.Unlink(d.NodeID, "g"))
			fh, err = c.Open(f.NodeID, unix.O_RDONLY)
			must(t, "OPEN via remaining hard link", err)
			must(t, "RELEASE", c.Release(f.NodeID, fh, false))
			err = c.Rename(fuse.RootID, "hard", fuse.RootID, "sym", unix.RENAME_NOREPLACE)
			wantErrno(t, "RENAME_NOREPLACE", err, syscall.EEXIST)
			must(t, "RENAME_EXCHANGE", c.Rename(fuse.RootID, "hard", fuse.RootID, "sym", unix.RENAME_EXCHANGE))
			if fi, _ := os.Lstat(e.path("hard")); fi.Mode()&os.ModeSymlink == 0 {
				t.Fatal("exchange did not swap")
			}
			_, err = c.Open(f.NodeID, unix.O_RDONLY)
			must(t, "OPEN after exchange", err)

			err = c.Rmdir(fuse.RootID, "d")
			must(t, "RMDIR", err)
			err = c.Rmdir(fuse.RootID, "d")
			wantErrno(t, "RMDIR again", err, syscall.ENOENT)
			_, err = c.Lookup(fuse.RootID, "d")
			wantErrno(t, "LOOKUP removed", err, syscall.ENOENT)

			sf, err := c.Statfs(fuse.RootID)
			must(t, "STATFS", err)
			var hs unix.Statfs_t
			must(t, "host statfs", unix.Statfs(e.dir, &hs))
			if sf.Bsize != uint32(hs.Bsize) || sf.Blocks != hs.Blocks || sf.Namelen != uint32(hs.Namelen) {
				t.Fatalf("statfs %+v vs host %+v", sf, hs)
			}
		})
	}
}

func TestMknodAndSpecialFiles(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	fifo, err := c.Mknod(fuse.RootID, "fifo", unix.S_IFIFO|0o600, 0)
	must(t, "MKNOD fifo", err)
	if fifo.Attr.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Fatalf("fifo mode %o", fifo.Attr.Mode)
	}
	// The host never opens a FIFO for the guest.
	_, err = c.Open(fifo.NodeID, unix.O_RDONLY)
	wantErrno(t, "OPEN fifo", err, syscall.ENXIO)
	_, err = c.Mknod(fuse.RootID, "null", unix.S_IFCHR|0o666, 1<<8|3)
	wantErrno(t, "MKNOD char device", err, syscall.EPERM)
	_, err = c.Mknod(fuse.RootID, "blk", unix.S_IFBLK|0o666, 8<<8)
	wantErrno(t, "MKNOD block device", err, syscall.EPERM)
	if os.Geteuid() == 0 {
		wh, err := c.Mknod(fuse.RootID, "whiteout", unix.S_IFCHR, 0)
		must(t, "MKNOD whiteout", err)
		if wh.Attr.Rdev != 0 {
			t.Fatalf("whiteout rdev %#x", wh.Attr.Rdev)
		}
	}
	_, err = c.Mknod(fuse.RootID, "dir", unix.S_IFDIR|0o755, 0)
	wantErrno(t, "MKNOD dir", err, syscall.EINVAL)
}

func TestEncodeDev(t *testing.T) {
	for _, d := range []struct{ maj, mnr uint32 }{{1, 3}, {8, 0}, {259, 65536}, {4095, 1<<20 - 1}} {
		dev := unix.Mkdev(d.maj, d.mnr)
		if got := decodeDev(encodeDev(dev)); got != dev {
			t.Errorf("%d:%d round trip gave %d:%d", d.maj, d.mnr, unix.Major(got), unix.Minor(got))
		}
	}
	// The kernel's new_encode_dev(MKDEV(1, 3)) is 0x103.
	if encodeDev(unix.Mkdev(1, 3)) != 0x103 {
		t.Errorf("encodeDev(1:3) = %#x", encodeDev(unix.Mkdev(1, 3)))
	}
}

// readAll lists a directory the way the kernel does: READDIR(PLUS) calls
// with the offset of the last entry seen, size bytes each.
func readAll(t *testing.T, c *fuseclient.Client, node uint64, plus bool, size uint32) (names []string, entries []fuse.DirentPlus, calls int) {
	t.Helper()
	fh, err := c.Opendir(node)
	must(t, "OPENDIR", err)
	defer c.Release(node, fh, true)
	off := uint64(0)
	for {
		calls++
		var ds []fuse.DirentPlus
		if plus {
			ds, err = c.Readdirplus(node, fh, off, size)
		} else {
			var d []fuse.Dirent
			d, err = c.Readdir(node, fh, off, size)
			for _, x := range d {
				ds = append(ds, fuse.DirentPlus{Dirent: x})
			}
		}
		must(t, "READDIR", err)
		if len(ds) == 0 {
			return
		}
		for _, d := range ds {
			names = append(names, d.Name)
			entries = append(entries, d)
			off = d.Off
		}
	}
}

func TestReaddir500(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	d, err := c.Mkdir(fuse.RootID, "many", 0o755)
	must(t, "MKDIR", err)
	want := []string{".", ".."}
	for i := 0; i < 500; i++ {
		name := fmt.Sprintf("file-%03d-%s", i, string(bytes.Repeat([]byte{'x'}, i%40)))
		en, fh, err := c.Create(d.NodeID, name, unix.O_WRONLY, 0o644)
		must(t, "CREATE", err)
		must(t, "RELEASE", c.Release(en.NodeID, fh, false))
		must(t, "FORGET", c.Forget(en.NodeID, 1))
		want = append(want, name)
	}
	sort.Strings(want)
	for _, plus := range []bool{false, true} {
		nodesBefore, _ := e.live()
		names, entries, calls := readAll(t, c, d.NodeID, plus, 4096)
		sort.Strings(names)
		if fmt.Sprint(names) != fmt.Sprint(want) {
			t.Fatalf("plus=%v: listed %d names, want %d", plus, len(names), len(want))
		}
		if calls > 60 {
			t.Errorf("plus=%v: %d READDIR calls for 502 entries", plus, calls)
		}
		if !plus {
			continue
		}
		var forget [][2]uint64
		for _, en := range entries {
			if en.Name == "." || en.Name == ".." {
				if en.Entry.NodeID != 0 {
					t.Fatalf("%s has node id %d (the kernel would never forget it)", en.Name, en.Entry.NodeID)
				}
				continue
			}
			if en.Entry.NodeID == 0 || en.Entry.Attr.Mode != unix.S_IFREG|0o644 || en.Entry.Attr.Ino != en.Ino {
				t.Fatalf("%s: entry %+v", en.Name, en.Entry)
			}
			forget = append(forget, [2]uint64{en.Entry.NodeID, 1})
		}
		nodesAfter, _ := e.live()
		if nodesAfter != nodesBefore+500 {
			t.Fatalf("READDIRPLUS: %d nodes, want %d", nodesAfter, nodesBefore+500)
		}
		must(t, "BATCH_FORGET", c.BatchForget(forget...))
		if n, _ := e.live(); n != nodesBefore {
			t.Fatalf("after BATCH_FORGET: %d nodes, want %d", n, nodesBefore)
		}
	}
	// A restart from offset 0 and a resume from the middle agree.
	fh, err := c.Opendir(d.NodeID)
	must(t, "OPENDIR", err)
	first, err := c.Readdir(d.NodeID, fh, 0, 4096)
	must(t, "READDIR", err)
	again, err := c.Readdir(d.NodeID, fh, 0, 4096)
	must(t, "READDIR rewind", err)
	if fmt.Sprint(first) != fmt.Sprint(again) {
		t.Fatal("rewind lists differently")
	}
	mid := first[len(first)/2]
	resumed, err := c.Readdir(d.NodeID, fh, mid.Off, 4096)
	must(t, "READDIR seek", err)
	if len(resumed) == 0 || resumed[0].Name != first[len(first)/2+1].Name {
		t.Fatalf("resume at %d gave %v", mid.Off, resumed[:1])
	}
	must(t, "RELEASEDIR", c.Release(d.NodeID, fh, true))
}

func TestForgetAccounting(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "mkdir", os.MkdirAll(e.path("a/b/c"), 0o755))
	must(t, "write", os.WriteFile(e.path("a/b/c/f"), []byte("x"), 0o644))
	must(t, "link", os.Link(e.path("a/b/c/f"), e.path("a/f2")))
	a := e.lookup(fuse.RootID, "a")
	b := e.lookup(a.NodeID, "b")
	cc := e.lookup(b.NodeID, "c")
	f := e.lookup(cc.NodeID, "f")
	f2 := e.lookup(a.NodeID, "f2")
	if f.NodeID != f2.NodeID {
		t.Fatalf("hard links got nodes %d and %d", f.NodeID, f2.NodeID)
	}
	f3 := e.lookup(cc.NodeID, "f")
	if f3.NodeID != f.NodeID {
		t.Fatal("second lookup gave a new node")
	}
	if n, _ := e.live(); n != 5 {
		t.Fatalf("%d nodes, want 5", n)
	}
	// Forgetting directories first: the file's names keep the directories
	// it is named in (a and c), and their names their parents (b).
	must(t, "forget", c.Forget(a.NodeID, 1))
	must(t, "forget", c.Forget(b.NodeID, 1))
	must(t, "forget", c.Forget(cc.NodeID, 1))
	if n, _ := e.live(); n != 5 {
		t.Fatalf("%d nodes with the file still held, want 5", n)
	}
	fh, err := c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)
	must(t, "forget", c.Forget(f.NodeID, 3))
	if n, _ := e.live(); n != 5 {
		t.Fatalf("%d nodes with a handle open, want 5", n)
	}
	data, err := c.Read(f.NodeID, fh, 0, 10)
	must(t, "READ", err)
	if string(data) != "x" {
		t.Fatalf("read %q", data)
	}
	must(t, "RELEASE", c.Release(f.NodeID, fh, false))
	if n, h := e.live(); n != 1 || h != 0 {
		t.Fatalf("%d nodes, %d handles at the end, want 1, 0", n, h)
	}
	// Unknown and over-counted forgets are harmless.
	must(t, "forget unknown", c.Forget(999999, 1))
	must(t, "forget root", c.Forget(fuse.RootID, 1<<40))
	if _, err := c.Getattr(fuse.RootID); err != nil {
		t.Fatalf("root gone after FORGET: %v", err)
	}
	_, err = c.Getattr(f.NodeID)
	wantErrno(t, "GETATTR forgotten", err, syscall.ESTALE)
}

func TestReadOnly(t *testing.T) {
	dir := t.TempDir()
	must(t, "write", os.WriteFile(dir+"/f", []byte("hello"), 0o644))
	must(t, "mkdir", os.Mkdir(dir+"/d", 0o755))
	e := newEnvDir(t, dir, 0, func(c *ServerConfig) { c.ReadOnly = true })
	c := e.c
	f := e.lookup(fuse.RootID, "f")
	d := e.lookup(fuse.RootID, "d")
	fh, err := c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN ro", err)
	data, err := c.Read(f.NodeID, fh, 0, 100)
	must(t, "READ", err)
	if string(data) != "hello" {
		t.Fatalf("read %q", data)
	}
	_, err = c.Write(f.NodeID, fh, 0, []byte("x"))
	wantErrno(t, "WRITE", err, syscall.EROFS)
	mods := []struct {
		name string
		do   func() error
	}{
		{"OPEN rw", func() error { _, err := c.Open(f.NodeID, unix.O_RDWR); return err }},
		{"OPEN trunc", func() error { _, err := c.Open(f.NodeID, unix.O_RDONLY|unix.O_TRUNC); return err }},
		{"CREATE", func() error { _, _, err := c.Create(fuse.RootID, "n", unix.O_WRONLY, 0o644); return err }},
		{"MKDIR", func() error { _, err := c.Mkdir(fuse.RootID, "n", 0o755); return err }},
		{"MKNOD", func() error { _, err := c.Mknod(fuse.RootID, "n", unix.S_IFIFO|0o644, 0); return err }},
		{"SYMLINK", func() error { _, err := c.Symlink(fuse.RootID, "n", "f"); return err }},
		{"LINK", func() error { _, err := c.Link(f.NodeID, fuse.RootID, "n"); return err }},
		{"UNLINK", func() error { return c.Unlink(fuse.RootID, "f") }},
		{"RMDIR", func() error { return c.Rmdir(fuse.RootID, "d") }},
		{"RENAME", func() error { return c.Rename(fuse.RootID, "f", fuse.RootID, "g", 0) }},
		{"RENAME2", func() error { return c.Rename(fuse.RootID, "f", fuse.RootID, "g", unix.RENAME_NOREPLACE) }},
		{"SETATTR mode", func() error {
			_, err := c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o777})
			return err
		}},
		{"SETATTR size", func() error { _, err := c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize}); return err }},
		{"SETXATTR", func() error { return c.Setxattr(f.NodeID, "user.x", []byte("1"), 0) }},
		{"REMOVEXATTR", func() error { return c.Removexattr(f.NodeID, "user.x") }},
		{"FALLOCATE", func() error { return c.Fallocate(f.NodeID, fh, 0, 100, 0) }},
		{"ACCESS W_OK", func() error { return c.Access(d.NodeID, unix.W_OK) }},
	}
	for _, m := range mods {
		wantErrno(t, m.name, m.do(), syscall.EROFS)
	}
	if data, _ := os.ReadFile(dir + "/f"); string(data) != "hello" {
		t.Fatalf("host file changed: %q", data)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("host dir has %d entries", len(ents))
	}
	must(t, "ACCESS R_OK", c.Access(d.NodeID, unix.R_OK))
	// A FIFO of a read-only share stays writable, as on a read-only
	// mount: writing one changes nothing in the file system (it was
	// EROFS, like a regular file).
	must(t, "mkfifo", unix.Mkfifo(dir+"/p", 0o666))
	p := e.lookup(fuse.RootID, "p")
	must(t, "ACCESS W_OK of a FIFO", c.Access(p.NodeID, unix.W_OK))
	wantErrno(t, "ACCESS W_OK of a file", c.Access(f.NodeID, unix.W_OK), syscall.EROFS)
}

func TestXattr(t *testing.T) {
	e := newEnv(t, 5, nil)
	c := e.c
	f, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	must(t, "RELEASE", c.Release(f.NodeID, fh, false))
	if err := c.Setxattr(f.NodeID, "user.test", []byte("value"), 0); err != nil {
		if errno, ok := err.(syscall.Errno); ok && errno == syscall.EOPNOTSUPP {
			t.Skip("host temp directory has no user xattrs (tmpfs without user_xattr)")
		}
		t.Fatalf("SETXATTR: %v", err)
	}
	size, err := c.Getxattr(f.NodeID, "user.test", 0)
	must(t, "GETXATTR size", err)
	if n, _ := fuse.U32(size, 0); n != 5 {
		t.Fatalf("size %d", n)
	}
	v, err := c.Getxattr(f.NodeID, "user.test", 64)
	must(t, "GETXATTR", err)
	if string(v) != "value" {
		t.Fatalf("value %q", v)
	}
	_, err = c.Getxattr(f.NodeID, "user.test", 2)
	wantErrno(t, "GETXATTR small", err, syscall.ERANGE)
	_, err = c.Getxattr(f.NodeID, "user.none", 64)
	wantErrno(t, "GETXATTR missing", err, syscall.ENODATA)
	list, err := c.Listxattr(f.NodeID, 1024)
	must(t, "LISTXATTR", err)
	if !bytes.Contains(list, []byte("user.test\x00")) {
		t.Fatalf("list %q", list)
	}
	err = c.Setxattr(f.NodeID, "user.test", []byte("v2"), unix.XATTR_CREATE)
	wantErrno(t, "XATTR_CREATE existing", err, syscall.EEXIST)
	host := make([]byte, 16)
	n, err := unix.Getxattr(e.path("f"), "user.test", host)
	must(t, "host getxattr", err)
	if string(host[:n]) != "value" {
		t.Fatalf("host value %q", host[:n])
	}
	must(t, "REMOVEXATTR", c.Removexattr(f.NodeID, "user.test"))
	_, err = c.Getxattr(f.NodeID, "user.test", 64)
	wantErrno(t, "GETXATTR removed", err, syscall.ENODATA)
	// Directories too.
	must(t, "SETXATTR dir", c.Setxattr(fuse.RootID, "user.d", []byte("1"), 0))
	// Symlinks have none as far as the guest can tell.
	sl, err := c.Symlink(fuse.RootID, "l", "f")
	must(t, "SYMLINK", err)
	_, err = c.Getxattr(sl.NodeID, "user.x", 10)
	wantErrno(t, "GETXATTR symlink", err, syscall.ENODATA)
}

func TestFallocateLseek(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	f, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	must(t, "FALLOCATE", c.Fallocate(f.NodeID, fh, 0, 1<<20, 0))
	a, err := c.Getattr(f.NodeID)
	must(t, "GETATTR", err)
	if a.Size != 1<<20 {
		t.Fatalf("size %d", a.Size)
	}
	_, err = c.Write(f.NodeID, fh, 4<<20, []byte("data"))
	must(t, "WRITE", err)
	off, err := c.Lseek(f.NodeID, fh, 0, unix.SEEK_END)
	must(t, "LSEEK end", err)
	if off != 4<<20+4 {
		t.Fatalf("SEEK_END %d", off)
	}
	off, err = c.Lseek(f.NodeID, fh, 2<<20, unix.SEEK_DATA)
	must(t, "LSEEK data", err)
	if off < 2<<20 || off > 4<<20 {
		t.Fatalf("SEEK_DATA %d", off)
	}
	_, err = c.Lseek(f.NodeID, fh, 0, 99)
	wantErrno(t, "LSEEK bad whence", err, syscall.EINVAL)
}

// TestFewFileDescriptors runs with a budget of 40 fds (30 for nodes): idle
// nodes lose their O_PATH fd and are reopened by name, through parents that
// may have been closed too.
func TestFewFileDescriptors(t *testing.T) {
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 40 })
	c := e.c
	type file struct {
		node uint64
		path string
	}
	var files []file
	for i := 0; i < 10; i++ {
		d, err := c.Mkdir(fuse.RootID, fmt.Sprintf("d%d", i), 0o755)
		must(t, "MKDIR", err)
		sub, err := c.Mkdir(d.NodeID, "sub", 0o755)
		must(t, "MKDIR sub", err)
		for k := 0; k < 20; k++ {
			name := fmt.Sprintf("f%d", k)
			en, fh, err := c.Create(sub.NodeID, name, unix.O_RDWR, 0o644)
			must(t, "CREATE", err)
			_, err = c.Write(en.NodeID, fh, 0, []byte(fmt.Sprintf("%d/%d", i, k)))
			must(t, "WRITE", err)
			must(t, "RELEASE", c.Release(en.NodeID, fh, false))
			files = append(files, file{en.NodeID, fmt.Sprintf("d%d/sub/%s", i, name)})
		}
	}
	open, evicted := e.s.t.fdStats()
	if open > 30 || evicted == 0 {
		t.Fatalf("%d node fds open, %d closed for the budget", open, evicted)
	}
	// Every node is still usable: GETATTR, OPEN+READ, SETATTR.
	for i, f := range files {
		a, err := c.Getattr(f.node)
		must(t, "GETATTR "+f.path, err)
		fh, err := c.Open(f.node, unix.O_RDONLY)
		must(t, "OPEN "+f.path, err)
		got, err := c.Read(f.node, fh, 0, 100)
		must(t, "READ", err)
		if string(got) != fmt.Sprintf("%d/%d", i/20, i%20) || a.Size != uint64(len(got)) {
			t.Fatalf("%s reads %q", f.path, got)
		}
		must(t, "RELEASE", c.Release(f.node, fh, false))
		_, err = c.Setattr(f.node, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o600})
		must(t, "chmod "+f.path, err)
	}
	// A closed directory renamed by the guest is found under its new name.
	must(t, "RENAME", c.Rename(fuse.RootID, "d0", fuse.RootID, "moved", 0))
	_, err := c.Getattr(files[0].node)
	must(t, "GETATTR below a renamed directory", err)
	// Unlinked while idle: the node stays reachable through its fd.
	for i := 0; i < 5; i++ {
		d, _ := c.Lookup(fuse.RootID, fmt.Sprintf("d%d", i+1))
		sub, _ := c.Lookup(d.NodeID, "sub")
		must(t, "UNLINK", c.Unlink(sub.NodeID, "f3"))
		_, err := c.Getattr(files[(i+1)*20+3].node)
		must(t, "GETATTR of an unlinked file", err)
	}
	// The host renaming a closed node's directory makes it stale, never
	// something else.
	must(t, "host rename", os.Rename(e.path("d9"), e.path("d9x")))
	must(t, "host mkdir", os.MkdirAll(e.path("d9/sub"), 0o755))
	must(t, "host write", os.WriteFile(e.path("d9/sub/f0"), []byte("impostor"), 0o644))
	for k := 0; k < 40; k++ { // push the d9 nodes out
		c.Getattr(files[k].node)
	}
	if fh, err := c.Open(files[180].node, unix.O_RDONLY); err == nil {
		got, _ := c.Read(files[180].node, fh, 0, 100)
		if string(got) == "impostor" {
			t.Fatal("a reopened node resolved to another inode")
		}
	}
}
