package fs

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestReadOnlyShareLeavesHostUntouched: readonly=on refuses every
// modifying opcode, but serving reads still changed host files: READ and
// READDIR updated atime (files were opened without O_NOATIME), and
// GETXATTR/LISTXATTR of a file the process may not read opened it for
// WRITING (openAny fell back to O_WRONLY), which host watchers see as a
// write (IN_CLOSE_WRITE). On a non-root krun-core the read-only Landlock
// rule does not stop atime updates either; only the root path's
// MOUNT_ATTR_RDONLY mount did. (From review.)
func TestReadOnlyShareLeavesHostUntouched(t *testing.T) {
	dir := t.TempDir()
	must(t, "write", os.WriteFile(dir+"/f", []byte("hello"), 0o644))
	must(t, "mkdir", os.Mkdir(dir+"/d", 0o755))
	must(t, "write", os.WriteFile(dir+"/d/x", nil, 0o644))
	old := time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)
	older := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	must(t, "chtimes", os.Chtimes(dir+"/f", old, older))
	must(t, "chtimes", os.Chtimes(dir+"/d", old, older))
	e := newEnvDir(t, dir, 0, func(c *ServerConfig) { c.ReadOnly = true })

	atime := func(p string) time.Time {
		var st unix.Stat_t
		must(t, "stat", unix.Lstat(p, &st))
		return time.Unix(st.Atim.Unix())
	}
	t.Run("READ atime", func(t *testing.T) {
		f := e.lookup(fuse.RootID, "f")
		fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
		must(t, "OPEN", err)
		_, err = e.c.Read(f.NodeID, fh, 0, 100)
		must(t, "READ", err)
		must(t, "RELEASE", e.c.Release(f.NodeID, fh, false))
		if a := atime(dir + "/f"); !a.Equal(old) {
			t.Errorf("read-only share: host file's atime changed from %v to %v", old, a)
		}
	})
	t.Run("READDIR atime", func(t *testing.T) {
		d := e.lookup(fuse.RootID, "d")
		dh, err := e.c.Opendir(d.NodeID)
		must(t, "OPENDIR", err)
		_, err = e.c.Readdir(d.NodeID, dh, 0, 4096)
		must(t, "READDIR", err)
		must(t, "RELEASEDIR", e.c.Release(d.NodeID, dh, true))
		if a := atime(dir + "/d"); !a.Equal(old) {
			t.Errorf("read-only share: host directory's atime changed from %v to %v", old, a)
		}
	})
	t.Run("GETXATTR opens for writing", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root (drops CAP_DAC_OVERRIDE on one thread, as the plugin has none)")
		}
		must(t, "write", os.WriteFile(dir+"/wo", []byte("x"), 0o200))
		wo := e.lookup(fuse.RootID, "wo")
		ifd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
		must(t, "inotify", err)
		defer unix.Close(ifd)
		_, err = unix.InotifyAddWatch(ifd, dir+"/wo", unix.IN_CLOSE_WRITE|unix.IN_MODIFY)
		must(t, "inotify watch", err)
		done := make(chan struct{})
		go func() { // on a thread that, like the plugin, has no DAC override
			defer close(done)
			dropDAC(t)
			e.c.Getxattr(wo.NodeID, "user.x", 64)
			e.c.Listxattr(wo.NodeID, 1024)
		}()
		<-done
		buf := make([]byte, 4096)
		n, _ := unix.Read(ifd, buf)
		if n > 0 {
			mask := uint32(buf[4]) | uint32(buf[5])<<8 | uint32(buf[6])<<16 | uint32(buf[7])<<24
			t.Errorf("read-only share: GETXATTR/LISTXATTR opened the host file for writing (inotify mask %#x, IN_CLOSE_WRITE=%#x)", mask, unix.IN_CLOSE_WRITE)
		}
	})
}
