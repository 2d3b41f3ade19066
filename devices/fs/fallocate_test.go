package fs

import (
	"fmt"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFallocateBadModeChangesNothing: a FALLOCATE whose mode fallocate(2)
// refuses on every file system (PUNCH_HOLE without KEEP_SIZE, two
// operations at once, KEEP_SIZE with COLLAPSE_RANGE, an unknown bit) is
// EOPNOTSUPP, never a success, and is refused before anything changes:
// a nosuid share cleared the file's set-id bits and only then had the
// host refuse the mode (found in review, helper-141). A mode the host
// file system does not support comes back as the host's error.
func TestFallocateBadModeChangesNothing(t *testing.T) {
	e := newEnv(t, 0, nil) // nosuid: FALLOCATE clears the set-id bits
	hostFile(t, e.path("f"), 0o4755)
	en, fh := openF(t, e, unix.O_RDWR)
	const (
		keep     = unix.FALLOC_FL_KEEP_SIZE
		punch    = unix.FALLOC_FL_PUNCH_HOLE
		zero     = unix.FALLOC_FL_ZERO_RANGE
		collapse = unix.FALLOC_FL_COLLAPSE_RANGE
		insert   = unix.FALLOC_FL_INSERT_RANGE
		unshare  = unix.FALLOC_FL_UNSHARE_RANGE
	)
	for _, mode := range []uint32{punch, punch | zero | keep, collapse | keep, insert | keep, collapse | insert, zero | unshare, unshare | punch | keep, 0x04 /* NO_HIDE_STALE */, 1 << 20} {
		err := e.c.Fallocate(en.NodeID, fh, 0, 4096, mode)
		wantErrno(t, fmt.Sprintf("FALLOCATE mode %#x", mode), err, syscall.EOPNOTSUPP)
		if got := hostPerm(t, e.path("f")); got != 0o4755 {
			t.Fatalf("FALLOCATE mode %#x refused, but the host file's mode went from 04755 to %04o", mode, got)
		}
	}
	for _, mode := range []uint32{0, keep, zero, zero | keep, punch | keep, unshare, unshare | keep, collapse, insert} {
		if !fallocModeOK(mode) {
			t.Errorf("mode %#x, which fallocate(2) takes, refused", mode)
		}
	}
	// A good mode goes to the host (and clears the bits on a nosuid share).
	must(t, "FALLOCATE punch|keep", e.c.Fallocate(en.NodeID, fh, 0, 4096, punch|keep))
	if got := hostPerm(t, e.path("f")); got != 0o755 {
		t.Errorf("FALLOCATE on a nosuid share left mode %04o", got)
	}
	must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
}
