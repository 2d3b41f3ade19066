package sandbox

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

func TestSwapMappings(t *testing.T) {
	m := func(in, out, n int) syscall.SysProcIDMap {
		return syscall.SysProcIDMap{ContainerID: in, HostID: out, Size: n}
	}
	for _, c := range []struct {
		s    IDSwap
		want []syscall.SysProcIDMap
	}{
		{IDSwap{0, 65534}, []syscall.SysProcIDMap{m(0, 65534, 1), m(1, 1, 65533), m(65534, 0, 1), m(65535, 65535, 1<<32-1-65535)}},
		{IDSwap{65534, 0}, []syscall.SysProcIDMap{m(0, 65534, 1), m(1, 1, 65533), m(65534, 0, 1), m(65535, 65535, 1<<32-1-65535)}},
		{IDSwap{0, 1}, []syscall.SysProcIDMap{m(0, 1, 1), m(1, 0, 1), m(2, 2, 1<<32-3)}},
		{IDSwap{5, 4242}, []syscall.SysProcIDMap{m(0, 0, 5), m(5, 4242, 1), m(6, 6, 4236), m(4242, 5, 1), m(4243, 4243, 1<<32-1-4243)}},
		{IDSwap{0, maxID}, []syscall.SysProcIDMap{m(0, maxID, 1), m(1, 1, maxID-1), m(maxID, 0, 1)}},
		{IDSwap{7, 7}, []syscall.SysProcIDMap{m(0, 0, 1<<32-1)}},
	} {
		got := swapMappings(c.s)
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("swapMappings(%v) = %v, want %v", c.s, got, c.want)
		}
		// Every id 0..maxID is covered once on each side, and the map is
		// the swap.
		var in, out uint64
		for _, l := range got {
			in += uint64(l.Size)
			out += uint64(l.Size)
			for _, id := range []int{l.ContainerID, l.ContainerID + l.Size - 1} {
				if want := int(c.s.Swap(uint32(id))); l.HostID+(id-l.ContainerID) != want {
					t.Errorf("%v: id %d maps to %d, want %d", c.s, id, l.HostID+(id-l.ContainerID), want)
				}
			}
		}
		if in != maxID+1 || out != maxID+1 {
			t.Errorf("%v: the map covers %d ids, want %d", c.s, in, uint64(maxID+1))
		}
		if len(got) > 5 {
			t.Errorf("%v: %d lines", c.s, len(got))
		}
	}
}

// shareLine is what the share helper reports: the owners it sees and what
// it could do in the share handed to it as fd 3.
type shareLine struct {
	Seen   map[string][2]uint32 `json:"seen"`
	Errors map[string]string    `json:"errors"`
}

