package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestBindAfterKilledServe: a serve killed (SIGKILL, the
// OOM killer, docker kill) between bindAndListen's bind of its temporary
// name and the rename leaves .krun-serve-PID.sock in the socket's
// directory, for good. A later serve that gets the same PID (every serve
// that is PID 1 of its container, or simply PID reuse) then cannot start:
// "--socket PATH: bind: address already in use", naming a PATH that does
// not exist. The leftover is a socket nobody listens on, as stale as the
// ones checkSocketPath removes from PATH itself.
func TestBindAfterKilledServe(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stale func(t *testing.T, tmp string)
	}{
		{"bound, not listening", func(t *testing.T, tmp string) {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd) // the killed serve's socket is closed too
			if err := unix.Bind(fd, &unix.SockaddrUnix{Name: tmp}); err != nil {
				t.Fatal(err)
			}
		}},
		{"another serve of the same pid between bind and rename", func(t *testing.T, tmp string) {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Close(fd) })
			other, err := bindTemporary(fd, filepath.Join(filepath.Dir(tmp), "other.sock"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(other) })
		}},
		{"listening, then killed", func(t *testing.T, tmp string) {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "blk.sock")
			tc.stale(t, filepath.Join(dir, fmt.Sprintf(".krun-serve-%d.sock", os.Getpid())))
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			if err := checkSocketPath(path); err != nil {
				t.Fatalf("checkSocketPath: %v", err)
			}
			if err := bindAndListen(fd, path, 0o600); err != nil {
				t.Fatalf("a stale temporary socket of a killed serve with the same pid blocks the start: %v", err)
			}
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		})
	}
}
