package fs

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestUnnamedNodesWithinFdBudget: a node without a name is never closed
// for the fd budget (nodes.go evictLocked). A guest that CREATEs, RELEASEs
// and UNLINKs files but never FORGETs them made the server hold one O_PATH
// fd per file, without bound: past the node share of the budget, past the
// whole budget, up to RLIMIT_NOFILE (then every openat2, and every fd the
// vhost-user connection must receive, failed with EMFILE). Now a new node
// beyond the budget's node share (and a margin) is refused with ENFILE,
// and the fds stay within the budget. (From review.)
func TestUnnamedNodesWithinFdBudget(t *testing.T) {
	const budget = 40 // MaxOpenFiles: 30 node fds, 10 handles
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = budget })
	before := procFds(t)
	const files = 300
	refused := 0
	for i := 0; i < files; i++ {
		name := fmt.Sprintf("f%d", i)
		en, fh, err := e.c.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
		if errors.Is(err, syscall.ENFILE) {
			refused++
			continue
		}
		must(t, "CREATE", err)
		must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
		must(t, "UNLINK", e.c.Unlink(fuse.RootID, name))
		// no FORGET: a hostile guest keeps the reference
	}
	open, _ := e.s.t.fdStats()
	grown := procFds(t) - before
	t.Logf("node fds open: %d (node share %d, whole budget %d); process fds grew by %d", open, e.s.t.maxOpen, budget, grown)
	if open > budget || grown > budget {
		t.Fatalf("guest made the server hold %d node fds (%d new process fds) with an fd budget of %d", open, grown, budget)
	}
	if refused == 0 {
		t.Error("no CREATE refused with ENFILE")
	}
	// Forgetting them makes room again.
	for id := uint64(2); id < 2+files; id++ {
		must(t, "FORGET", e.c.Forget(id, 1))
	}
	if _, _, err := e.c.Create(fuse.RootID, "after", unix.O_RDWR, 0o644); err != nil {
		t.Errorf("CREATE after the guest forgot its unlinked files: %v", err)
	}
}

