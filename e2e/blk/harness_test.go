package blk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// binDir builds krun-core and the block plugins once per test binary into a
// shared temporary directory (plugins are found next to krun-core).
var bins struct {
	once sync.Once
	dir  string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bins.dir != "" && os.Getenv("KRUN_E2E_BIN_DIR") == "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

func binDir(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("KRUN_E2E_BIN_DIR"); d != "" {
		return d
	}
	bins.once.Do(func() {
		root, err := filepath.Abs("../..")
		if err != nil {
			bins.err = err
			return
		}
		dir, err := os.MkdirTemp("", "krun-e2e-blk-bin")
		if err != nil {
			bins.err = err
			return
		}
		bins.dir = dir
		for out, pkg := range map[string]string{
			"krun-core":             "./cmd/krun-core",
			"krun-plugin-blk-raw":   "./plugins/blk-raw",
			"krun-plugin-blk-qcow2": "./plugins/blk-qcow2",
		} {
			cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, out), pkg)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if b, err := cmd.CombinedOutput(); err != nil {
				bins.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
				return
			}
		}
	})
	if bins.err != nil {
		t.Fatal(bins.err)
	}
	return bins.dir
}

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

// lockedBuffer collects a child's output.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// server is one `krun-core serve` process.
type server struct {
	t      *testing.T
	cmd    *exec.Cmd
	socket string
	out    *lockedBuffer
	done   chan struct{}
	err    error
	once   sync.Once
}

// serve starts `krun-core serve --socket S --disk spec` and waits for its
// socket. The process is stopped at the end of the test at the latest.
func serve(t *testing.T, spec string) *server {
	t.Helper()
	// Unix socket paths are limited to 108 bytes: keep them short.
	dir, err := os.MkdirTemp("", "kblk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &server{t: t, socket: filepath.Join(dir, "blk.sock"), out: &lockedBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(filepath.Join(binDir(t), "krun-core"), "serve", "--socket", s.socket, "--disk", spec)
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() { s.stop() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if st, err := os.Stat(s.socket); err == nil && st.Mode().Type() == fs.ModeSocket {
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("krun-core serve --disk %s exited before listening: %v\n%s", spec, s.err, s.out)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("krun-core serve --disk %s: no socket after 30 s\n%s", spec, s.out)
		}
	}
}

// stop ends the server with SIGTERM (SIGKILL after 15 s) and fails the test
// if it did not exit cleanly.
func (s *server) stop() { s.once.Do(s.doStop) }

func (s *server) doStop() {
	select {
	case <-s.done:
	default:
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			s.cmd.Process.Kill()
			<-s.done
			s.t.Errorf("krun-core serve did not exit within 15 s of SIGTERM\n%s", s.out)
			return
		}
	}
	var ee *exec.ExitError
	if s.err != nil && !(errors.As(s.err, &ee) && ee.ExitCode() == 0) {
		s.t.Errorf("krun-core serve: %v\n%s", s.err, s.out)
	} else {
		s.t.Logf("krun-core serve output:\n%s", s.out)
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
