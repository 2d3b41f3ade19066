package fs

import (
	"fmt"
	"math/rand"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

// recomputeMemLocked recomputes what t.mem should be from every node the
// table can still reach (maps, handles, aliases' parents, plus extra nodes
// a caller knows are held) and every open handle, and checks structural
// invariants.
func recomputeMemLocked(tb testing.TB, t *table, extra []*node) int64 {
	tb.Helper()
	seen := map[*node]bool{}
	var work []*node
	add := func(n *node) {
		if n != nil && !seen[n] {
			seen[n] = true
			work = append(work, n)
		}
	}
	add(t.root)
	for _, n := range t.nodes {
		add(n)
	}
	for _, n := range t.byKey {
		add(n)
	}
	for _, n := range t.names {
		add(n)
	}
	for _, h := range t.handles {
		add(h.node)
	}
	for _, n := range extra {
		add(n)
	}
	var mem int64
	for _, h := range t.handles {
		mem += handleCost(h.dir != nil)
	}
	if t.reserved != 0 {
		tb.Fatalf("%d handle slots reserved with no request in flight", t.reserved)
	}
	for len(work) > 0 {
		n := work[len(work)-1]
		work = work[:len(work)-1]
		if n.gone {
			if len(n.aliases) != 0 {
				tb.Fatalf("gone node %d keeps %d aliases", n.id, len(n.aliases))
			}
			continue
		}
		if n != t.root {
			mem += nodeCharge
		}
		mem += aliasCharge * int64(len(n.aliases))
		for _, a := range n.aliases {
			add(a.parent)
		}
	}
	for k, n := range t.names {
		if n.gone {
			tb.Fatalf("names[%v] is a gone node", k)
		}
	}
	return mem
}

func checkMem(tb testing.TB, t *table, step string, extra ...*node) {
	tb.Helper()
	t.mu.Lock()
	defer t.mu.Unlock()
	if want := recomputeMemLocked(tb, t, extra); t.mem != want {
		tb.Fatalf("after %s: table.mem = %d, recomputed %d (diff %d)", step, t.mem, want, t.mem-want)
	}
}

// TestMemChargeMatchesTableRandomOps drives random LOOKUP/LINK/RENAME/
// UNLINK/FORGET/CREATE/OPENDIR/RELEASEDIR/INIT sequences (and host-side
// renames/links the guest does not see) and checks table.mem against a
// recomputation after every step, with a small budget so that the budget
// paths run too.
func TestMemChargeMatchesTableRandomOps(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 48 })
			if seed%2 == 0 {
				e.s.t.mu.Lock()
				e.s.t.maxMem = 12 * (nodeCharge + aliasCharge)
				e.s.t.mu.Unlock()
			}
			dirs := []string{"", "a", "b", "a/c"}
			for _, d := range dirs[1:] {
				must(t, "mkdir", os.MkdirAll(e.path(d), 0o755))
			}
			names := []string{"x", "y", "z", "w"}
			// ids the guest holds, with their lookup counts
			held := map[uint64]uint64{}
			dirID := map[string]uint64{"": fuse.RootID}
			type dirHandle struct{ node, fh uint64 }
			var dirHandles []dirHandle
			rel := func(d, n string) string {
				if d == "" {
					return n
				}
				return d + "/" + n
			}
			pickDir := func() (string, uint64) {
				d := dirs[rng.Intn(len(dirs))]
				id, ok := dirID[d]
				if !ok {
					return "", fuse.RootID
				}
				return d, id
			}
			for step := 0; step < 1500; step++ {
				d, did := pickDir()
				n := names[rng.Intn(len(names))]
				var what string
				switch op := rng.Intn(13); op {
				case 0, 1: // LOOKUP a dir or a file
					if rng.Intn(2) == 0 && d != "a/c" {
						for _, sub := range dirs[1:] {
							par, base := "", sub
							if sub == "a/c" {
								par, base = "a", "c"
							}
							if pid, ok := dirID[par]; ok {
								if en, err := e.c.Lookup(pid, base); err == nil && en.NodeID != 0 {
									dirID[sub] = en.NodeID
									held[en.NodeID]++
								}
							}
						}
						what = "LOOKUP dirs"
					} else {
						if en, err := e.c.Lookup(did, n); err == nil && en.NodeID != 0 {
							held[en.NodeID]++
						}
						what = "LOOKUP " + rel(d, n)
					}
				case 2: // CREATE + RELEASE
					en, fh, err := e.c.Create(did, n, unix.O_RDWR, 0o644)
					if err == nil {
						held[en.NodeID]++
						if rng.Intn(3) > 0 {
							e.c.Release(en.NodeID, fh, false)
						}
					}
					what = "CREATE"
				case 3: // LINK a held node
					for id := range held {
						if en, err := e.c.Link(id, did, n); err == nil {
							held[en.NodeID]++
						}
						break
					}
					what = "LINK"
				case 4, 5: // RENAME / RENAME2 exchange
					d2, did2 := pickDir()
					n2 := names[rng.Intn(len(names))]
					var flags uint32
					if rng.Intn(3) == 0 {
						flags = unix.RENAME_EXCHANGE
					}
					e.c.Rename(did, n, did2, n2, flags)
					what = fmt.Sprintf("RENAME %s -> %s (%d)", rel(d, n), rel(d2, n2), flags)
				case 6:
					e.c.Unlink(did, n)
					what = "UNLINK"
				case 7: // FORGET
					for id, c := range held {
						k := uint64(rng.Intn(int(c)) + 1)
						e.c.Forget(id, k)
						held[id] -= k
						if held[id] == 0 {
							delete(held, id)
						}
						break
					}
					what = "FORGET"
				case 8: // host-side link/rename the guest does not see
					d2 := dirs[rng.Intn(len(dirs))]
					n2 := names[rng.Intn(len(names))]
					if rng.Intn(2) == 0 {
						os.Link(e.path(rel(d, n)), e.path(rel(d2, n2)))
					} else {
						os.Rename(e.path(rel(d, n)), e.path(rel(d2, n2)))
					}
					what = "host link/rename"
				case 9: // host-side create
					os.WriteFile(e.path(rel(d, n)), nil, 0o644)
					what = "host create"
				case 10:
					if rng.Intn(8) == 0 {
						_, err := e.c.Init(fuseclient.LinuxInitFlags)
						must(t, "INIT", err)
						held = map[uint64]uint64{}
						dirID = map[string]uint64{"": fuse.RootID}
						dirHandles = nil
						what = "INIT"
					} else {
						e.c.Mkdir(did, n, 0o755)
						what = "MKDIR"
					}
				case 11: // a request in flight across INIT (as in reset_leak_test)
					if did == fuse.RootID || rng.Intn(4) != 0 {
						e.c.Rmdir(did, n)
						what = "RMDIR"
						break
					}
					p, errno := e.s.t.get(did)
					if errno != 0 {
						what = "get failed"
						break
					}
					_, err := e.c.Init(fuseclient.LinuxInitFlags)
					must(t, "INIT", err)
					held = map[uint64]uint64{}
					dirID = map[string]uint64{"": fuse.RootID}
					dirHandles = nil
					checkMem(t, e.s.t, "INIT with a request in flight", p)
					var st unix.Stat_t
					if m, errno := e.s.lookupName(p, n, &st); errno == 0 {
						checkMem(t, e.s.t, "lookup below a parent out of the table", p, m)
					}
					e.s.t.put(p)
					what = "in-flight LOOKUP across INIT"
				case 12: // OPENDIR (a listing read partly) or RELEASEDIR
					if len(dirHandles) > 0 && rng.Intn(2) == 0 {
						k := rng.Intn(len(dirHandles))
						e.c.Release(dirHandles[k].node, dirHandles[k].fh, true)
						dirHandles = append(dirHandles[:k], dirHandles[k+1:]...)
						what = "RELEASEDIR"
						break
					}
					if dh, err := e.c.Opendir(did); err == nil {
						e.c.Readdir(did, dh, 0, 128)
						dirHandles = append(dirHandles, dirHandle{did, dh})
					}
					what = "OPENDIR " + d
				}
				checkMem(t, e.s.t, fmt.Sprintf("step %d: %s", step, what))
			}
			_, err := e.c.Init(fuseclient.LinuxInitFlags)
			must(t, "INIT", err)
			checkMem(t, e.s.t, "final INIT")
			e.s.t.mu.Lock()
			mem := e.s.t.mem
			e.s.t.mu.Unlock()
			if mem != 0 {
				t.Fatalf("after a final INIT the table is charged %d", mem)
			}
		})
	}
}

