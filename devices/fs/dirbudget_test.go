package fs

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestDirHandlesWithinMemBudget: each open directory keeps a 16 KiB
// getdents64 buffer, and a partly read listing keeps its unread entries
// in it; none of that was charged to the memory budget, so a guest that
// opened directories and read each a little pinned 16 KiB of heap per
// handle beyond the budget, up to MaxHandles (found in review,
// helper-141). Handles are now charged (handleCost): once the budget is
// spent OPENDIR and OPEN are ENFILE, and a RELEASEDIR makes room again.
func TestDirHandlesWithinMemBudget(t *testing.T) {
	e := newEnv(t, 0, nil)
	for i := 0; i < 50; i++ {
		must(t, "create", os.WriteFile(e.path(fmt.Sprintf("f%02d", i)), nil, 0o644))
	}
	f := e.lookup(fuse.RootID, "f00")
	const fits = 8
	e.s.t.mu.Lock()
	budget := e.s.t.mem + fits*dirHandleCharge
	e.s.t.maxMem = budget
	e.s.t.mu.Unlock()
	var dhs []uint64
	for i := 0; i < 4*fits; i++ {
		dh, err := e.c.Opendir(fuse.RootID)
		if errors.Is(err, syscall.ENFILE) {
			break
		}
		must(t, "OPENDIR", err)
		dhs = append(dhs, dh)
		_, err = e.c.Readdir(fuse.RootID, dh, 0, 256) // a few entries: the rest stay buffered
		must(t, "READDIR", err)
	}
	e.s.t.mu.Lock()
	mem := e.s.t.mem
	e.s.t.mu.Unlock()
	t.Logf("%d directories open, charged %d of a budget of %d", len(dhs), mem, budget)
	if len(dhs) != fits || mem > budget {
		t.Fatalf("%d directories open (%d fit the budget), charged %d of %d", len(dhs), fits, mem, budget)
	}
	if _, err := e.c.Open(f.NodeID, unix.O_RDONLY); !errors.Is(err, syscall.ENFILE) {
		t.Errorf("OPEN with the budget spent: %v, want ENFILE", err)
	}
	must(t, "RELEASEDIR", e.c.Release(fuse.RootID, dhs[0], true))
	fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN after a RELEASEDIR made room", err)
	must(t, "RELEASE", e.c.Release(f.NodeID, fh, false))
	dh, err := e.c.Opendir(fuse.RootID)
	must(t, "OPENDIR after a RELEASEDIR made room", err)
	dhs = append(dhs[1:], dh)
	for _, dh := range dhs {
		must(t, "RELEASEDIR", e.c.Release(fuse.RootID, dh, true))
	}
	e.s.t.mu.Lock()
	left := e.s.t.mem
	e.s.t.mu.Unlock()
	if left != budget-fits*dirHandleCharge {
		t.Errorf("after every RELEASEDIR the table is charged %d, was %d before any OPENDIR", left, budget-fits*dirHandleCharge)
	}
}

// TestHandleCharges: what a handle is charged covers the live heap it
// holds: a file handle, and a directory handle whose listing was read
// partly (its buffer in use).
func TestHandleCharges(t *testing.T) {
	for _, dir := range []bool{false, true} {
		t.Run(map[bool]string{false: "file", true: "directory"}[dir], func(t *testing.T) {
			const sample = 2000
			e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 4 * sample; c.MaxHandles = sample })
			for i := 0; i < 20; i++ {
				must(t, "create", os.WriteFile(e.path(fmt.Sprintf("f%02d", i)), nil, 0o644))
			}
			f := e.lookup(fuse.RootID, "f00")
			runtime.GC()
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			e.s.t.mu.Lock()
			mem0 := e.s.t.mem
			e.s.t.mu.Unlock()
			for i := 0; i < sample; i++ {
				if dir {
					dh, err := e.c.Opendir(fuse.RootID)
					must(t, "OPENDIR", err)
					_, err = e.c.Readdir(fuse.RootID, dh, 0, 256)
					must(t, "READDIR", err)
				} else {
					_, err := e.c.Open(f.NodeID, unix.O_RDONLY)
					must(t, "OPEN", err)
				}
			}
			runtime.GC()
			runtime.ReadMemStats(&m1)
			e.s.t.mu.Lock()
			charged := float64(e.s.t.mem-mem0) / sample
			e.s.t.mu.Unlock()
			per := float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc)) / sample
			t.Logf("%.0f bytes of live heap per handle, charged %.0f", per, charged)
			if want := float64(handleCost(dir)); charged != want {
				t.Errorf("charged %.0f bytes per handle, want %.0f", charged, want)
			}
			if per > charged {
				t.Errorf("a handle holds %.0f bytes of live heap, more than its charge (%.0f)", per, charged)
			}
		})
	}
}
