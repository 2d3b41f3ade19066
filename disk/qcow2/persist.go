package qcow2

import (
	"fmt"
	"sort"
)

// Metadata and a plugin that dies.
//
// A guest's write is acknowledged once its data and the metadata that
// reaches it are in the image file: in the host's page cache, not
// necessarily on stable storage (that is what FLUSH is for). A plugin
// killed at any instant (SIGKILL) leaves exactly the writes (pwrite) it had
// issued, in order, with at most the last one cut short on a page
// boundary; the host and the guest live on, and a new plugin opens the
// image and must find every acknowledged write. So the metadata of a
// request is written before the request completes (persist), and in an
// order that keeps the image free of corruption after any prefix of those
// writes (qemu-img check may report leaked clusters, never a reference to
// a cluster whose refcount does not count it):
//
//  1. Refcounts first. Data clusters and new L2 tables come from a pool of
//     clusters whose refcount (1) was written durably before any of
//     them is handed out, with the file extended over the whole pool
//     (refillPool; each of those writes is durable on its own, RWF_DSYNC,
//     so a refill does not write out the guest's data as a sync of the
//     whole file would); a refcount block or refcount table that the
//     reservation needs is written before the table that points to it
//     (syncRefcounts). So an L2 entry or L1 entry on the file only ever
//     names a cluster inside the file and counted there, whatever
//     follows.
//  2. Guest data, into its cluster. A partial write whose cluster is
//     filled in with what the guest read there before, over a host
//     cluster that does not hold those bytes durably, is written durably
//     (writeData), so that no L2 entry names a cluster whose fill a power
//     failure lost.
//  3. The L2 entries that changed (only the 512-byte sectors that hold
//     them; a new L2 table whole). An L2 entry is 8 or 16 bytes inside one
//     sector: it is either old or new, never torn.
//  4. A new L2 table is written durably (its content is on stable
//     storage before anything points to it, also across a power
//     failure; a request that made several, or whose new table the
//     cache evicted early, syncs instead), then the L1 entry.
//  5. Refcount decreases (a cluster overwritten by copy-on-write, a
//     discard) wait for the next flush, after the change that dropped the
//     reference is durable (writeback); a plugin that dies first leaks
//     them.
//
// Pool clusters not used when the plugin dies are leaked as well (at most
// one pool: 32 MiB, and a sixteenth of the virtual size beyond the first
// 4 MiB; see poolMaxBytes). Close returns the pool. The same order holds
// across a power failure: step 1 is durable; steps 2 and 3 name only
// counted clusters; step 4 is durable before the L1 write; only a FLUSH
// promises the guest's data.

// The pool's size. An image's first pool is small (poolFirstBytes, at
// most poolFirstClusters); each refill doubles it, up to poolMaxBytes (at
// most poolMaxClusters) and a sixteenth of the virtual size, so a refill's
// fixed cost (two durable writes, each a journal commit and a cache flush:
// 0.1 to 0.3 ms here) is spread over more allocations when a guest
// allocates a lot, while a small image or a guest that allocates little
// reserves little. The pool is what a killed plugin leaks at most.
const (
	poolFirstBytes    = 4 << 20
	poolFirstClusters = 64
	poolMaxBytes      = 32 << 20
	poolMaxClusters   = 4096
)

// poolClusters is how many clusters the next refill reserves at most.
func (im *Image) poolClusters() uint64 {
	if im.poolNext != 0 {
		return im.poolNext
	}
	return im.firstPoolClusters()
}

// firstPoolClusters is the size of an image's first pool, and the
// shortest run of free clusters inside the file that a refill takes (a
// shorter gap is left, as it was before pools grew).
func (im *Image) firstPoolClusters() uint64 {
	return min(max(poolFirstBytes/im.cs, 1), poolFirstClusters)
}

// growPool doubles the next pool after a refill of n clusters, within the
// bounds above (never below the first pool: the bounds are at least its
// size).
func (im *Image) growPool(n uint64) {
	limit := min(poolMaxBytes, max(uint64(im.size)/16, poolFirstBytes))
	most := min(max(limit/im.cs, 1), poolMaxClusters)
	im.poolNext = min(2*n, most)
}

// allocPooled returns one cluster from the pool, refilling it first when
// it is empty. Its refcount is 1 on the file already. zero reports that
// the cluster reads as zeros: it lay beyond the file's end when the pool
// was reserved, and nothing has written to it since.
func (im *Image) allocPooled() (c uint64, zero bool, err error) {
	if im.pool[1] == 0 {
		if err := im.refillPool(); err != nil {
			return 0, false, err
		}
	}
	c = im.pool[0]
	im.pool[0]++
	im.pool[1]--
	return c, c >= im.poolZeroFrom, nil
}

// worstAlloc is how many clusters a write of n bytes at guest offset pos
// can take from the pool at most: one per data cluster, one per L2 table.
func (im *Image) worstAlloc(pos, n uint64) uint64 {
	if n == 0 {
		return 0
	}
	first, last := pos>>im.cb, (pos+n-1)>>im.cb
	return last - first + 1 + (last>>im.l2Bits - first>>im.l2Bits + 1)
}