// shareMain is a plugin serving the share at fd 3 (launched with Apply, in
// the sandbox): it looks at owners, writes a root-owned file, creates a
// file, a directory and a whiteout, and changes a mode.
func shareMain() int {
	l := shareLine{Seen: map[string][2]uint32{}, Errors: map[string]string{}}
	for _, n := range []string{".", "rootfile", "userfile", "pluginfile", "sub/below"} {
		var st unix.Stat_t
		if err := unix.Fstatat(3, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			l.Errors["stat "+n] = err.Error()
			continue
		}
		l.Seen[n] = [2]uint32{st.Uid, st.Gid}
	}
	try := func(name string, f func() error) {
		if err := f(); err != nil {
			l.Errors[name] = err.Error()
		}
	}
	try("write rootfile", func() error {
		fd, err := unix.Openat(3, "rootfile", unix.O_WRONLY|unix.O_APPEND|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		_, err = unix.Write(fd, []byte(" and the plugin"))
		return err
	})
	try("create", func() error {
		fd, err := unix.Openat(3, "new", unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o640)
		if err != nil {
			return err
		}
		return unix.Close(fd)
	})
	try("create below", func() error {
		fd, err := unix.Openat(3, "sub/new", unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		return unix.Close(fd)
	})
	try("mkdir", func() error { return unix.Mkdirat(3, "newdir", 0o750) })
	try("whiteout", func() error { return unix.Mknodat(3, "whiteout", unix.S_IFCHR|0o600, 0) })
	try("chmod rootfile", func() error { return unix.Fchmodat(3, "rootfile", 0o664, 0) })
	try("chown to self", func() error {
		return unix.Fchownat(3, "new", unix.Geteuid(), unix.Getegid(), unix.AT_SYMLINK_NOFOLLOW)
	})
	b, _ := json.Marshal(l)
	fmt.Println(string(b))
	return 0
}

// makeShare makes a root-owned share: a root file, a file of uid 1000, a
// file of the plugin's ids, and a directory below.
func makeShare(t *testing.T, pluginUID, pluginGID int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "share")
	for _, d := range []string{dir, filepath.Join(dir, "sub")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, owner := range map[string][2]int{"rootfile": {0, 0}, "userfile": {1000, 1000},
		"pluginfile": {pluginUID, pluginGID}, "sub/below": {0, 0}} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("from the host"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, owner[0], owner[1]); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// runShareHelper launches the share helper with lc, handing it share as
// fd 3, and returns its report.
func runShareHelper(t *testing.T, lc LaunchConfig, share *os.File) shareLine {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncbuf.Buffer{}
	lc.Kind = "fs"
	lc.Log = hclog.New(&hclog.LoggerOptions{Output: logs})
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=share"}
	cmd.ExtraFiles = []*os.File{share}
	cmd.Stderr = logs
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := lc.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan shareLine, 1)
	go func() {
		var l shareLine
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				l.Errors = map[string]string{"report": sc.Text()}
			}
		}
		done <- l
	}()
	select {
	case l := <-done:
		if err := cmd.Wait(); err != nil {
			t.Errorf("share helper: %v\n%s", err, logs)
		}
		return l
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("share helper did not report within a minute\n%s", logs)
	}
	return shareLine{}
}

// onDisk returns the owner of path.
func onDisk(t *testing.T, path string) [2]uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return [2]uint32{st.Uid, st.Gid}
}

// A plugin running as nobody (or chosen ids), handed an ID-mapped mount of
// a root-owned share, acts in it as root would without capabilities: it
// writes root's files, and what it creates is root's on disk. In its own
// user namespace it sees root's files as its uid 0 and every other owner as
// the overflow id; without one (namespaces disabled) it sees the mount's
// swap.
func TestIDMapShare(t *testing.T) {
	requireSandboxHost(t)
	requireRoot(t)
	for _, c := range []struct {
		name     string
		lc       LaunchConfig
		uid, gid uint32
	}{
		{"default", LaunchConfig{}, DefaultPluginUID, DefaultPluginGID},
		{"chosen ids", LaunchConfig{HostUID: 4242, HostGID: 4343}, 4242, 4343},
		{"no namespaces", LaunchConfig{Disable: []Layer{LayerNamespaces}}, DefaultPluginUID, DefaultPluginGID},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := makeShare(t, int(c.uid), int(c.gid))
			d, err := os.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			mnt, err := c.lc.IDMapShare(d)
			if err != nil {
				t.Fatalf("IDMapShare on %s (the host's file system supports ID-mapped mounts): %v", dir, err)
			}
			if mnt == nil {
				t.Fatal("IDMapShare returned no mount for a root launcher")
			}
			// From the launcher, the mount shows root's files as the plugin's.
			var st unix.Stat_t
			if err := unix.Fstat(int(mnt.Fd()), &st); err != nil || st.Uid != c.uid || st.Gid != c.gid {
				t.Errorf("the mount's root is %d:%d from the launcher (%v), want %d:%d", st.Uid, st.Gid, err, c.uid, c.gid)
			}
			l := runShareHelper(t, c.lc, mnt)
			t.Logf("plugin sees %v, errors %v", l.Seen, l.Errors)
			mnt.Close()
			if len(l.Errors) > 0 {
				t.Errorf("the plugin could not use its share: %v", l.Errors)
			}
			want := map[string][2]uint32{".": {0, 0}, "rootfile": {0, 0}, "sub/below": {0, 0},
				"userfile": {65534, 65534}, "pluginfile": {65534, 65534}}
			if c.lc.PluginSeesShareIDs() {
				want = map[string][2]uint32{".": {c.uid, c.gid}, "rootfile": {c.uid, c.gid}, "sub/below": {c.uid, c.gid},
					"userfile": {1000, 1000}, "pluginfile": {0, 0}}
			}
			if !reflect.DeepEqual(l.Seen, want) {
				t.Errorf("the plugin sees owners %v, want %v", l.Seen, want)
			}
			for _, n := range []string{"new", "sub/new", "newdir", "whiteout", "rootfile"} {
				if o := onDisk(t, filepath.Join(dir, n)); o != [2]uint32{0, 0} {
					t.Errorf("%s belongs to %d:%d on disk, want root's", n, o[0], o[1])
				}
			}
			for n, o := range map[string][2]uint32{"userfile": {1000, 1000}, "pluginfile": {c.uid, c.gid}} {
				if got := onDisk(t, filepath.Join(dir, n)); got != o {
					t.Errorf("%s changed owner to %v", n, got)
				}
			}
			if b, err := os.ReadFile(filepath.Join(dir, "rootfile")); err != nil || string(b) != "from the host and the plugin" {
				t.Errorf("rootfile: %q %v", b, err)
			}
			if fi, err := os.Stat(filepath.Join(dir, "rootfile")); err != nil || fi.Mode().Perm() != 0o664 {
				t.Errorf("rootfile mode %v %v, want 0664", fi.Mode(), err)
			}
		})
	}
}

