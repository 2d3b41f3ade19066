package fs

import (
	"fmt"
	"os"
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestUnlinkAfterReopenWithinFdCap (from review, helper-85; fixed: a
// reopen needs room as a new node does): the cap on node fds that cannot
// be closed (maxOpen plus an eighth; TestUnnamedNodesWithinFdBudget) was
// checked only when a node was inserted. A hostile guest LOOKUPs many
// files without FORGET (idle ones lose their fds to the budget, which is
// fine), then UNLINKs (or RMDIRs, or RENAMEs another file over) each of
// them: the server first reopens the victim (getName -> acquire ->
// setFdLocked, no room check) so it stays reachable, and once its name is
// gone it can never be closed again. Every victim keeps one fd, without
// bound but the node limit: the fd budget is exceeded by as many files as
// the guest cares to look up, up to RLIMIT_NOFILE (then EMFILE for every
// openat2 and every fd the vhost-user connection must receive).
func TestUnlinkAfterReopenWithinFdCap(t *testing.T) {
	const budget = 40 // MaxOpenFiles: 30 node fds (+3 that cannot be closed), 10 handles
	const files = 200
	for _, tc := range []struct {
		name   string
		mkHost func(p string) error
		remove func(e *env, name string) error
	}{
		{"UNLINK", func(p string) error { return os.WriteFile(p, nil, 0o644) },
			func(e *env, name string) error { return e.c.Unlink(fuse.RootID, name) }},
		{"RMDIR", func(p string) error { return os.Mkdir(p, 0o755) },
			func(e *env, name string) error { return e.c.Rmdir(fuse.RootID, name) }},
		{"RENAME over", func(p string) error {
			if err := os.WriteFile(p+".new", nil, 0o644); err != nil {
				return err
			}
			return os.WriteFile(p, nil, 0o644)
		}, func(e *env, name string) error { return e.c.Rename(fuse.RootID, name+".new", fuse.RootID, name, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = budget })
			for i := 0; i < files; i++ {
				must(t, "host create", tc.mkHost(e.path(fmt.Sprintf("v%d", i))))
			}
			for i := 0; i < files; i++ {
				e.lookup(fuse.RootID, fmt.Sprintf("v%d", i)) // no FORGET
			}
			open0, _ := e.s.t.fdStats()
			before := procFds(t)
			for i := 0; i < files; i++ {
				must(t, tc.name, tc.remove(e, fmt.Sprintf("v%d", i)))
			}
			open, _ := e.s.t.fdStats()
			grown := procFds(t) - before
			limit := e.s.t.maxOpen + max(e.s.t.maxOpen/8, 1)
			t.Logf("node fds: %d after LOOKUPs, %d after %d %ss (cap %d, whole budget %d); process fds grew by %d", open0, open, files, tc.name, limit, budget, grown)
			if open > limit || grown > budget {
				t.Fatalf("guest made the server hold %d node fds (cap %d, fd budget %d)", open, limit, budget)
			}
		})
	}
}
