package vmm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/boot/boottest"
)

// fakeRoot makes a root with /bin/prog (executable), /bin/data (not), a
// link /bin/sh -> /bin/prog (absolute: must resolve inside the root), and
// /usr/bin/escape -> /../../../../bin/true.
func fakeRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"bin", "usr/bin", "opt"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "bin/prog"), []byte("#!/bin/prog\n"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/data"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(root, "opt/tool"), []byte("x"), 0o755)
	os.Symlink("/bin/prog", filepath.Join(root, "bin/sh"))
	os.Symlink("/../../../../../bin/true", filepath.Join(root, "usr/bin/escape"))
	os.Mkdir(filepath.Join(root, "bin/dir"), 0o755)
	return root
}

func TestLookupInRoot(t *testing.T) {
	root := fakeRoot(t)
	tests := []struct {
		name    string
		env     []string
		want    string
		err     error
		workdir string
	}{
		{"prog", nil, "/bin/prog", nil, ""},
		{"sh", nil, "/bin/sh", nil, ""},
		{"/bin/sh", nil, "/bin/sh", nil, ""},
		{"tool", nil, "", ErrCommandNotFound, ""},
		{"tool", []string{"PATH=/opt"}, "/opt/tool", nil, ""},
		{"/opt/tool", []string{"PATH=/nowhere"}, "/opt/tool", nil, ""},
		{"data", nil, "", ErrCommandNotExecutable, ""},
		{"/bin/data", nil, "", ErrCommandNotExecutable, ""},
		{"dir", nil, "", ErrCommandNotExecutable, ""},
		{"missing", nil, "", ErrCommandNotFound, ""},
		{"/bin/missing", nil, "", ErrCommandNotFound, ""},
		// A link that climbs out resolves inside the root, where there is
		// no /bin/true.
		{"escape", nil, "", ErrCommandNotFound, ""},
		{"../../../../bin/true", nil, "", ErrCommandNotFound, ""},
		// Relative names and PATH entries are taken from the working
		// directory, as krun-init's lookPath does (from review: ./server
		// with --workdir /app was "not found").
		{"./tool", nil, "/opt/tool", nil, "/opt"},
		{"../opt/tool", nil, "/opt/tool", nil, "/bin"},
		{"./tool", nil, "", ErrCommandNotFound, ""},
		{"tool", []string{"PATH=:/bin"}, "/opt/tool", nil, "/opt"},
		{"tool", []string{"PATH=opt"}, "/opt/tool", nil, "/"},
		{"prog", []string{"PATH=."}, "/bin/prog", nil, "/bin"},
		{"/bin/prog", nil, "/bin/prog", nil, "/opt"},
	}
	for _, tt := range tests {
		got, err := LookupInRoot(root, tt.workdir, tt.name, tt.env)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("LookupInRoot(%q, %q, %v) = %q, %v; want %v", tt.workdir, tt.name, tt.env, got, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("LookupInRoot(%q, %q, %v) = %q, %v; want %q", tt.workdir, tt.name, tt.env, got, err, tt.want)
		}
	}
	if _, err := LookupInRoot(filepath.Join(root, "nope"), "", "prog", nil); err == nil {
		t.Error("a missing root accepted")
	}
}

