package fs_test

import (
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

func wantErrno(t *testing.T, what string, err error, want syscall.Errno) {
	t.Helper()
	var got syscall.Errno
	if !errors.As(err, &got) || got != want {
		t.Errorf("%s: got %v, want %v", what, err, want)
	}
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// outsideDir is a directory next to the share with a secret file.
func outsideDir(t *testing.T) (string, uint64) {
	t.Helper()
	dir := t.TempDir()
	must(t, "write secret", os.WriteFile(filepath.Join(dir, "secret"), []byte("secret"), 0o644))
	var st unix.Stat_t
	must(t, "stat", unix.Stat(filepath.Join(dir, "secret"), &st))
	return dir, st.Ino
}

// TestHostileGuest drives the sandboxed plugin behind `krun-core serve
// --fs` as a hostile guest over real virtqueues (requests scattered over
// 3-byte descriptors): escapes through names, host symlinks and swapped
// directories, absurd numbers, bogus forgets and malformed messages. The
// plugin must refuse them all, stay up, and leave the outside untouched.
func TestHostileGuest(t *testing.T) {
	out, secretIno := outsideDir(t)
	share := filepath.Join(t.TempDir(), "share")
	must(t, "mkdir", os.Mkdir(share, 0o755))
	must(t, "mkdir d", os.Mkdir(filepath.Join(share, "d"), 0o755))
	must(t, "write f", os.WriteFile(filepath.Join(share, "d", "f"), []byte("inside"), 0o644))
	must(t, "symlink", os.Symlink(out, filepath.Join(share, "outdir")))
	must(t, "symlink", os.Symlink(filepath.Join(out, "secret"), filepath.Join(share, "outfile")))
	must(t, "symlink", os.Symlink("/", filepath.Join(share, "root")))
	d := serveFS(t, "path="+share+",tag=share")
	g := dialFS(t, d.Socket, 3)
	c := g.req

	// Names.
	rel, _ := filepath.Rel(share, out)
	for _, name := range []string{"..", ".", "", "d/f", "../" + filepath.Base(out), rel + "/secret", out + "/secret", "/"} {
		_, err := c.Lookup(fuse.RootID, name)
		wantErrno(t, "LOOKUP "+name, err, syscall.EINVAL)
		_, _, err = c.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
		wantErrno(t, "CREATE "+name, err, syscall.EINVAL)
		wantErrno(t, "RENAME to "+name, c.Rename(fuse.RootID, "d", fuse.RootID, name, 0), syscall.EINVAL)
	}
	_, err := c.Lookup(fuse.RootID, strings.Repeat("x", 256))
	wantErrno(t, "LOOKUP of 256 bytes", err, syscall.ENAMETOOLONG)

	// Host symlinks pointing outside: their text, never their target.
	for _, name := range []string{"outdir", "outfile", "root"} {
		l, err := c.Lookup(fuse.RootID, name)
		must(t, "LOOKUP "+name, err)
		if l.Attr.Mode&unix.S_IFMT != unix.S_IFLNK || l.Attr.Ino == secretIno {
			t.Fatalf("%s: mode %o ino %d", name, l.Attr.Mode, l.Attr.Ino)
		}
		target, err := c.Readlink(l.NodeID)
		want, _ := os.Readlink(filepath.Join(share, name))
		if err != nil || target != want {
			t.Errorf("READLINK %s = %q, %v; want %q", name, target, err, want)
		}
		_, err = c.Lookup(l.NodeID, "secret")
		wantErrno(t, "LOOKUP through "+name, err, syscall.ENOTDIR)
		_, err = c.Lookup(l.NodeID, "etc")
		wantErrno(t, "LOOKUP etc through "+name, err, syscall.ENOTDIR)
		_, err = c.Open(l.NodeID, unix.O_RDWR|unix.O_TRUNC)
		wantErrno(t, "OPEN "+name, err, syscall.ENXIO)
		_, err = c.Opendir(l.NodeID)
		wantErrno(t, "OPENDIR "+name, err, syscall.ENOTDIR)
		_, err = c.Setattr(l.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o777})
		wantErrno(t, "chmod "+name, err, syscall.EOPNOTSUPP)
	}

	// A directory swapped for a symlink to the outside between requests.
	dn, err := c.Lookup(fuse.RootID, "d")
	must(t, "LOOKUP d", err)
	fn, err := c.Lookup(dn.NodeID, "f")
	must(t, "LOOKUP d/f", err)
	must(t, "host rename", os.Rename(filepath.Join(share, "d"), filepath.Join(share, "d.old")))
	must(t, "host symlink", os.Symlink(out, filepath.Join(share, "d")))
	_, err = c.Lookup(dn.NodeID, "secret")
	wantErrno(t, "LOOKUP secret in the old d", err, syscall.ENOENT)
	nd, err := c.Lookup(fuse.RootID, "d")
	must(t, "LOOKUP new d", err)
	_, err = c.Lookup(nd.NodeID, "secret")
	wantErrno(t, "LOOKUP through the swapped-in symlink", err, syscall.ENOTDIR)
	// And a file name swapped for a symlink to the outside file.
	must(t, "host rename f", os.Rename(filepath.Join(share, "d.old", "f"), filepath.Join(share, "d.old", "f.old")))
	must(t, "host symlink f", os.Symlink(filepath.Join(out, "secret"), filepath.Join(share, "d.old", "f")))
	_, err = c.Open(fn.NodeID, unix.O_RDWR|unix.O_TRUNC)
	wantErrno(t, "OPEN through a swapped name", err, syscall.ESTALE)

	// Numbers.
	en, fh, err := c.Create(fuse.RootID, "n", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	_, err = c.Read(en.NodeID, fh, 1<<63, 10)
	wantErrno(t, "READ at 2^63", err, syscall.EINVAL)
	_, err = c.Read(en.NodeID, fh, math.MaxUint64, 10)
	wantErrno(t, "READ at -1", err, syscall.EINVAL)
	_, err = c.Write(en.NodeID, fh, math.MaxInt64-1, []byte("abc"))
	wantErrno(t, "WRITE past 2^63", err, syscall.EFBIG)
	wantErrno(t, "FALLOCATE overflow", c.Fallocate(en.NodeID, fh, math.MaxInt64, math.MaxInt64, 0), syscall.EFBIG)
	_, err = c.Setattr(en.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize, Size: math.MaxUint64})
	wantErrno(t, "truncate to -1", err, syscall.EINVAL)
	_, err = c.Lseek(en.NodeID, fh, math.MaxUint64, unix.SEEK_SET)
	wantErrno(t, "LSEEK to -1", err, syscall.EINVAL)
	_, err = c.Read(en.NodeID, 1<<40, 0, 10)
	wantErrno(t, "READ of an unknown handle", err, syscall.EBADF)
	_, err = c.Getattr(1 << 50)
	wantErrno(t, "GETATTR of an unknown node", err, syscall.ESTALE)

	// Forgets of nodes that do not exist, on both queues.
	must(t, "FORGET unknown", g.hiprio.Forget(1<<50, 1))
	must(t, "FORGET root", g.hiprio.Forget(fuse.RootID, math.MaxUint64))
	must(t, "FORGET unknown on the request queue", c.Forget(12345, 7))
	must(t, "BATCH_FORGET", g.hiprio.BatchForget([2]uint64{1 << 50, 1}, [2]uint64{0, 0}, [2]uint64{en.NodeID, math.MaxUint64}))
	lying := make([]byte, 8+16)
	fuse.PutU32(lying, 0, math.MaxUint32)
	_, err = g.hiprio.Call(fuse.OpBatchForget, 0, 0, lying)
	must(t, "BATCH_FORGET with a lying count", err)

	// Malformed messages.
	_, err = c.Raw(fuse.InHeader{Opcode: fuse.OpGetattr, NodeID: fuse.RootID, Len: 1 << 30}, [][]byte{make([]byte, 16)}, 4096)
	wantErrno(t, "header length beyond the chain", err, syscall.EINVAL)
	_, err = c.Raw(fuse.InHeader{Opcode: fuse.OpGetattr, NodeID: fuse.RootID, Len: 3}, nil, 4096)
	wantErrno(t, "header length below the header", err, syscall.EINVAL)
	for _, op := range []fuse.Opcode{0, 7, fuse.OpGetlk, fuse.OpIoctl, fuse.OpSetupMapping, 9999} {
		_, err := c.Call(op, fuse.RootID, 4096, make([]byte, 64))
		wantErrno(t, "opcode "+op.String(), err, syscall.ENOSYS)
	}
	for op := fuse.Opcode(1); op <= 52; op++ {
		if op == fuse.OpInit || op == fuse.OpDestroy || op == fuse.OpForget || op == fuse.OpBatchForget {
			continue
		}
		for _, n := range []int{0, 5, 17, 41, 90} {
			args := make([]byte, n)
			for i := range args {
				args[i] = 0xff
			}
			if _, err := c.Call(op, fuse.RootID, 4096, args); errors.Is(err, fuseclient.ErrBadReply) {
				t.Errorf("%v with %d bytes of 0xff: %v", op, n, err)
			}
		}
	}

	// Still serving, still confined.
	if !d.Alive() {
		t.Fatalf("the plugin died\n%s", d.Out)
	}
	if _, err := c.Getattr(fuse.RootID); err != nil {
		t.Fatalf("GETATTR after the attack: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(out, "secret")); err != nil || string(b) != "secret" {
		t.Fatalf("the outside file changed: %q %v", b, err)
	}
	if ents, _ := os.ReadDir(out); len(ents) != 1 {
		t.Fatalf("the outside directory has %d entries", len(ents))
	}
	if b, _ := os.ReadFile(filepath.Join(share, "d.old", "f.old")); string(b) != "inside" {
		t.Fatalf("d.old/f.old reads %q", b)
	}
}

// TestReadOnlyServe checks readonly=on through the served plugin: reads
// work, every modification is EROFS, and the host directory is unchanged.
func TestReadOnlyServe(t *testing.T) {
	share := t.TempDir()
	must(t, "write", os.WriteFile(filepath.Join(share, "f"), []byte("data"), 0o644))
	d := serveFS(t, "path="+share+",tag=ro,readonly=on")
	g := dialFS(t, d.Socket, 0)
	c := g.req
	f, err := c.Lookup(fuse.RootID, "f")
	must(t, "LOOKUP", err)
	fh, err := c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)
	b, err := c.Read(f.NodeID, fh, 0, 10)
	if err != nil || string(b) != "data" {
		t.Fatalf("READ: %q %v", b, err)
	}
	_, err = c.Write(f.NodeID, fh, 0, []byte("x"))
	wantErrno(t, "WRITE", err, syscall.EROFS)
	_, err = c.Open(f.NodeID, unix.O_WRONLY)
	wantErrno(t, "OPEN for writing", err, syscall.EROFS)
	_, _, err = c.Create(fuse.RootID, "new", unix.O_RDWR, 0o644)
	wantErrno(t, "CREATE", err, syscall.EROFS)
	_, err = c.Mkdir(fuse.RootID, "dir", 0o755)
	wantErrno(t, "MKDIR", err, syscall.EROFS)
	wantErrno(t, "UNLINK", c.Unlink(fuse.RootID, "f"), syscall.EROFS)
	wantErrno(t, "RENAME", c.Rename(fuse.RootID, "f", fuse.RootID, "g", 0), syscall.EROFS)
	_, err = c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o777})
	wantErrno(t, "SETATTR", err, syscall.EROFS)
	wantErrno(t, "SETXATTR", c.Setxattr(f.NodeID, "user.a", []byte("b"), 0), syscall.EROFS)
	ents, _ := os.ReadDir(share)
	if len(ents) != 1 {
		t.Fatalf("host directory has %d entries", len(ents))
	}
	if st, _ := os.Stat(filepath.Join(share, "f")); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode changed to %v", st.Mode())
	}
}

