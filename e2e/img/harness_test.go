package img_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// bins holds krun-core and krun-plugin-img, built once per test binary.
var bins struct {
	once sync.Once
	dir  string
	err  error
}

// repoRoot is the repository, found before any test changes directory.
var repoRoot string

func TestMain(m *testing.M) {
	root, err := filepath.Abs("../..")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	repoRoot = root
	code := m.Run()
	if bins.dir != "" && os.Getenv("KRUN_E2E_BIN_DIR") == "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

// krunCore returns the path of a krun-core with krun-plugin-img next to it.
func krunCore(t *testing.T) string {
	t.Helper()
	skipShort(t)
	if d := os.Getenv("KRUN_E2E_BIN_DIR"); d != "" {
		return filepath.Join(d, "krun-core")
	}
	bins.once.Do(func() {
		root := repoRoot
		dir, err := os.MkdirTemp("", "krun-e2e-img-bin")
		if err != nil {
			bins.err = err
			return
		}
		bins.dir = dir
		for out, pkg := range map[string]string{"krun-core": "./cmd/krun-core", "krun-plugin-img": "./plugins/img"} {
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
	return filepath.Join(bins.dir, "krun-core")
}

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the end-to-end tests build krun-core and krun-plugin-img and run qemu-img")
	}
}

// qemuTool finds a qemu-utils program or skips the test.
func qemuTool(t *testing.T, name string) string {
	t.Helper()
	skipShort(t)
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (qemu-utils; needed by this end-to-end test)", name)
	}
	return p
}

// result is one finished command.
type result struct {
	code           int
	stdout, stderr string
	took           time.Duration
}

// run runs a command with a 2-minute limit; stdin may be nil.
func run(t *testing.T, stdin io.Reader, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr, cmd.Stdin = &out, &errb, stdin
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		r.code = ee.ExitCode()
	default:
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, errb.String())
	}
	return r
}

// img runs `krun-core img ARGS`.
func img(t *testing.T, args ...string) result {
	t.Helper()
	return run(t, nil, krunCore(t), append([]string{"img"}, args...)...)
}

// mustImg runs `krun-core img ARGS` and fails the test unless it exits 0.
func mustImg(t *testing.T, args ...string) string {
	t.Helper()
	r := img(t, args...)
	if r.code != 0 {
		t.Fatalf("krun-core img %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// sh runs a host tool and fails the test unless it exits 0.
func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	r := run(t, nil, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\n%s%s", name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	return sh(t, qemuTool(t, "qemu-img"), args...)
}

func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	sh(t, qemuTool(t, "qemu-io"), append(args, path)...)
}

func decodeJSON(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("decode JSON: %v\n%s", err, s)
	}
	return m
}

// sameFile reports whether two files have equal content.
func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false
		}
		if ea != nil || eb != nil {
			return (ea == nil) == (eb == nil)
		}
	}
}
