package fs_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// setIDScript runs on three shares: /a is the default (nosuid) share
// behind the sandboxed plugin, /b the default share with --sandbox=off (the
// plugin is root with CAP_FSETID, so the server clears the bits itself),
// /c a suid=on share with --sandbox=off. The host checks the results.
const setIDScript = `
fail() { e2e_fail "$*"; }
echo "u:x:1000:1000::/:/bin/sh" >> /etc/passwd
echo "u:x:1000:" >> /etc/group
mkdir -p /a /b /c
mount -t virtiofs nosuid /a || fail "mount nosuid"
mount -t virtiofs nosuidroot /b || fail "mount nosuidroot"
mount -t virtiofs suid /c || fail "mount suid"
for m in /a /b /c; do
	cd $m || fail "cd $m"
	echo planted > planted && chmod 4755 planted || fail "$m: chmod 4755 planted"
	touch planted2 && chmod 6755 planted2 || fail "$m: chmod 6755 planted2"
	[ "$(stat -c %a hostread)" = 4755 ] || fail "$m: the guest sees hostread as $(stat -c %a hostread)"
	echo guest >> hostsuid || fail "$m: append to hostsuid"
	chmod 4777 hostroot || fail "$m: chmod 4777 hostroot"
	truncate -s 0 hostsgid || fail "$m: truncate hostsgid"
	cat hostread > /dev/null || fail "$m: read hostread"
	su -s /bin/sh u -c "echo user >> $m/usersuid" || fail "$m: user 1000 appends to usersuid"
	mkdir sgdir && chmod 2775 sgdir || fail "$m: chmod 2775 sgdir"
	cd /
	umount $m || fail "umount $m"
done
echo "set-id guest test done"
`

// TestGuestSetID checks issue #21's set-id plant through a Linux guest:
// what the guest asks for and what the host file ends up with.
func TestGuestSetID(t *testing.T) {
	a := vmtest.Require(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root: the host files belong to root and to uid 1000")
	}
	shares := []struct {
		tag, opts string
		extra     []string
	}{
		{"nosuid", "", nil},
		{"nosuidroot", "", []string{"--sandbox", "off"}},
		{"suid", ",suid=on", []string{"--sandbox", "off"}},
	}
	dirs := map[string]string{}
	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_pci", "virtiofs")
	ib.SetInit(setIDScript)
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 5 * time.Minute, MemoryMiB: 256})
	var daemons []*daemon
	for _, sh := range shares {
		dir := filepath.Join(t.TempDir(), sh.tag)
		must(t, "mkdir", os.Mkdir(dir, 0o755))
		modes := map[string]uint32{"hostsuid": 0o4755, "hostroot": 0o755, "hostsgid": 0o6755, "hostread": 0o4755, "usersuid": 0o4766}
		for name := range modes {
			must(t, "host file", os.WriteFile(filepath.Join(dir, name), []byte("host\n"), 0o600))
		}
		must(t, "host chown", os.Chown(filepath.Join(dir, "usersuid"), 1000, 1000))
		// chown clears the set-id bits: set the modes last.
		for name, mode := range modes {
			must(t, "host chmod", unix.Chmod(filepath.Join(dir, name), mode))
		}
		dirs[sh.tag] = dir
		d := serveFS(t, "path="+dir+",tag="+sh.tag+sh.opts, sh.extra...)
		daemons = append(daemons, d)
		vm.AddVhostUserFS(d.Socket, sh.tag)
	}
	r := vm.Run()
	t.Logf("guest run: boot %v, total %v", r.BootTime, r.Total)
	for _, d := range daemons {
		d.Stop()
	}

	want := map[string]map[string]uint32{
		// The sandboxed plugin: modes stripped by the server, writes
		// cleared by the host kernel (the plugin holds no CAP_FSETID).
		"nosuid": {"planted": 0o755, "planted2": 0o755, "hostsuid": 0o755, "hostroot": 0o777,
			"hostsgid": 0o755, "hostread": 0o4755, "usersuid": 0o766, "sgdir": 0o2775},
		// Root with CAP_FSETID: the server clears on writes itself.
		"nosuidroot": {"planted": 0o755, "planted2": 0o755, "hostsuid": 0o755, "hostroot": 0o777,
			"hostsgid": 0o755, "hostread": 0o4755, "usersuid": 0o766, "sgdir": 0o2775},
		// suid=on: the guest kernel decides. Guest root (CAP_FSETID) keeps
		// the bits on write and truncate; user 1000's write carries
		// FUSE_WRITE_KILL_SUIDGID (or, without KILLPRIV_V2, a SETATTR).
		"suid": {"planted": 0o4755, "planted2": 0o6755, "hostsuid": 0o4755, "hostroot": 0o4777,
			"hostsgid": 0o6755, "hostread": 0o4755, "usersuid": 0o766, "sgdir": 0o2775},
	}
	for tag, files := range want {
		for name, mode := range files {
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(dirs[tag], name), &st); err != nil {
				t.Errorf("%s/%s: %v", tag, name, err)
				continue
			}
			if got := st.Mode & 0o7777; got != mode {
				t.Errorf("%s/%s: host mode %04o, want %04o", tag, name, got, mode)
			}
		}
		if b, err := os.ReadFile(filepath.Join(dirs[tag], "hostsuid")); err != nil || string(b) != "host\nguest\n" {
			t.Errorf("%s/hostsuid reads %q %v", tag, b, err)
		}
		if b, err := os.ReadFile(filepath.Join(dirs[tag], "usersuid")); err != nil || string(b) != "host\nuser\n" {
			t.Errorf("%s/usersuid reads %q %v", tag, b, err)
		}
	}
}
