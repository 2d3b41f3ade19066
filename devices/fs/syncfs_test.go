package fs

import (
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestSyncfs: Linux's virtiofs sends SYNCFS (fuse_syncfs_in, 8 bytes of
// padding) for syncfs(2) and sync -f, and since 5.17 returns the reply's
// error to the caller (ENOSYS only turns it off). The share's root is an
// O_PATH descriptor, which syncfs refuses with EBADF, so the server must
// sync through a descriptor opened for reading.
func TestSyncfs(t *testing.T) {
	for _, tc := range []struct {
		name     string
		readOnly bool
	}{
		{"writable share", false},
		{"read-only share", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 0, func(c *ServerConfig) { c.ReadOnly = tc.readOnly })
			if _, err := e.c.Call(fuse.OpSyncfs, fuse.RootID, 64, make([]byte, 8)); err != nil {
				t.Fatalf("SYNCFS: %v, want success", err)
			}
		})
	}
}
