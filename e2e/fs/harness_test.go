package fs_test

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/fs/fuseclient"
	"github.com/krun-core/krun-core/internal/syncbuf"
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

// daemon is one vhost-user-fs back-end process: `krun-core serve --fs` or
// the C virtiofsd.
type daemon struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	socket string
	out    *syncbuf.Buffer
	done   chan struct{}
	err    error
	once   sync.Once
	// cleanExit is what a clean stop looks like: krun-core exits 0 on
	// SIGTERM; virtiofsd is killed.
	kill bool
	// ready is output that says the daemon is fully up ("" for none).
	ready string
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

func startDaemon(t testing.TB, d *daemon, args ...string) *daemon {
	t.Helper()
	d.t, d.out, d.done = t, &syncbuf.Buffer{}, make(chan struct{})
	d.cmd = exec.Command(args[0], args[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.stop() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		// krun-core logs "serving" once it handles SIGTERM; stopping it
		// earlier would kill it.
		if st, err := os.Stat(d.socket); err == nil && st.Mode().Type() == fs.ModeSocket &&
			(d.ready == "" || strings.Contains(d.out.String(), d.ready)) {
			return d
		}
		select {
		case <-d.done:
			t.Fatalf("%s exited before listening: %v\n%s", d.name, d.err, d.out)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no socket after 30 s\n%s", d.name, d.out)
		}
	}
}

// serveFS starts `krun-core serve --socket S --fs spec`.
func serveFS(t testing.TB, spec string, extra ...string) *daemon {
	t.Helper()
	d := &daemon{name: "krun-core serve --fs " + spec, socket: filepath.Join(sockDir(t), "fs.sock"), ready: "krun-core: serving"}
	args := append([]string{filepath.Join(binDir(t), "krun-core"), "serve", "--log-level", "info", "--socket", d.socket, "--fs", spec}, extra...)
	return startDaemon(t, d, args...)
}

// virtiofsd starts QEMU's C virtiofsd on dir (it needs root for its own
// sandbox) or skips.
func virtiofsd(t testing.TB, dir string) *daemon {
	t.Helper()
	if _, err := os.Stat(virtiofsdPath); err != nil {
		t.Skipf("%s is not installed (Debian package qemu-system-common)", virtiofsdPath)
	}
	if os.Getuid() != 0 {
		t.Skip("the C virtiofsd needs root for its sandbox")
	}
	d := &daemon{name: "virtiofsd", socket: filepath.Join(sockDir(t), "vfsd.sock"), kill: true}
	return startDaemon(t, d, virtiofsdPath, "--socket-path="+d.socket, "-o", "source="+dir, "-o", "cache=auto")
}

// stop ends the daemon and, for krun-core, fails the test unless it exits
// 0 on SIGTERM within 15 s.
func (d *daemon) stop() { d.once.Do(d.doStop) }

func (d *daemon) doStop() {
	select {
	case <-d.done:
	default:
		if d.kill {
			d.cmd.Process.Kill()
			<-d.done
			return
		}
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(15 * time.Second):
			d.cmd.Process.Kill()
			<-d.done
			d.t.Errorf("%s did not exit within 15 s of SIGTERM\n%s", d.name, d.out)
			return
		}
	}
	if d.kill {
		return
	}
	var ee *exec.ExitError
	if d.err != nil && !(errors.As(d.err, &ee) && ee.ExitCode() == 0) {
		d.t.Errorf("%s: %v\n%s", d.name, d.err, d.out)
	}
}

// alive reports whether the daemon is still running.
func (d *daemon) alive() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
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

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
