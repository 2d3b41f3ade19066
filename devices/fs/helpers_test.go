package fs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

type env struct {
	t   *testing.T
	dir string
	s   *Server
	c   *fuseclient.Client
}

// newEnv serves a fresh temporary directory. split > 0 cuts every request
// and reply into descriptors of that many bytes.
func newEnv(t *testing.T, split int, mod func(*ServerConfig)) *env {
	t.Helper()
	dir := t.TempDir()
	// Resolve symlinks in the temp path so host-side checks compare equal.
	dir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	return newEnvDir(t, dir, split, mod)
}

func newEnvDir(t *testing.T, dir string, split int, mod func(*ServerConfig)) *env {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg := ServerConfig{Dir: f}
	if mod != nil {
		mod(&cfg)
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := fuseclient.New(&fuseclient.Local{Handle: func(c *fuseclient.MemChain) uint32 { return s.Handle(c) }, Split: split})
	if _, err := c.Init(fuseclient.LinuxInitFlags); err != nil {
		t.Fatalf("INIT: %v", err)
	}
	return &env{t: t, dir: dir, s: s, c: c}
}

func (e *env) path(p string) string { return filepath.Join(e.dir, p) }

func wantErrno(t *testing.T, what string, err error, want syscall.Errno) {
	t.Helper()
	var got syscall.Errno
	if !errors.As(err, &got) || got != want {
		t.Fatalf("%s: got %v, want %v", what, err, want)
	}
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// lookup is Lookup that must succeed.
func (e *env) lookup(parent uint64, name string) fuse.EntryOut {
	e.t.Helper()
	en, err := e.c.Lookup(parent, name)
	must(e.t, "LOOKUP "+name, err)
	if en.NodeID == 0 {
		e.t.Fatalf("LOOKUP %s: node id 0", name)
	}
	return en
}

// liveNodes returns the node count (root included) and open handles.
func (e *env) live() (int, int) { return e.s.counts() }