// reclaimFrees applies the pending frees (writeback) before a write
// that may need more clusters than the pool holds (WriteAt; discards and
// write-zeroes, which seldom allocate and often free, do not call it: with
// a nearly empty pool each of them would pay a sync). Otherwise the refill
// grows the file while clusters the guest freed (by discard, or by
// rewriting a shared cluster) wait for its next flush: a guest that writes
// and discards without ever flushing grew the file by up to 4096 clusters
// beyond the disk's size. With the frees applied first, the refill finds
// them. It runs between requests only (mu held exclusively, no data write
// of the request pending), where writeback's order holds.
func (im *Image) reclaimFrees(need uint64) error {
	if len(im.pendingFree) == 0 || im.pool[1] >= need {
		return nil
	}
	return im.writeback()
}

// refillPool reserves a run of clusters with refcount 1 and makes those
// refcounts durable before any of them is used. The run is the first free
// one at or after the free hint that holds a first pool at least: of the
// pool's size, or shorter where a cluster in use ends it, so space that
// discards and copy-on-write freed inside the file is used again before
// the file grows however large pools have become.
func (im *Image) refillPool() error {
	want := im.poolClusters()
	end0 := im.fileClusters
	start, n, err := im.allocRun(want, im.firstPoolClusters())
	if err != nil {
		return err
	}
	// The file reaches the end of the pool before the refcounts are
	// synced: after a power failure, an L2 entry whose data write was lost
	// still names a cluster inside the file (it reads back stale, never
	// beyond the end).
	end := (start + n) * im.cs
	if err := im.f.WriteDurable([]byte{0}, int64(end-1)); err != nil {
		return fmt.Errorf("reserve clusters: extend the file: %w", err)
	}
	if err := im.syncRefcounts(); err != nil {
		return fmt.Errorf("reserve clusters: %w", err)
	}
	// Handed out only now: after a failure above the clusters stay
	// counted (a leak), never used.
	im.pool = [2]uint64{start, n}
	im.poolZeroFrom = max(start, end0)
	im.growPool(want)
	return nil
}

// releasePool gives back the clusters the pool still holds (Close).
func (im *Image) releasePool() error {
	start, n := im.pool[0], im.pool[1]
	im.pool = [2]uint64{}
	for c := start; c < start+n; c++ {
		if err := im.addRefcount(c, -1); err != nil {
			return err
		}
	}
	return nil
}

// persist writes the metadata that the request just served changed, in
// the order described above, without a sync (a new refcount block or a
// grown refcount table aside: syncRefcounts). It runs with mu held
// exclusively, before the request completes.
func (im *Image) persist() error {
	if err := im.persistAll(); err != nil {
		im.metaPending.Store(true)
		return err
	}
	im.metaPending.Store(false) // nothing dirty is left that a request waits for
	return nil
}

func (im *Image) persistAll() error {
	if len(im.rbc.dirtyTables()) > 0 || len(im.rtDirty) > 0 || im.rtMoved {
		if err := im.syncRefcounts(); err != nil {
			return err
		}
	}
	dirty := im.l2c.dirtyTables()
	sort.Slice(dirty, func(i, j int) bool { return dirty[i].off < dirty[j].off })
	fresh := 0
	for _, t := range dirty {
		if t.fresh {
			fresh++
		}
	}
	for _, t := range dirty {
		switch {
		case t.fresh:
			// Durable before the L1 entry that will point to it: a
			// table's cluster held something else before. Several new
			// tables share one sync instead (below): a durable write
			// each would flush the device's cache each time.
			if err := im.writeL2(t, fresh == 1); err != nil {
				return err
			}
		case t.lo >= t.hi:
			if err := im.writeL2(t, false); err != nil {
				return err
			}
		default:
			if err := im.writeL2Range(t); err != nil {
				return err
			}
		}
	}
	if len(im.l1Dirty) > 0 {
		if im.freshUnsynced {
			if err := im.sync(); err != nil {
				return err
			}
		}
		if err := im.writeChunks(im.l1, im.h.l1Off, im.l1Dirty, metaL1); err != nil {
			return err
		}
		im.l2Unsynced = true
	}
	return nil
}

// writeL2Range writes the 512-byte sectors of t that changed.
func (im *Image) writeL2Range(t *table) error {
	if err := im.meta.check(t.off/im.cs, 1, metaL2); err != nil {
		return err
	}
	lo, hi := t.lo&^511, min((t.hi+511)&^511, uint64(len(t.buf)))
	if _, err := im.f.WriteAt(t.buf[lo:hi], int64(t.off+lo)); err != nil {
		return fmt.Errorf("write L2 table at %#x: %w", t.off+lo, err)
	}
	t.written()
	im.l2Unsynced = true
	return nil
}
