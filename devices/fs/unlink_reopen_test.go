package fs

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

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
//
// A victim that cannot be reopened at the cap is not removed (ENFILE):
// once its name was gone it could never be reopened, and the guest's
// requests by its id were ESTALE (TestRemoveAtFdCapKeepsVictim). Once
// the guest forgets its nodes the removes go through.
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
			var refused []string
			for i := 0; i < files; i++ {
				name := fmt.Sprintf("v%d", i)
				err := tc.remove(e, name)
				if errors.Is(err, syscall.ENFILE) {
					refused = append(refused, name)
					if _, err := os.Lstat(e.path(name)); err != nil {
						t.Fatalf("%s refused with ENFILE removed %s all the same", tc.name, name)
					}
					continue
				}
				must(t, tc.name, err)
			}
			open, _ := e.s.t.fdStats()
			grown := procFds(t) - before
			limit := e.s.t.maxOpen + max(e.s.t.maxOpen/8, 1)
			t.Logf("node fds: %d after LOOKUPs, %d after %d %ss, %d refused (cap %d, whole budget %d); process fds grew by %d", open0, open, files, tc.name, len(refused), limit, budget, grown)
			if open > limit || grown > budget {
				t.Fatalf("guest made the server hold %d node fds (cap %d, fd budget %d)", open, limit, budget)
			}
			// Forgetting the removed nodes makes room for the rest.
			for id := uint64(2); id < 2+files; id++ {
				must(t, "FORGET", e.c.Forget(id, 1))
			}
			for _, name := range refused {
				must(t, tc.name+" after FORGET", tc.remove(e, name))
			}
		})
	}
}

// TestRemoveAtFdCapKeepsVictim: at the fd budget's cap (nodes that cannot
// be closed fill it) the server cannot reopen a closed node. UNLINK,
// RMDIR and a RENAME over a name the guest holds went ahead without the
// victim's fd: the node, closed and without a name, could never be
// reopened, so GETATTR, SETATTR and the xattr calls by its id failed
// (ENFILE at the cap, ESTALE once there was room again) for a file the
// guest still had open, where the host would have served them (found in
// review, helper-141). The remove is now ENFILE and changes nothing; once
// the guest forgets nodes it goes through and the victim stays reachable.
// A RENAME_EXCHANGE needs no fd (the victim keeps a name) and goes
// through at the cap.
func TestRemoveAtFdCapKeepsVictim(t *testing.T) {
	for _, tc := range []struct {
		name   string
		dir    bool
		remove func(e *env, name string) error
	}{
		{"UNLINK", false, func(e *env, name string) error { return e.c.Unlink(fuse.RootID, name) }},
		{"RMDIR", true, func(e *env, name string) error { return e.c.Rmdir(fuse.RootID, name) }},
		{"RENAME over", false, func(e *env, name string) error { return e.c.Rename(fuse.RootID, "src", fuse.RootID, name, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 40 })
			must(t, "host create", os.WriteFile(e.path("src"), nil, 0o644))
			must(t, "host create", os.WriteFile(e.path("other"), nil, 0o644))
			if tc.dir {
				must(t, "host mkdir", os.Mkdir(e.path("v"), 0o755))
			} else {
				must(t, "host create", os.WriteFile(e.path("v"), []byte("data"), 0o644))
			}
			v := e.lookup(fuse.RootID, "v")
			e.lookup(fuse.RootID, "src")
			e.lookup(fuse.RootID, "other")
			var fh uint64
			var err error
			if tc.dir {
				fh, err = e.c.Opendir(v.NodeID)
			} else {
				fh, err = e.c.Open(v.NodeID, unix.O_RDWR)
			}
			must(t, "open the victim", err)
			// Idle nodes push the victim's fd out, then nameless nodes
			// (created, unlinked, never forgotten) fill the cap.
			for i := 0; i < 40; i++ {
				name := fmt.Sprintf("p%d", i)
				must(t, "host create", os.WriteFile(e.path(name), nil, 0o644))
				e.lookup(fuse.RootID, name)
			}
			var nameless []uint64
			for i := 0; ; i++ {
				name := fmt.Sprintf("f%d", i)
				en, h, err := e.c.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
				if errors.Is(err, syscall.ENFILE) {
					break
				}
				must(t, "CREATE", err)
				must(t, "RELEASE", e.c.Release(en.NodeID, h, false))
				must(t, "UNLINK", e.c.Unlink(fuse.RootID, name))
				nameless = append(nameless, en.NodeID)
			}
			e.s.t.mu.Lock()
			victimClosed := e.s.t.nodes[v.NodeID].fd < 0
			e.s.t.mu.Unlock()
			if !victimClosed {
				t.Fatal("set-up: the victim's node kept its fd")
			}
			must(t, "RENAME_EXCHANGE at the cap", e.c.Rename(fuse.RootID, "src", fuse.RootID, "other", unix.RENAME_EXCHANGE))

			wantErrno(t, tc.name+" of a closed node at the cap", tc.remove(e, "v"), syscall.ENFILE)
			if _, err := os.Lstat(e.path("v")); err != nil {
				t.Fatalf("%s refused with ENFILE removed the name all the same: %v", tc.name, err)
			}
			for _, id := range nameless {
				must(t, "FORGET", e.c.Forget(id, 1))
			}
			must(t, tc.name+" after FORGET", tc.remove(e, "v"))
			if _, err := e.c.Getattr(v.NodeID); err != nil {
				t.Errorf("GETATTR of the removed victim, still open: %v", err)
			}
			if !tc.dir {
				_, err := e.c.Setattr(v.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o600})
				must(t, "SETATTR of the removed victim, still open", err)
			}
			must(t, "RELEASE", e.c.Release(v.NodeID, fh, tc.dir))
		})
	}
}