// A file system without ID-mapped mounts (procfs) is an error naming the
// call, and nothing is left mounted.
func TestIDMapShareUnsupported(t *testing.T) {
	requireRoot(t)
	d, err := os.Open("/proc")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	before, _ := os.ReadFile("/proc/self/mountinfo")
	mnt, err := LaunchConfig{}.IDMapShare(d)
	if err == nil {
		mnt.Close()
		t.Fatal("IDMapShare of /proc succeeded; procfs has no ID-mapped mounts")
	}
	if !strings.Contains(err.Error(), "mount_setattr") || !errors.Is(err, unix.EINVAL) {
		t.Errorf("error %q, want mount_setattr's EINVAL", err)
	}
	after, _ := os.ReadFile("/proc/self/mountinfo")
	if string(before) != string(after) {
		t.Error("mountinfo changed")
	}
}

// A launcher that is not root runs plugins with its own ids: no mapping.
func TestShareSwapsUnprivileged(t *testing.T) {
	uid, gid, needed, err := LaunchConfig{}.ShareSwaps()
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		if needed {
			t.Errorf("an unprivileged launcher needs swaps %v %v", uid, gid)
		}
		return
	}
	want := []string{"0", strconv.Itoa(DefaultPluginUID), "0", strconv.Itoa(DefaultPluginGID)}
	got := []string{fmt.Sprint(uid.Launcher), fmt.Sprint(uid.Plugin), fmt.Sprint(gid.Launcher), fmt.Sprint(gid.Plugin)}
	if !needed || !reflect.DeepEqual(got, want) {
		t.Errorf("root launcher: swaps %v %v (needed %v)", uid, gid, needed)
	}
}

// BenchmarkIDMapShare is the cost of one share's ID-mapped mount: a
// process started in a new user namespace (this test binary, or
// krun-sandbox-exec), open_tree and mount_setattr.
func BenchmarkIDMapShare(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("ID-mapped mounts need root")
	}
	d, err := os.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	bin := filepath.Join(b.TempDir(), TrampolineName)
	build := exec.Command("go", "build", "-o", bin, "../cmd/krun-sandbox-exec")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	for _, c := range []struct{ name, trampoline string }{{"self", "/proc/self/exe"}, {"krun-sandbox-exec", bin}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				m, err := LaunchConfig{Trampoline: c.trampoline}.IDMapShare(d)
				if err != nil {
					b.Fatal(err)
				}
				m.Close()
			}
		})
	}
}
