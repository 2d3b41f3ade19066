package fs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/sandbox"
)

var servingPidRE = regexp.MustCompile(`serving: .*pid=([0-9]+)`)

// procStatus reads /proc/PID/status into key: value pairs.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// TestRootOwnedShare serves a root-owned share, as a container's root file
// system is, with krun-core serve running as root: the plugin runs as
// nobody, yet the guest (the Go test guest's FUSE client, as root) sees
// root's files as root's, writes them, and what it creates is root's on
// the host, through the ID-mapped mount the plugin is handed. krun-core
// serve itself has dropped its privileges once serving.
func TestRootOwnedShare(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: krun-core serve as root runs its plugin as nobody")
	}
	share := filepath.Join(t.TempDir(), "share")
	must(t, "mkdir", os.MkdirAll(filepath.Join(share, "etc"), 0o755))
	must(t, "mkdir", os.MkdirAll(filepath.Join(share, "home", "user"), 0o755))
	must(t, "write", os.WriteFile(filepath.Join(share, "etc", "hostname"), []byte("box\n"), 0o644))
	must(t, "write", os.WriteFile(filepath.Join(share, "home", "user", "notes"), []byte("mine"), 0o644))
	must(t, "chown", os.Chown(filepath.Join(share, "home", "user"), 1000, 1000))
	must(t, "chown", os.Chown(filepath.Join(share, "home", "user", "notes"), 1000, 1000))
	d := serveFS(t, "path="+share+",tag=share")

	// The plugin runs as nobody; krun-core serve keeps no_new_privs and
	// only what its plugin needs from it.
	m := servingPidRE.FindStringSubmatch(d.Out.String())
	if m == nil {
		t.Fatalf("no plugin pid in the serving line:\n%s", d.Out)
	}
	pid, _ := strconv.Atoi(m[1])
	st := procStatus(t, pid)
	nobody := fmt.Sprintf("%d\t%d\t%d\t%d", sandbox.DefaultPluginUID, sandbox.DefaultPluginUID, sandbox.DefaultPluginUID, sandbox.DefaultPluginUID)
	if st["Uid"] != nobody || st["Gid"] != strings.ReplaceAll(nobody, strconv.Itoa(sandbox.DefaultPluginUID), strconv.Itoa(sandbox.DefaultPluginGID)) {
		t.Errorf("plugin Uid %q Gid %q, want nobody's everywhere", st["Uid"], st["Gid"])
	}
	checkDropped(t, d.Cmd.Process.Pid, 1<<unix.CAP_KILL|1<<unix.CAP_SETUID|1<<unix.CAP_SETGID)

	c := dialFS(t, d.Socket, 4096).req
	root, err := c.Getattr(fuse.RootID)
	must(t, "GETATTR /", err)
	if root.UID != 0 || root.GID != 0 {
		t.Errorf("the guest sees the share's root as %d:%d, want root's", root.UID, root.GID)
	}
	etc, err := c.Lookup(fuse.RootID, "etc")
	must(t, "LOOKUP etc", err)
	hn, err := c.Lookup(etc.NodeID, "hostname")
	must(t, "LOOKUP etc/hostname", err)
	if hn.Attr.UID != 0 || hn.Attr.GID != 0 {
		t.Errorf("etc/hostname shows as %d:%d, want root's", hn.Attr.UID, hn.Attr.GID)
	}
	fh, err := c.Open(hn.NodeID, unix.O_WRONLY)
	must(t, "OPEN etc/hostname for writing", err)
	_, err = c.Write(hn.NodeID, fh, 0, []byte("vm!\n"))
	must(t, "WRITE etc/hostname", err)
	must(t, "RELEASE", c.Release(hn.NodeID, fh, false))
	nf, fh, err := c.Create(etc.NodeID, "new", unix.O_RDWR, 0o640)
	must(t, "CREATE etc/new", err)
	_, err = c.Write(nf.NodeID, fh, 0, []byte("made by the guest"))
	must(t, "WRITE etc/new", err)
	must(t, "RELEASE", c.Release(nf.NodeID, fh, false))
	if nf.Attr.UID != 0 || nf.Attr.GID != 0 {
		t.Errorf("the guest's new file shows as %d:%d, want root's", nf.Attr.UID, nf.Attr.GID)
	}
	vd, err := c.Mkdir(fuse.RootID, "var", 0o755)
	must(t, "MKDIR var", err)
	_, err = c.Mkdir(vd.NodeID, "log", 0o750)
	must(t, "MKDIR var/log", err)
	_, err = c.Setattr(nf.NodeID, fuse.SetattrIn{Valid: fuse.FattrUID | fuse.FattrGID, UID: 0, GID: 0})
	must(t, "chown etc/new to root", err)
	_, err = c.Setattr(nf.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o4755})
	must(t, "chmod 4755 etc/new", err)
	// What nobody could not do before: files of other ids stay theirs,
	// showing as the overflow id, and cannot be given away.
	home, err := c.Lookup(fuse.RootID, "home")
	must(t, "LOOKUP home", err)
	user, err := c.Lookup(home.NodeID, "user")
	must(t, "LOOKUP home/user", err)
	if user.Attr.UID != 65534 {
		t.Errorf("home/user (uid 1000) shows as %d, want the overflow id 65534", user.Attr.UID)
	}
	_, err = c.Setattr(nf.NodeID, fuse.SetattrIn{Valid: fuse.FattrUID, UID: 1000})
	wantErrno(t, "chown etc/new to 1000", err, syscall.EINVAL)
	d.Stop()

	for _, p := range []string{".", "etc", "etc/hostname", "etc/new", "var", "var/log"} {
		var st unix.Stat_t
		must(t, "stat", unix.Lstat(filepath.Join(share, p), &st))
		if st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s belongs to %d:%d on the host, want root's", p, st.Uid, st.Gid)
		}
		if p == "etc/new" && st.Mode&0o7777 != 0o755 {
			t.Errorf("etc/new has mode %o on the host, want 755 (a nosuid share strips S_ISUID)", st.Mode&0o7777)
		}
	}
	if b, err := os.ReadFile(filepath.Join(share, "etc", "hostname")); err != nil || string(b) != "vm!\n" {
		t.Errorf("etc/hostname: %q %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(share, "etc", "new")); err != nil || string(b) != "made by the guest" {
		t.Errorf("etc/new: %q %v", b, err)
	}
	var ust unix.Stat_t
	must(t, "stat", unix.Stat(filepath.Join(share, "home", "user", "notes"), &ust))
	if ust.Uid != 1000 {
		t.Errorf("home/user/notes now belongs to %d", ust.Uid)
	}
}

// checkDropped checks from outside that every thread of krun-core (pid) has
// no_new_privs and no capability beyond keep.
func checkDropped(t *testing.T, pid int, keep uint64) {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(task.Name())
		st := procStatus(t, tid)
		if st["NoNewPrivs"] != "1" {
			t.Errorf("krun-core thread %d: NoNewPrivs %q, want 1", tid, st["NoNewPrivs"])
		}
		for _, k := range []string{"CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"} {
			v, err := strconv.ParseUint(st[k], 16, 64)
			if err != nil || v&^keep != 0 || (k == "CapEff" && v != keep) {
				t.Errorf("krun-core thread %d: %s %s, want %016x", tid, k, st[k], keep)
			}
		}
	}
}
