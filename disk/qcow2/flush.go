package qcow2

import (
	"cmp"
	"fmt"
	"maps"
	"os"
	"slices"
	"sort"

	"golang.org/x/sys/unix"
)

// writeDurable writes p at off with RWF_DSYNC: the kernel writes that
// range's pages and the metadata needed to read them back (the file's
// size, its block map) and flushes the device's cache before the call
// returns, as fdatasync would for the whole file, but without writing out
// the file's other dirty pages. A refcount update made durable this way
// costs a page or two, where fdatasync on an image under a stream of
// allocating writes also writes out every guest write since the last sync.
// A kernel older than 4.7 or a file system without RWF_DSYNC gets WriteAt
// and fdatasync instead.
func writeDurable(f *os.File, p []byte, off int64) error {
	return writeDurableWith(unix.Pwritev2, f, p, off)
}

// writeDurableWith is writeDurable with its pwritev2 given (tests give
// one that fails as an old kernel does).
func writeDurableWith(pwritev2 func(int, [][]byte, int64, int) (int, error), f *os.File, p []byte, off int64) error {
	fd := int(f.Fd())
	for len(p) > 0 {
		n, err := pwritev2(fd, [][]byte{p}, off, unix.RWF_DSYNC)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EOPNOTSUPP || err == unix.EINVAL || err == unix.ENOSYS:
			if _, err := f.WriteAt(p, off); err != nil {
				return err
			}
			return fdatasync(f)
		case err != nil:
			return &os.PathError{Op: "pwritev2", Path: f.Name(), Err: err}
		case n == 0:
			return &os.PathError{Op: "pwritev2", Path: f.Name(), Err: unix.EIO}
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// fdatasync flushes f's data (and the metadata needed to read it back).
func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("fdatasync: %w", err)
			}
			return nil
		}
	}
}

// SyncFailed is the latched sync failure (disk.SyncLatched).
func (im *Image) SyncFailed() error { return im.synced.Err() }

// FailSync latches err as a failed sync (disk.SyncLatched): every later
// Flush and write fails.
func (im *Image) FailSync(err error) { im.synced.Fail(err) }

// Flush returns once every write completed before it is on stable storage,
// metadata included.
func (im *Image) Flush() error {
	if im.ro {
		return nil
	}
	im.mu.Lock()
	if im.closed {
		im.mu.Unlock()
		return errClosed
	}
	if !im.metadataDirty() {
		// Only data was written in place: sync without blocking others.
		im.mu.Unlock()
		return im.syncAll()
	}
	defer im.mu.Unlock()
	if im.corruptMarked.Load() {
		return errMarkedCorrupt
	}
	if err := im.writeback(); err != nil {
		return im.markCorrupt(fmt.Errorf("qcow2 %s: flush: %w", im.name, err))
	}
	if err := im.sync(); err != nil {
		return fmt.Errorf("qcow2 %s: flush: %w", im.name, err)
	}
	return nil
}

func (im *Image) syncAll() error {
	if im.dataFile != nil {
		if err := im.data.Sync(); err != nil {
			return fmt.Errorf("qcow2 %s: sync data file: %w", im.name, err)
		}
	}
	if err := im.f.Sync(); err != nil {
		return fmt.Errorf("qcow2 %s: sync: %w", im.name, err)
	}
	return nil
}

func (im *Image) metadataDirty() bool {
	return im.metaChanged || len(im.l1Dirty) > 0 || len(im.rtDirty) > 0 || im.rtMoved ||
		len(im.pendingFree) > 0 || im.refsUnsynced || im.l2Unsynced
}

