package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
)

// TestBindSourceInRootSymlink: a bind mount whose source lies inside the
// container's root is bound by the guest, resolved in the root; the host
// never follows it. The image may have made the path a symbolic link to a
// host file or directory: before the fix the runtime resolved it on the
// host, read the host file into the guest and shared the host directory
// read-write (from review). A path that enters the root through a host
// symbolic link is refused, so that the image's links are never read on
// the host that way either.
func TestBindSourceInRootSymlink(t *testing.T) {
	s, b := baseSpec(t)
	secretDir := t.TempDir() // a host directory outside the bundle (/etc, /root/.ssh)
	secret := filepath.Join(secretDir, "shadow")
	must(t, os.WriteFile(secret, []byte("root:$6$hostsecret:19000:0:99999:7:::\n"), 0o600))
	// The hostile image: rootfs/srv/conf and rootfs/srv/data are
	// absolute symbolic links, as an image layer can carry them.
	must(t, os.Symlink(secret, filepath.Join(b, "rootfs", "srv", "conf")))
	must(t, os.RemoveAll(filepath.Join(b, "rootfs", "srv", "data")))
	must(t, os.Symlink(secretDir, filepath.Join(b, "rootfs", "srv", "data")))
	s.Mounts = []specs.Mount{
		{Destination: "/etc/app.conf", Type: "bind", Source: "rootfs/srv/conf", Options: []string{"bind", "ro"}},
		{Destination: "/inner", Type: "bind", Source: filepath.Join(b, "rootfs", "srv", "data"), Options: []string{"bind"}},
		{Destination: "/twice", Type: "bind", Source: filepath.Join(b, "rootfs", "srv", "..", "srv", "data"), Options: []string{"bind"}},
	}
	p, err := Translate("c1", b, s, translateOptions{CgroupRoot: "/sys/fs/cgroup"})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range p.Setup.Files {
		t.Errorf("a host file was read and copied into the guest: %q", f.Content)
	}
	for _, sh := range p.Shares {
		t.Errorf("a host directory became a share: %+v", sh)
	}
	want := map[string]string{"/etc/app.conf": "/srv/conf", "/inner": "/srv/data", "/twice": "/srv/data"}
	for _, m := range p.Setup.Mounts {
		if src, ok := want[m.Destination]; ok {
			if m.Type != container.TypeBind || m.Source != src {
				t.Errorf("mount %s: %s from %q, want a bind from %q in the root", m.Destination, m.Type, m.Source, src)
			}
			delete(want, m.Destination)
		}
	}
	if len(want) != 0 {
		t.Errorf("mounts missing: %v", want)
	}

	// Into the root through a host symbolic link: refused.
	link := filepath.Join(t.TempDir(), "into-root")
	must(t, os.Symlink(filepath.Join(b, "rootfs"), link))
	s.Mounts = []specs.Mount{{Destination: "/x", Type: "bind", Source: filepath.Join(link, "srv", "conf"), Options: []string{"bind"}}}
	if _, err := Translate("c1", b, s, translateOptions{CgroupRoot: "/sys/fs/cgroup"}); err == nil || !strings.Contains(err.Error(), "leads into the container's root") {
		t.Errorf("a source entering the root through a host link: %v, want it refused", err)
	}
}

// TestBindSourceKernelStateFile: a regular file on procfs or sysfs is
// refused as a bind source, as their directories are: the runtime would
// read it on the host, as root, and copy the host's state (its own
// environment here) into the guest; some such files never end (from
// review). Special files are refused without being opened.
func TestBindSourceKernelStateFile(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	must(t, mkfifo(fifo))
	for _, tc := range []struct{ src, want string }{
		{"/proc/self/environ", "proc"},
		{"/sys/kernel/uevent_seqnum", "sysfs"},
		{fifo, "named pipe"},
	} {
		t.Run(tc.src, func(t *testing.T) {
			s, b := baseSpec(t)
			s.Mounts = []specs.Mount{{Destination: "/leak", Type: "bind", Source: tc.src, Options: []string{"bind", "ro"}}}
			p, err := Translate("c1", b, s, translateOptions{CgroupRoot: "/sys/fs/cgroup"})
			if err == nil {
				t.Fatalf("accepted; %d files copied into the guest", len(p.Setup.Files))
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q, want one line that says %q", err, tc.want)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mkfifo(p string) error { return unix.Mkfifo(p, 0o600) }