// TestServeErrors checks the one-line errors of bad --fs arguments.
func TestServeErrors(t *testing.T) {
	bin := filepath.Join(binDir(t), "krun-core")
	file := filepath.Join(t.TempDir(), "file")
	must(t, "write", os.WriteFile(file, nil, 0o644))
	for _, tc := range []struct{ spec, want string }{
		{"path=/nonexistent/krun-e2e,tag=x", "no such file or directory"},
		{"path=" + file + ",tag=x", "not a directory"},
		{"path=" + t.TempDir(), "tag= is required"},
		{"path=" + t.TempDir() + ",tag=" + strings.Repeat("t", 37), "longer than 36"},
		{"path=" + t.TempDir() + ",tag=x,readonly=maybe", "readonly"},
		{"path=" + t.TempDir() + ",tag=x,cache=none", "want seconds from 0 to 3600"},
		{"path=" + t.TempDir() + ",tag=x,dax=on", "unknown key"},
	} {
		sock := filepath.Join(sockDir(t), "s")
		outb, err := exec.Command(bin, "serve", "--socket", sock, "--fs", tc.spec).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Errorf("--fs %s: %v, want exit status 1", tc.spec, err)
			continue
		}
		outs := strings.TrimSpace(string(outb))
		if strings.Count(outs, "\n") != 0 || !strings.Contains(outs, tc.want) {
			t.Errorf("--fs %s: output %q, want one line containing %q", tc.spec, outs, tc.want)
		}
	}
}
