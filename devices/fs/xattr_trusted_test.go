package fs

import (
	"bytes"
	"errors"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// A plugin that holds CAP_SYS_ADMIN (--sandbox off as root, as this test's
// server in the test process does when the tests run as root) let the guest
// set, read, list and remove trusted.* attributes of host files: root's
// private metadata, where overlayfs keeps the structure of its layers. The
// guest now gets what a process without the capability gets, as from the
// C virtiofsd.
func TestTrustedXattrsAreNotTheGuests(t *testing.T) {
	e := newEnv(t, 5, nil)
	c := e.c
	f, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	must(t, "RELEASE", c.Release(f.NodeID, fh, false))
	if err := unix.Setxattr(e.path("f"), "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Skipf("setting trusted.* on the host file needs CAP_SYS_ADMIN and a file system that keeps them: %v", err)
	}
	userOK := unix.Setxattr(e.path("f"), "user.u", []byte("1"), 0) == nil

	err = c.Setxattr(f.NodeID, "trusted.k", []byte("v"), 0)
	wantErrno(t, "SETXATTR trusted.k", err, syscall.EPERM)
	if _, err := unix.Getxattr(e.path("f"), "trusted.k", make([]byte, 8)); !errors.Is(err, unix.ENODATA) {
		t.Errorf("host file has trusted.k after the guest's SETXATTR (%v)", err)
	}
	_, err = c.Getxattr(f.NodeID, "trusted.overlay.opaque", 64)
	wantErrno(t, "GETXATTR trusted.overlay.opaque", err, syscall.ENODATA)
	_, err = c.Getxattr(f.NodeID, "trusted.overlay.opaque", 0)
	wantErrno(t, "GETXATTR trusted.overlay.opaque size", err, syscall.ENODATA)

	want := ""
	if userOK {
		want = "user.u\x00"
	}
	list, err := c.Listxattr(f.NodeID, 1024)
	must(t, "LISTXATTR", err)
	if bytes.Contains(list, []byte("trusted.")) || !bytes.Contains(list, []byte(want)) {
		t.Errorf("LISTXATTR = %q, want %q among the names and no trusted.* name", list, want)
	}
	size, err := c.Listxattr(f.NodeID, 0)
	must(t, "LISTXATTR size", err)
	if n, _ := fuse.U32(size, 0); int(n) != len(list) {
		t.Errorf("LISTXATTR size %d, the list has %d bytes", n, len(list))
	}
	if len(list) > 0 {
		_, err = c.Listxattr(f.NodeID, uint32(len(list)-1))
		wantErrno(t, "LISTXATTR one byte short", err, syscall.ERANGE)
		if got, err := c.Listxattr(f.NodeID, uint32(len(list))); err != nil || !bytes.Equal(got, list) {
			t.Errorf("LISTXATTR of exactly its size: %q, %v", got, err)
		}
	}

	err = c.Removexattr(f.NodeID, "trusted.overlay.opaque")
	wantErrno(t, "REMOVEXATTR trusted.overlay.opaque", err, syscall.EPERM)
	if _, err := unix.Getxattr(e.path("f"), "trusted.overlay.opaque", make([]byte, 8)); err != nil {
		t.Errorf("host file lost trusted.overlay.opaque: %v", err)
	}
}

func TestDropTrustedNames(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"user.a\x00", "user.a\x00"},
		{"trusted.a\x00", ""},
		{"user.a\x00trusted.overlay.x\x00security.selinux\x00", "user.a\x00security.selinux\x00"},
		{"trusted.a\x00trusted.b\x00user.c\x00", "user.c\x00"},
		{"user.trusted.a\x00", "user.trusted.a\x00"},
		{"user.a\x00trusted.b", "user.a\x00"},
		{"user.a\x00user.b", "user.a\x00user.b"},
	}
	for _, tt := range tests {
		b := []byte(tt.in)
		if got := string(b[:dropTrustedNames(b)]); got != tt.want {
			t.Errorf("dropTrustedNames(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