// sync makes everything written so far durable; with an external data
// file, guest data is synced first.
func (im *Image) sync() error {
	if im.dataFile != nil {
		if err := im.data.Sync(); err != nil {
			return err
		}
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.refsUnsynced = false
	im.l2Unsynced = false
	im.freshUnsynced = false
	return nil
}

// writeRefblock writes refcount block t, durably if asked (otherwise a
// later sync makes it durable: refsUnsynced).
func (im *Image) writeRefblock(t *table, durable bool) error {
	if err := im.meta.check(t.off/im.cs, 1, metaRefBlock); err != nil {
		return err
	}
	if err := im.writeTable(t, durable); err != nil {
		return fmt.Errorf("write refcount block at %#x: %w", t.off, err)
	}
	im.refsUnsynced = im.refsUnsynced || !durable
	return nil
}

// writeL2 writes the whole of L2 table t, after every refcount it depends
// on is durable; durably if asked (a new table, before the L1 entry that
// points to it), otherwise a later sync makes it durable (l2Unsynced, and
// freshUnsynced for a new table: its L1 entry waits for that sync).
func (im *Image) writeL2(t *table, durable bool) error {
	if err := im.syncRefcounts(); err != nil {
		return err
	}
	if err := im.meta.check(t.off/im.cs, 1, metaL2); err != nil {
		return err
	}
	fresh := t.fresh
	if err := im.writeTable(t, durable); err != nil {
		return fmt.Errorf("write L2 table at %#x: %w", t.off, err)
	}
	im.l2Unsynced = im.l2Unsynced || !durable
	im.freshUnsynced = im.freshUnsynced || (fresh && !durable)
	return nil
}

// writeTable writes the whole of t to its place in the file.
func (im *Image) writeTable(t *table, durable bool) error {
	var err error
	if durable {
		err = im.f.WriteDurable(t.buf, int64(t.off))
	} else {
		_, err = im.f.WriteAt(t.buf, int64(t.off))
	}
	if err == nil {
		t.written()
	}
	return err
}

// writeChunks writes the dirty 512-byte chunks of a table of uint64
// entries that lives at off.
func (im *Image) writeChunks(tab []uint64, off uint64, dirty map[uint64]bool, kind metaKind) error {
	chunks := make([]uint64, 0, len(dirty))
	for c := range dirty {
		chunks = append(chunks, c)
	}
	sort.Slice(chunks, func(i, j int) bool { return chunks[i] < chunks[j] })
	buf := make([]byte, 512)
	for _, c := range chunks {
		first := c * 64
		if first >= uint64(len(tab)) {
			delete(dirty, c)
			continue
		}
		last := min(first+64, uint64(len(tab)))
		b := buf[:(last-first)*8]
		for i := first; i < last; i++ {
			be.PutUint64(b[(i-first)*8:], tab[i])
		}
		at := off + first*8
		if err := im.meta.check(at/im.cs, 1, kind); err != nil {
			return err
		}
		if _, err := im.f.WriteAt(b, int64(at)); err != nil {
			return fmt.Errorf("write %s at %#x: %w", kind, at, err)
		}
		delete(dirty, c)
	}
	return nil
}

// syncRefcounts writes every dirty refcount block, then the refcount
// table (moving it if it grew), with the syncs that make each level durable
// before the level that points to it.
func (im *Image) syncRefcounts() error {
	dirty := im.rbc.dirtyTables()
	if len(dirty) == 0 && !im.refsUnsynced && len(im.rtDirty) == 0 && !im.rtMoved {
		return nil
	}
	sort.Slice(dirty, func(i, j int) bool { return dirty[i].off < dirty[j].off })
	if !im.refsUnsynced && !im.rtMoved && len(im.rtDirty) == 0 {
		// Only refcount blocks changed, and every refcount write before
		// them is durable: each block is made durable by its own write,
		// and the guest's writes since the last sync stay in the page
		// cache (a sync would write them all out).
		for _, t := range dirty {
			if err := im.writeRefblock(t, true); err != nil {
				return err
			}
		}
		return nil
	}
	for _, t := range dirty {
		if err := im.writeRefblock(t, false); err != nil {
			return err
		}
	}
	if im.rtMoved || len(im.rtDirty) > 0 {
		if err := im.sync(); err != nil {
			return err
		}
	}
	if im.rtMoved {
		buf := make([]byte, len(im.rt)*8)
		for i, e := range im.rt {
			be.PutUint64(buf[i*8:], e)
		}
		if err := im.meta.check(im.rtOff/im.cs, uint64(len(buf))/im.cs, metaRefTable); err != nil {
			return err
		}
		if _, err := im.f.WriteAt(buf, int64(im.rtOff)); err != nil {
			return fmt.Errorf("write refcount table: %w", err)
		}
		if err := im.sync(); err != nil {
			return err
		}
		var hdr [12]byte
		be.PutUint64(hdr[0:], im.rtOff)
		be.PutUint32(hdr[8:], uint32(uint64(len(buf))/im.cs))
		im.hdrMu.Lock()
		_, err := im.f.WriteAt(hdr[:], hdrRefTableOff)
		if err == nil {
			im.h.rtOff = im.rtOff
			im.h.rtClusters = uint32(uint64(len(buf)) / im.cs)
		}
		im.hdrMu.Unlock()
		if err != nil {
			return fmt.Errorf("write header: %w", err)
		}
		im.rtMoved = false
		clear(im.rtDirty)
		im.rtNew = im.rtNew[:0]
		// The old table is unreferenced once the header is durable; the
		// sync below does that, and pendingFree is applied after a later
		// sync.
		im.meta.removeRange(im.oldRT[0], im.oldRT[1], metaRefTable)
		for c := im.oldRT[0]; c < im.oldRT[0]+im.oldRT[1]; c++ {
			im.freeCluster(c)
		}
		im.oldRT = [2]uint64{}
	} else if len(im.rtDirty) > 0 {
		if err := im.writeRefTable(); err != nil {
			return err
		}
	}
	return im.sync()
}

// writeRefTable writes the refcount table's dirty 512-byte chunks in
// place, after the refcount blocks are durable. A new block placed outside
// the range it covers is counted by another block, which may be new as
// well; a chunk that names such a counted block is written only once the
// chunk naming the block that counts it is durable. A plugin killed
// between two chunk writes then leaves at most a leak (a counted block the
// table does not name yet), never a named block whose refcount is in a
// block the table does not name. Chunks without such a dependency go out
// together, with one sync at the end (syncRefcounts').
func (im *Image) writeRefTable() error {
	isNew := make(map[uint64]bool, len(im.rtNew))
	for _, b := range im.rtNew {
		isNew[b] = true
	}
	after := map[uint64][]uint64{} // chunk -> chunks that must be durable first
	for _, b := range im.rtNew {
		counter := im.rt[b] / im.cs / im.rbEntries
		if ch, dep := b*8/512, counter*8/512; isNew[counter] && dep != ch {
			after[ch] = append(after[ch], dep)
		}
	}
	for len(im.rtDirty) > 0 {
		round := map[uint64]bool{}
		for ch := range im.rtDirty {
			if !slices.ContainsFunc(after[ch], func(dep uint64) bool { return im.rtDirty[dep] }) {
				round[ch] = true
			}
		}
		if len(round) == 0 {
			// New blocks that count each other: allocation never
			// places them so (each falls back to a cluster outside
			// every reservation), but should it, the table is still
			// written, in chunk order.
			im.log.Warn("refcount table: new refcount blocks count each other; writing their entries in file order")
			maps.Copy(round, im.rtDirty)
		}
		chunks := slices.Collect(maps.Keys(round))
		if err := im.writeChunks(im.rt, im.rtOff, round, metaRefTable); err != nil {
			return err
		}
		for _, ch := range chunks {
			delete(im.rtDirty, ch)
		}
		if len(im.rtDirty) > 0 {
			if err := im.sync(); err != nil {
				return err
			}
		}
	}
	im.rtNew = im.rtNew[:0]
	return nil
}

// writeback writes all cached metadata in dependency order: refcounts,
// then L2 tables, then the L1 table; then releases the clusters whose
// references are gone. It does not sync at the end.
func (im *Image) writeback() error {
	if err := im.syncRefcounts(); err != nil {
		return err
	}
	dirty := im.l2c.dirtyTables()
	sort.Slice(dirty, func(i, j int) bool { return dirty[i].off < dirty[j].off })
	for _, t := range dirty {
		if err := im.writeL2(t, false); err != nil {
			return err
		}
	}
	if len(im.l1Dirty) > 0 {
		if im.l2Unsynced {
			if err := im.sync(); err != nil {
				return err
			}
		}
		if err := im.writeChunks(im.l1, im.h.l1Off, im.l1Dirty, metaL1); err != nil {
			return err
		}
		im.l2Unsynced = true
	}
	if len(im.pendingFree) > 0 {
		if im.l2Unsynced {
			if err := im.sync(); err != nil {
				return err
			}
		}
		if err := im.applyFrees(); err != nil {
			return err
		}
		// Write the decreased refcounts now; losing them only leaks.
		for _, t := range im.rbc.dirtyTables() {
			if err := im.writeRefblock(t, false); err != nil {
				return err
			}
		}
	}
	im.metaChanged = false
	return nil
}

// applyFrees releases the clusters in pendingFree. The caller made the
// change that dropped their references durable.
func (im *Image) applyFrees() error {
	frees := im.pendingFree
	im.pendingFree = nil
	var first error
	for _, c := range frees {
		// A failed release (the image was corrupt) leaves that cluster
		// alone and goes on with the others.
		if err := im.addRefcount(c, -1); err != nil {
			first = cmp.Or(first, err)
			continue
		}
		rc, err := im.refcount(c)
		if err != nil {
			first = cmp.Or(first, err)
			continue
		}
		if rc == 0 {
			if k := im.meta.at(c); k&(metaL2|metaSnapL2) != 0 {
				im.meta.clear(c, metaL2|metaSnapL2)
				im.l2c.remove(c * im.cs)
			}
		}
	}
	return first
}

// trimCaches writes back dirty tables the caches hold beyond their bound,
// and releases clusters when many frees are pending.
func (im *Image) trimCaches() error {
	for _, t := range im.l2c.over() {
		if err := im.writeL2(t, false); err != nil {
			return err
		}
	}
	im.l2c.trim()
	for _, t := range im.rbc.over() {
		if err := im.writeRefblock(t, false); err != nil {
			return err
		}
	}
	im.rbc.trim()
	if len(im.pendingFree) > 4096 {
		return im.writeback()
	}
	return nil
}