// TestMemBudgetUnnamedNodesRegainNames: a node whose only remembered name
// was unlinked while the file lives on under another host name is charged
// nodeCharge only; once the budget is spent, a LOOKUP of that other name
// gives the node a name again without any budget check (setAliasLocked
// replaces an older name only when the node already has one). A guest can
// so fill the budget with nameless nodes (256 each) and then add 415 to
// each: the charge ends up well past maxMem, bounded only by the fd share
// (9/8 maxOpen nameless nodes), not by maxMem.
func TestMemBudgetUnnamedNodesRegainNames(t *testing.T) {
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 4096 })
	const fits = 40
	budget := int64(fits * (nodeCharge + aliasCharge))
	e.s.t.mu.Lock()
	e.s.t.maxMem = budget
	e.s.t.mu.Unlock()
	made := 0
	for i := 0; i < 1000; i++ {
		f, g := fmt.Sprintf("f%d", i), fmt.Sprintf("g%d", i)
		must(t, "create", os.WriteFile(e.path(f), nil, 0o644))
		must(t, "link", os.Link(e.path(f), e.path(g)))
		if _, err := e.c.Lookup(fuse.RootID, f); err != nil {
			os.Remove(e.path(f))
			os.Remove(e.path(g))
			break
		}
		made++
		must(t, "UNLINK", e.c.Unlink(fuse.RootID, f)) // node keeps its lookup, loses its name
	}
	for i := 0; i < made; i++ {
		e.lookup(fuse.RootID, fmt.Sprintf("g%d", i))
	}
	e.s.t.mu.Lock()
	mem := e.s.t.mem
	e.s.t.mu.Unlock()
	t.Logf("%d nodes, charged %d against a budget of %d (%.2fx)", made, mem, budget, float64(mem)/float64(budget))
	if mem > budget+aliasCharge {
		t.Fatalf("guest drove the table's charge to %d, budget %d", mem, budget)
	}
}
