package blk_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/vmtest"
	"github.com/krun-core/krun-core/testguest"
)

// bins are krun-core and the block plugins, built side by side once per
// test binary (plugins are found next to krun-core).
var bins = vmtest.BinSet{Name: "blk", Pkgs: map[string]string{
	"krun-core":             "github.com/krun-core/krun-core/cmd/krun-core",
	"krun-plugin-blk-raw":   "github.com/krun-core/krun-core/plugins/blk-raw",
	"krun-plugin-blk-qcow2": "github.com/krun-core/krun-core/plugins/blk-qcow2",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

func binDir(t *testing.T) string { return bins.Dir(t) }

// tool finds a host tool in $PATH or the sbin directories (e2fsprogs lives
// in /usr/sbin, often not in a test's $PATH) or skips the test.
func tool(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	t.Skipf("%s not installed (needed by this end-to-end test)", name)
	return ""
}

func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return out
}

// server is one `krun-core serve` process.
type server struct{ *daemontest.Daemon }

// serve starts `krun-core serve --socket S --disk spec [extra...]` and waits for its
// socket. The process is stopped at the end of the test at the latest.
func serve(t *testing.T, spec string, extra ...string) *server {
	t.Helper()
	// Unix socket paths are limited to 108 bytes: keep them short.
	dir, err := os.MkdirTemp("", "kblk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	opt := daemontest.Options{Name: "krun-core serve --disk " + spec, Socket: filepath.Join(dir, "blk.sock")}
	s := daemontest.Start(t, opt, append([]string{filepath.Join(binDir(t), "krun-core"), "serve", "--socket", opt.Socket, "--disk", spec}, extra...)...)
	checkPluginsNotRoot(t, s.Cmd.Process.Pid)
	return &server{s}
}

// checkPluginsNotRoot checks from outside that every plugin process of the
// krun-core process pid runs with non-zero host uids and gids when the
// test runs as root (a non-root krun-core cannot run anything as root).
func checkPluginsNotRoot(t *testing.T, pid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, child := range strings.Fields(string(b)) {
			st, err := os.ReadFile("/proc/" + child + "/status")
			if err != nil {
				continue // gone (a short-lived helper)
			}
			n++
			for _, l := range strings.Split(string(st), "\n") {
				f := strings.Fields(l)
				if len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") && strings.Contains(" "+strings.Join(f[1:], " ")+" ", " 0 ") {
					t.Errorf("plugin %s runs with host %s", child, l)
				}
			}
		}
	}
	if n == 0 {
		t.Errorf("krun-core serve (pid %d) has no plugin process", pid)
	}
}

// dump reads the whole virtual disk behind a running server through the Go
// test guest, i.e. exactly as krun-core's plugin serves it.
func dump(t *testing.T, socket, out string) {
	t.Helper()
	b, err := testguest.DialBlk(socket, testguest.Options{MemSize: 16 << 20})
	if err != nil {
		t.Fatalf("dial %s: %v", socket, err)
	}
	defer b.Close()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	total := b.Config.Capacity * 512
	buf := make([]byte, 1<<20)
	for off := uint64(0); off < total; off += uint64(len(buf)) {
		n := min(uint64(len(buf)), total-off)
		if err := b.Read(ctx, off/512, buf[:n]); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if _, err := f.WriteAt(buf[:n], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}
