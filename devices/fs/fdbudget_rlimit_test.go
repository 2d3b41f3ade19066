package fs

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestFdBudgetWithinRlimit (from review, helper-85; fixed: the parts add
// up to the budget, and the reserve covers the vhost-user back-end's
// memory slots and eventfds): the server split its fd budget
// (RLIMIT_NOFILE less a fixed reserve of 64) into three quarters for node
// O_PATH fds and a quarter for handles, but lets nodes that cannot be
// closed (unnamed: the guest unlinked them and never sent FORGET) go an
// eighth past the node share. 3/4*9/8 + 1/4 = 35/32 of the budget: past
// about 700 fds the overshoot is larger than the reserve. A hostile guest
// OPENs one file as many times as it may (every handle an fd), then
// MKNODs and UNLINKs regular files without FORGET: the server's own
// limits (ENFILE) are never reached; the process runs out of descriptors
// first (EMFILE), at which point every openat2 and every fd the vhost-user
// connection must receive (kick/call eventfds after a reset, memory slots)
// fails. Under the sandbox (RLIMIT_NOFILE 16384) the server allows 17850.
func TestFdBudgetWithinRlimit(t *testing.T) {
	for _, tc := range []struct {
		nofile uint64
	}{
		{2048},
		{4096},
	} {
		t.Run(fmt.Sprintf("RLIMIT_NOFILE=%d", tc.nofile), func(t *testing.T) {
			var old unix.Rlimit
			must(t, "getrlimit", unix.Prlimit(0, unix.RLIMIT_NOFILE, nil, &old))
			if old.Max < tc.nofile {
				t.Skipf("hard RLIMIT_NOFILE %d", old.Max)
			}
			lim := unix.Rlimit{Cur: tc.nofile, Max: old.Max}
			must(t, "setrlimit", unix.Prlimit(0, unix.RLIMIT_NOFILE, &lim, nil))
			defer unix.Prlimit(0, unix.RLIMIT_NOFILE, &old, nil)

			e := newEnv(t, 0, nil) // MaxOpenFiles from RLIMIT_NOFILE, as the plugin does
			h, err := e.c.Mknod(fuse.RootID, "held", unix.S_IFREG|0o644, 0)
			must(t, "MKNOD held", err)
			handles := 0
			for {
				_, err := e.c.Open(h.NodeID, unix.O_RDONLY)
				if err != nil {
					if !errors.Is(err, syscall.ENFILE) {
						t.Fatalf("OPEN #%d: %v, want ENFILE from the handle limit", handles+1, err)
					}
					break
				}
				handles++
			}
			var final error
			made := 0
			for i := 0; i < int(tc.nofile)*2; i++ {
				name := fmt.Sprintf("u%d", i)
				if _, err := e.c.Mknod(fuse.RootID, name, unix.S_IFREG|0o644, 0); err != nil {
					final = err
					break
				}
				must(t, "UNLINK", e.c.Unlink(fuse.RootID, name))
				made++
			}
			open, _ := e.s.t.fdStats()
			t.Logf("%d handles, %d unnamed nodes, %d node fds, RLIMIT_NOFILE %d", handles, made, open, tc.nofile)
			if !errors.Is(final, syscall.ENFILE) {
				t.Fatalf("after %d handles and %d unnamed nodes the guest got %v, want ENFILE: the process ran out of descriptors before the server's own limits", handles, made, final)
			}
		})
	}
}
