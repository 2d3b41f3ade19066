package main

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/container"
)

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	other := filepath.Join(dir, "other")
	os.MkdirAll(bin, 0o755)
	os.MkdirAll(other, 0o755)
	os.MkdirAll(filepath.Join(bin, "adir"), 0o755)
	write := func(p string, mode os.FileMode) {
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
	}
	write(filepath.Join(bin, "tool"), 0o755)
	write(filepath.Join(bin, "noexec"), 0o644)
	write(filepath.Join(other, "noexec"), 0o755)
	write(filepath.Join(other, "onlyhere"), 0o644)
	write(filepath.Join(dir, "local"), 0o700)
	path := bin + ":" + other

	tests := []struct {
		file string
		uid  uint32
		want string
		err  error
	}{
		{"tool", 0, filepath.Join(bin, "tool"), nil},
		{"noexec", 0, filepath.Join(other, "noexec"), nil}, // the first executable one wins
		{"onlyhere", 0, "", errNotExecutable},
		{"missing", 0, "", errNotFound},
		{"adir", 0, "", errNotExecutable},
		{"./local", 0, filepath.Join(dir, "local"), nil},
		{"local", 0, "", errNotFound},
		{filepath.Join(bin, "noexec"), 0, filepath.Join(bin, "noexec"), errNotExecutable},
		{"/nonexistent/x", 0, "/nonexistent/x", errNotFound},
		{filepath.Join(bin, "tool", "x"), 0, filepath.Join(bin, "tool", "x"), errNotFound},
		{"./local", 4242, filepath.Join(dir, "local"), errNotExecutable}, // owner-only x bit
	}
	for _, tt := range tests {
		got, err := lookPath(tt.file, path, dir, idsOf(tt.uid, tt.uid, nil, nil))
		if err != tt.err || (tt.want != "" && got != tt.want) {
			t.Errorf("lookPath(%q, uid %d) = %q, %v; want %q, %v", tt.file, tt.uid, got, err, tt.want, tt.err)
		}
	}
}

// TestLookPathDirectorySearch: a directory on the way that the user cannot
// search hides what is in it, as from execvp: the next PATH entry is
// tried, and a path with a slash is not executable (126). krun-init looked
// as root and chose a file the user's exec then failed on (from review).
func TestLookPathDirectorySearch(t *testing.T) {
	dir := t.TempDir()
	// t.TempDir's directories are the test's own (0700): open them up.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	private := filepath.Join(dir, "private") // root's, 0700
	public := filepath.Join(dir, "public")
	for _, d := range []string{private, public} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "tool"), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(d, "tool"), 0o755)
	}
	os.Chmod(private, 0o700)
	both := private + ":" + public
	const user = 4242 // owns neither
	// An OCI process of that user whose effective set overrides the
	// directory check, as the kernel lets it (from review, helper-80).
	search := &container.Capabilities{Effective: []string{"CAP_DAC_READ_SEARCH"}}
	override := &container.Capabilities{Effective: []string{"CAP_DAC_OVERRIDE"}}
	permittedOnly := &container.Capabilities{Permitted: []string{"CAP_DAC_OVERRIDE"}}
	tests := []struct {
		name, file, pathEnv string
		uid                 uint32
		caps                *container.Capabilities
		want                string
		err                 error
	}{
		{"root searches anything", "tool", both, 0, nil, filepath.Join(private, "tool"), nil},
		{"user skips the private directory", "tool", both, user, nil, filepath.Join(public, "tool"), nil},
		{"user names the private file", filepath.Join(private, "tool"), both, user, nil, "", errNotExecutable},
		{"only in the private directory", "tool", private, user, nil, "", errNotExecutable},
		{"user with CAP_DAC_READ_SEARCH", "tool", both, user, search, filepath.Join(private, "tool"), nil},
		{"user with CAP_DAC_OVERRIDE", filepath.Join(private, "tool"), both, user, override, filepath.Join(private, "tool"), nil},
		{"user with it permitted, not effective", "tool", both, user, permittedOnly, filepath.Join(public, "tool"), nil},
		{"root without the capabilities", "tool", both, 0, &container.Capabilities{}, filepath.Join(private, "tool"), nil}, // owner
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := lookPath(tt.file, tt.pathEnv, "/", idsOf(tt.uid, tt.uid, nil, tt.caps))
			if err != tt.err || (tt.want != "" && got != tt.want) {
				t.Errorf("lookPath(%q, uid %d) = %q, %v; want %q, %v", tt.file, tt.uid, got, err, tt.want, tt.err)
			}
		})
	}
}

// drainPipe returns a pipe for a drain test (skipped with -short: it waits
// out drainMax); its read end is closed when the test ends.
func drainPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	if testing.Short() {
		t.Skip("waits out drainMax (5 s); runs without -short")
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, w
}

// TestDrainNotCutByASlowHost: once the command has exited, what it wrote
// into its pipe is delivered in full even when the host takes longer than
// drainMax to accept it (a slow reader of krun-core's stdout): the time
// spent waiting for the host does not count against the drain's limit.
// It did, and the rest of the pipe was dropped (from review, helper-77).
func TestDrainNotCutByASlowHost(t *testing.T) {
	r, w := drainPipe(t)
	const total = 96 << 10 // more than pump's 32 KiB read, less than a pipe
	var got atomic.Int64
	firstOut, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	out := func(b []byte) {
		once.Do(func() { close(firstOut); <-release }) // the host is slow
		got.Add(int64(len(b)))
	}
	var d drainer
	done := make(chan struct{})
	go func() { pump(r, &d, out); close(done) }()
	if _, err := w.Write(make([]byte, total)); err != nil {
		t.Fatal(err)
	}
	w.Close() // the command has exited
	<-firstOut
	d.start(r, time.Now())
	time.Sleep(drainMax + 200*time.Millisecond)
	close(release)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("pump did not end")
	}
	if n := got.Load(); n != total {
		t.Errorf("delivered %d of the %d bytes in the pipe", n, total)
	}
}

// TestDrainBoundedWithChattyOrphan: what a leftover process writes after
// the command exited is drained within drainMax however slow the host is:
// only the bytes in the pipe at the command's exit are owed the host's
// time. Every write's time was given back, and a process that never
// stopped writing kept the VM up for good (from review, helper-80).
func TestDrainBoundedWithChattyOrphan(t *testing.T) {
	r, w := drainPipe(t)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // the orphan: writes for good, its end never closed
		defer w.Close()
		buf := make([]byte, 4096)
		for {
			select {
			case <-stop:
				return
			default:
			}
			w.Write(buf)
		}
	}()
	out := func([]byte) { time.Sleep(20 * time.Millisecond) } // a slow host
	var d drainer
	done := make(chan struct{})
	go func() { pump(r, &d, out); close(done) }()
	time.Sleep(100 * time.Millisecond)
	d.start(r, time.Now()) // the command exits; the pipe is full
	select {
	case <-done:
	case <-time.After(drainMax + 3*time.Second):
		t.Fatalf("the drain did not end %v after the command's exit (drainMax %v)", drainMax+3*time.Second, drainMax)
	}
}
