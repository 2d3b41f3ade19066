package fs

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
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

// TestNodeMemoryWithinNodeBytes: the node limit under the sandbox's
// RLIMIT_DATA (1 GiB) must keep the node table within it at worst. With
// 2^20 nodes it did not: a guest that makes files with long names and
// maxAliases hard links each, and LOOKUPs them all without FORGET, made the
// Go heap outgrow the limit, the runtime died with "out of memory" and the
// share was gone (from review). Measured on a sample of such nodes (live
// heap per node, twice that before a collection) against nodeBytes, and
// extrapolated to maxNodesFor's limit (the real thing needs a quarter of a
// million host inodes).
func TestNodeMemoryWithinNodeBytes(t *testing.T) {
	const dataLimit = 1 << 30 // sandbox.DefaultDataBytes
	dir := t.TempDir()
	const sample = 4000
	long := func(i, k int) string { return fmt.Sprintf("%06d-%d-", i, k) + strings.Repeat("n", 255-9) }
	for i := 0; i < sample; i++ {
		p := dir + "/" + long(i, 0)
		f, err := os.Create(p)
		must(t, "create", err)
		f.Close()
		for k := 1; k < maxAliases; k++ {
			must(t, "link", os.Link(p, dir+"/"+long(i, k)))
		}
	}
	e := newEnvDir(t, dir, 0, func(c *ServerConfig) { c.MaxOpenFiles = 1000 })
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := 0; i < sample; i++ {
		for k := 0; k < maxAliases; k++ {
			e.lookup(fuse.RootID, long(i, k))
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	n, _ := e.live()
	per := float64(m1.HeapAlloc-m0.HeapAlloc) / float64(n-1)
	// With GOGC=100 the heap grows to twice the live data before a
	// collection.
	if 2*per > nodeBytes {
		t.Errorf("a node costs %.0f bytes of live heap, ~%.0f before a collection: more than nodeBytes (%d)", per, 2*per, nodeBytes)
	}
	limit := maxNodesFor(dataLimit)
	live := per * float64(limit)
	t.Logf("%.0f bytes of live heap per node; %d nodes: %.0f MiB live, ~%.0f MiB heap, RLIMIT_DATA %d MiB",
		per, limit, live/(1<<20), 2*live/(1<<20), dataLimit>>20)
	if 2*live > dataLimit {
		t.Fatalf("the node table alone can need ~%.0f MiB of heap, beyond the plugin's %d MiB RLIMIT_DATA", 2*live/(1<<20), dataLimit>>20)
	}
	if got := maxNodesFor(unix.RLIM_INFINITY); got != DefaultMaxNodes {
		t.Errorf("no data limit: %d nodes, want DefaultMaxNodes", got)
	}
}
