package fs_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuseclient"
	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/vmtest"
	"github.com/krun-core/krun-core/testguest"
)

const virtiofsdPath = "/usr/lib/qemu/virtiofsd"

// bins are krun-core and krun-plugin-fs-virtio, built side by side once per
// test binary (plugins are found next to krun-core).
var bins = vmtest.BinSet{Name: "fs", Pkgs: map[string]string{
	"krun-core":             "github.com/krun-core/krun-core/cmd/krun-core",
	"krun-plugin-fs-virtio": "github.com/krun-core/krun-core/plugins/fs-virtio",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// binDir returns the directory of the built binaries.
func binDir(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: the end-to-end tests build and run krun-core serve")
	}
	return bins.Dir(t)
}

func sockDir(t testing.TB) string {
	t.Helper()
	// Unix socket paths are limited to 108 bytes: keep them short.
	dir, err := os.MkdirTemp("", "kfs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// daemon is one vhost-user-fs back-end process: `krun-core serve --fs` or
// the C virtiofsd.
type daemon = daemontest.Daemon

// serveFS starts `krun-core serve --socket S --fs spec`.
func serveFS(t testing.TB, spec string, extra ...string) *daemon {
	t.Helper()
	// krun-core logs "serving" once it handles SIGTERM; stopping it
	// earlier would kill it.
	opt := daemontest.Options{Name: "krun-core serve --fs " + spec, Socket: filepath.Join(sockDir(t), "fs.sock"), Ready: "krun-core: serving"}
	args := append([]string{filepath.Join(binDir(t), "krun-core"), "serve", "--log-level", "info", "--socket", opt.Socket, "--fs", spec}, extra...)
	return daemontest.Start(t, opt, args...)
}

// serveFSLimited is serveFS with krun-core's RLIMIT_NOFILE (soft and hard)
// set to nofile.
func serveFSLimited(t testing.TB, nofile int, spec string, extra ...string) *daemon {
	t.Helper()
	opt := daemontest.Options{Name: "krun-core serve --fs " + spec, Socket: filepath.Join(sockDir(t), "fs.sock"), Ready: "krun-core: serving"}
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("prlimit is not installed (Debian package util-linux)")
	}
	args := append([]string{prlimit, fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--", filepath.Join(binDir(t), "krun-core"),
		"serve", "--log-level", "info", "--socket", opt.Socket, "--fs", spec}, extra...)
	return daemontest.Start(t, opt, args...)
}

// virtiofsd starts QEMU's C virtiofsd on dir (it needs root for its own
// sandbox) or skips; opts are more -o options.
func virtiofsd(t testing.TB, dir string, opts ...string) *daemon {
	t.Helper()
	if _, err := os.Stat(virtiofsdPath); err != nil {
		t.Skipf("%s is not installed (Debian package qemu-system-common)", virtiofsdPath)
	}
	if os.Getuid() != 0 {
		t.Skip("the C virtiofsd needs root for its sandbox")
	}
	opt := daemontest.Options{Name: "virtiofsd", Socket: filepath.Join(sockDir(t), "vfsd.sock"), Kill: true}
	args := []string{virtiofsdPath, "--socket-path=" + opt.Socket, "-o", "source=" + dir, "-o", "cache=auto"}
	for _, o := range opts {
		args = append(args, "-o", o)
	}
	return daemontest.Start(t, opt, args...)
}

// fuseGuest is the Go test guest on a virtio-fs back-end: a FUSE client on
// the first request queue and one on the hiprio queue.
type fuseGuest struct {
	g      *testguest.Guest
	req    *fuseclient.Client
	hiprio *fuseclient.Client
}

func dialFS(t testing.TB, socket string, split int) *fuseGuest {
	t.Helper()
	g, err := testguest.Dial(socket, testguest.Options{NumQueues: 2, QueueSize: 128, MemSize: 64 << 20})
	if err != nil {
		t.Fatalf("dial %s: %v", socket, err)
	}
	rq := fuseclient.NewRing(g.Mem, g.Rings[1], split)
	hq := fuseclient.NewRing(g.Mem, g.Rings[0], split)
	t.Cleanup(func() {
		rq.Close()
		hq.Close()
		g.Close()
	})
	fg := &fuseGuest{g: g, req: fuseclient.New(rq), hiprio: fuseclient.New(hq)}
	if _, err := fg.req.Init(fuseclient.LinuxInitFlags); err != nil {
		t.Fatalf("FUSE INIT: %v", err)
	}
	return fg
}