func TestExecSetters(t *testing.T) {
	root := fakeRoot(t)
	c := NewContext(nil)
	if err := c.SetRoot(filepath.Join(root, "missing"), false); !errors.Is(err, ErrConfig) {
		t.Errorf("missing root: %v", err)
	}
	if err := c.SetRoot(filepath.Join(root, "bin/prog"), false); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as root: %v", err)
	}
	if err := c.SetRoot(root, true); err != nil {
		t.Fatal(err)
	}
	if err := c.SetExec("", nil, nil); !errors.Is(err, ErrConfig) {
		t.Errorf("empty program: %v", err)
	}
	// PATH given twice: the program gets the last one only, the one
	// krun-init looks the command up with (from review, helper-77).
	if err := c.SetExec("/bin/sh", []string{"sh", "-c", "echo hi"}, []string{"PATH=/first", "PATH=/opt", "A=b"}); err != nil {
		t.Fatal(err)
	}
	cfg := c.exec.cfg
	if !slices.Equal(cfg.Args, []string{"/bin/sh", "-c", "echo hi"}) {
		t.Errorf("args %q", cfg.Args)
	}
	if p, _ := cfg.Getenv("PATH"); p != "/opt" {
		t.Errorf("PATH %q", p)
	}
	if h, ok := cfg.Getenv("HOME"); !ok || h != "/root" {
		t.Errorf("default HOME lost: %q %v", h, ok)
	}
	if n := strings.Count(strings.Join(cfg.Env, "\n"), "PATH="); n != 1 {
		t.Errorf("PATH set %d times: %q", n, cfg.Env)
	}
	if err := c.SetWorkdir("relative"); !errors.Is(err, ErrConfig) {
		t.Errorf("relative workdir: %v", err)
	}
	if err := c.SetWorkdir("/tmp/../srv"); err != nil || cfg.Workdir != "/srv" {
		t.Errorf("workdir %q, %v", cfg.Workdir, err)
	}
	if err := c.SetRlimits([]string{"nofile=10:20", "bogus=1:2"}); !errors.Is(err, ErrConfig) {
		t.Errorf("bad rlimit: %v", err)
	}
	if err := c.SetRlimits([]string{"nofile=10:20", "RLIMIT_CORE=unlimited:unlimited"}); err != nil || len(cfg.Rlimits) != 2 {
		t.Errorf("rlimits %v, %v", cfg.Rlimits, err)
	}
	if err := c.SetPortMap([]string{"8080"}); err != nil {
		t.Errorf("port map N means N:N: %v", err)
	}
	// One forward an entry: a comma went on into --net's other keys
	// ("8080:80,mtu=1500" set the network's MTU).
	for _, bad := range [][]string{{"x:1"}, {"0:80"}, {"1:70000"}, {""}, {"8080:80,mtu=1500"}, {"8080:80", "81,passt-arg=-q"}, {"8080:80,,"}, {"8080:80", "8080:81"}} {
		if err := c.SetPortMap(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("port map %q: %v", bad, err)
		}
	}
	// libkrun's krun_set_rlimits names a resource by its number.
	if err := c.SetRlimits([]string{"6=4096:8192", "nproc=1:2"}); !errors.Is(err, ErrConfig) {
		t.Errorf("nproc by number and by name: %v", err)
	}
	if err := c.SetRlimits([]string{"6=4096:8192"}); err != nil || len(cfg.Rlimits) != 1 || cfg.Rlimits[0].Type != "RLIMIT_NPROC" {
		t.Errorf("rlimit by number: %v, %v", cfg.Rlimits, err)
	}
	if err := c.SetHostname("bad name!"); !errors.Is(err, ErrConfig) {
		t.Errorf("bad hostname: %v", err)
	}
	if err := NewContext(nil).Signal(15); err == nil {
		t.Error("Signal without a program accepted")
	}
}

// Start refuses a program it cannot run before anything starts.
func TestStartExecErrors(t *testing.T) {
	root := fakeRoot(t)
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	tests := []struct {
		name  string
		setup func(c *Context)
		want  error
	}{
		{"not found", func(c *Context) { c.SetRoot(root, false); c.SetExec("nosuch", nil, nil) }, ErrCommandNotFound},
		{"not executable", func(c *Context) { c.SetRoot(root, false); c.SetExec("/bin/data", nil, nil) }, ErrCommandNotExecutable},
		{"no root", func(c *Context) { c.SetExec("/bin/prog", nil, nil) }, ErrConfig},
		{"root and initrd", func(c *Context) { c.SetKernel(k, k, ""); c.SetRoot(root, false); c.SetExec("/bin/prog", nil, nil) }, ErrConfig},
	}
	for _, tt := range tests {
		c := NewContext(nil)
		c.SetKernel(k, "", "")
		tt.setup(c)
		if _, err := c.Start(context.Background()); !errors.Is(err, tt.want) {
			t.Errorf("%s: Start = %v, want %v", tt.name, err, tt.want)
		}
	}
	// No krun-init anywhere.
	c := NewContext(nil)
	c.SetKernel(k, "", "")
	c.SetRoot(root, false)
	c.SetExec("/bin/prog", nil, nil)
	c.SetInitPath(filepath.Join(root, "no-init"))
	if _, err := c.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "no-init") {
		t.Errorf("missing krun-init: %v", err)
	}
}

// TestCheckKernelFileFIFO: a kernel path that names a FIFO is refused,
// not opened: open(2) would wait for a writer, and run would hang (from
// review).
func TestCheckKernelFileFIFO(t *testing.T) {
	p := filepath.Join(t.TempDir(), "fifo")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- CheckKernelFile(p) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("CheckKernelFile(fifo) = %v, want not a regular file", err)
		}
	case <-time.After(3 * time.Second):
		if fd, err := unix.Open(p, unix.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			unix.Close(fd)
		}
		t.Fatal("CheckKernelFile on a FIFO blocked for 3 s (open(2) waits for a writer)")
	}
}
