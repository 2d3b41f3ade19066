package fs

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
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

// TestNodeCharges: what the table charges a node and its names against
// its memory budget must cover the live heap they hold, for a typical
// node (one short name) and the worst (maxAliases names of 255 bytes); and
// the budget under the sandbox's RLIMIT_DATA, doubled for the garbage
// collector's headroom, must stay within the limit. With 2^20 nodes and no
// budget a guest that LOOKUPs without FORGET made the Go heap outgrow the
// limit and the share died (from review); with every node counted at its
// worst (4 KiB) a typical share held only 229 000 inodes, ENFILE beyond
// (from review).
func TestNodeCharges(t *testing.T) {
	const dataLimit = 1 << 30 // sandbox.DefaultDataBytes
	for _, tc := range []struct {
		name    string
		aliases int
		long    bool
	}{
		{"typical: one short name", 1, false},
		{"worst: maxAliases names of 255 bytes", maxAliases, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			const sample = 4000
			name := func(i, k int) string {
				if tc.long {
					return fmt.Sprintf("%06d-%d-", i, k) + strings.Repeat("n", 255-9)
				}
				return fmt.Sprintf("file%06d-%d.c", i, k)
			}
			for i := 0; i < sample; i++ {
				p := dir + "/" + name(i, 0)
				f, err := os.Create(p)
				must(t, "create", err)
				f.Close()
				for k := 1; k < tc.aliases; k++ {
					must(t, "link", os.Link(p, dir+"/"+name(i, k)))
				}
			}
			e := newEnvDir(t, dir, 0, func(c *ServerConfig) { c.MaxOpenFiles = 1000 })
			runtime.GC()
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			for i := 0; i < sample; i++ {
				for k := 0; k < tc.aliases; k++ {
					e.lookup(fuse.RootID, name(i, k))
				}
			}
			runtime.GC()
			runtime.ReadMemStats(&m1)
			n, _ := e.live()
			per := float64(m1.HeapAlloc-m0.HeapAlloc) / float64(n-1)
			e.s.t.mu.Lock()
			charged := float64(e.s.t.mem) / float64(n-1)
			e.s.t.mu.Unlock()
			budget := memBudgetFor(dataLimit)
			t.Logf("%.0f bytes of live heap per node, charged %.0f; under %d MiB RLIMIT_DATA: %.0f nodes", per, charged, dataLimit>>20, float64(budget)/charged)
			if want := float64(nodeCharge + tc.aliases*aliasCharge); charged != want {
				t.Errorf("charged %.0f bytes per node, want %.0f", charged, want)
			}
			if per > charged {
				t.Errorf("a node holds %.0f bytes of live heap, more than its charge (%.0f)", per, charged)
			}
			if 2*budget > dataLimit {
				t.Errorf("budget %d MiB: twice that is beyond the plugin's %d MiB RLIMIT_DATA", budget>>20, dataLimit>>20)
			}
		})
	}
	if got := memBudgetFor(unix.RLIM_INFINITY); got != math.MaxInt64 {
		t.Errorf("no data limit: budget %d", got)
	}
}

// TestMemoryBudgetRefusesNewNodes: once the budget is spent a new node is
// refused (ENFILE), a request that would make a host file for one makes
// nothing, and a known node's extra names replace its older ones instead
// of adding to the charge; forgetting makes room again. Before, MKDIR,
// MKNOD, SYMLINK and CREATE refused for lack of room had already made
// their file on the host (from review).
func TestMemoryBudgetRefusesNewNodes(t *testing.T) {
	e := newEnv(t, 0, nil)
	const fits = 10
	e.s.t.mu.Lock()
	e.s.t.maxMem = fits * (nodeCharge + aliasCharge)
	e.s.t.mu.Unlock()
	for i := 0; i < 2*fits; i++ {
		must(t, "create", os.WriteFile(filepath.Join(e.dir, fmt.Sprintf("f%d", i)), nil, 0o644))
	}
	var ids []uint64
	refused := 0
	for i := 0; i < 2*fits; i++ {
		en, err := e.c.Lookup(fuse.RootID, fmt.Sprintf("f%d", i))
		if errors.Is(err, syscall.ENFILE) {
			refused++
			continue
		}
		must(t, "LOOKUP", err)
		ids = append(ids, en.NodeID)
	}
	if len(ids) != fits || refused != fits {
		t.Fatalf("%d nodes made, %d refused; the budget holds %d", len(ids), refused, fits)
	}
	for _, tc := range []struct {
		op   string
		make func(name string) error
	}{
		{"MKDIR", func(n string) error { _, err := e.c.Mkdir(fuse.RootID, n, 0o755); return err }},
		{"MKNOD", func(n string) error { _, err := e.c.Mknod(fuse.RootID, n, unix.S_IFIFO|0o644, 0); return err }},
		{"SYMLINK", func(n string) error { _, err := e.c.Symlink(fuse.RootID, n, "target"); return err }},
		{"CREATE", func(n string) error { _, _, err := e.c.Create(fuse.RootID, n, unix.O_RDWR, 0o644); return err }},
	} {
		name := "new-" + tc.op
		if err := tc.make(name); !errors.Is(err, syscall.ENFILE) {
			t.Errorf("%s with the budget spent: %v, want ENFILE", tc.op, err)
		}
		if _, err := os.Lstat(filepath.Join(e.dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s refused with ENFILE left %s on the host (%v)", tc.op, name, err)
		}
	}
	// Another name for a known node: no new charge.
	e.s.t.mu.Lock()
	before := e.s.t.mem
	e.s.t.mu.Unlock()
	must(t, "link", os.Link(filepath.Join(e.dir, "f0"), filepath.Join(e.dir, "f0-link")))
	e.lookup(fuse.RootID, "f0-link")
	e.s.t.mu.Lock()
	after := e.s.t.mem
	e.s.t.mu.Unlock()
	if after > before {
		t.Errorf("a second name with the budget spent raised the charge from %d to %d", before, after)
	}
	must(t, "FORGET", e.c.Forget(ids[1], 1))
	if _, err := e.c.Mkdir(fuse.RootID, "after-forget", 0o755); err != nil {
		t.Errorf("MKDIR after a FORGET made room: %v", err)
	}
}
