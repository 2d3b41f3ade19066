package fs

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

// TestInitDuringLookupFreesParent: a second INIT (or DESTROY) while a
// LOOKUP is in flight leaked the parent directory's O_PATH fd for the life
// of the process, one per try (from review). The LOOKUP holds its parent P; reset()
// drops P from the table (it is pinned, so not freed); the LOOKUP then
// inserts the child with an alias that pins P. The next reset() clears the
// child's aliases and decrements P's pins to 0, but only called
// maybeFreeLocked on nodes still in the table, and P no longer was: P and
// its fd were never freed. reset now frees the parents it unpins too.
//
// The interleaving is driven step by step here with the server's own
// calls, exactly as the LOOKUP's handler makes them (opLookup: get,
// lookupName, put), with INIT coming from another worker in between.
func TestInitDuringLookupFreesParent(t *testing.T) {
	e := newEnv(t, 0, nil)
	must(t, "mkdir", os.Mkdir(e.path("d"), 0o755))
	must(t, "write", os.WriteFile(e.path("d/c"), nil, 0o644))
	base := procFds(t)
	const tries = 50
	for i := 0; i < tries; i++ {
		d := e.lookup(fuse.RootID, "d")
		p, errno := e.s.t.get(d.NodeID) // LOOKUP(d, "c") starts
		if errno != 0 {
			t.Fatalf("get: %v", errno)
		}
		_, err := e.c.Init(fuseclient.LinuxInitFlags) // INIT on another worker
		must(t, "INIT", err)
		var st unix.Stat_t
		if _, errno := e.s.lookupName(p, "c", &st); errno != 0 { // LOOKUP carries on
			t.Fatalf("lookupName: %v", errno)
		}
		e.s.t.put(p) // LOOKUP ends
	}
	_, err := e.c.Init(fuseclient.LinuxInitFlags)
	must(t, "INIT", err)
	must(t, "DESTROY", e.c.Destroy())
	n, h := e.live()
	open, _ := e.s.t.fdStats()
	leaked := procFds(t) - base
	t.Logf("after DESTROY: %d nodes, %d handles, node fds counted open %d, process fds +%d", n, h, open, leaked)
	if open != 0 || leaked > 0 {
		t.Fatalf("%d INITs racing a LOOKUP leaked %d fds (table counts %d open node fds with only the root left)", tries, leaked, open)
	}
}

// TestInitRaceLeavesNoFds is the same through the public
// interface only: workers LOOKUP/OPEN/READDIRPLUS while one of them sends
// INIT now and then (as a hostile guest can on a queue served by several
// workers). After a final DESTROY the table holds only the root, and no
// O_PATH fd may stay open (before the fix 10 to 30 did; the step-by-step
// test above is the deterministic one).
func TestInitRaceLeavesNoFds(t *testing.T) {
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxOpenFiles = 40 })
	for i := 0; i < 30; i++ {
		must(t, "write", os.WriteFile(e.path(fmt.Sprintf("f%d", i)), []byte("data"), 0o644))
		must(t, "mkdir", os.MkdirAll(e.path(fmt.Sprintf("d%d/s", i)), 0o755))
	}
	base := procFds(t)
	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := e.c
			for i := 0; time.Now().Before(stop); i++ {
				if en, err := c.Lookup(fuse.RootID, fmt.Sprintf("f%d", (i*7+w)%30)); err == nil {
					if fh, err := c.Open(en.NodeID, unix.O_RDONLY); err == nil {
						c.Read(en.NodeID, fh, 0, 10)
						c.Release(en.NodeID, fh, false)
					}
					c.Forget(en.NodeID, 1)
				}
				if d, err := c.Lookup(fuse.RootID, fmt.Sprintf("d%d", i%30)); err == nil {
					if s, err := c.Lookup(d.NodeID, "s"); err == nil {
						if dh, err := c.Opendir(s.NodeID); err == nil {
							c.Readdirplus(s.NodeID, dh, 0, 4096)
							c.Release(s.NodeID, dh, true)
						}
						c.Forget(s.NodeID, 1)
					}
					c.Forget(d.NodeID, 1)
				}
				if w == 0 && i%5 == 0 {
					c.Init(fuseclient.LinuxInitFlags)
				}
			}
		}(w)
	}
	wg.Wait()
	_, err := e.c.Init(fuseclient.LinuxInitFlags)
	must(t, "INIT", err)
	must(t, "DESTROY", e.c.Destroy())
	open, _ := e.s.t.fdStats()
	leaked := procFds(t) - base
	if open != 0 || leaked > 0 {
		t.Fatalf("after DESTROY only the root is left, but %d node fds are counted open and %d process fds leaked", open, leaked)
	}
}

// procFds counts this process's open file descriptors.
func procFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	must(t, "read /proc/self/fd", err)
	return len(ents)
}
