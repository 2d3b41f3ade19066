package qcow2

import (
	"fmt"

	"github.com/krun-core/krun-core/disk"
)

var errMarkedCorrupt = corruptf("image was marked corrupt; writes are refused")

// subMask returns the bitmap of subclusters s0..s1.
func subMask(s0, s1 uint64) uint32 {
	var m uint64 = (1<<(s1+1) - 1) &^ (1<<s0 - 1)
	return uint32(m)
}

// WriteAt writes p at virtual offset off.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if im.ro {
		return 0, disk.ErrReadOnly
	}
	if err := im.checkRange(off, len(p)); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	im.mu.RLock()
	if im.closed {
		im.mu.RUnlock()
		return 0, errClosed
	}
	if im.corruptMarked.Load() {
		im.mu.RUnlock()
		return 0, errMarkedCorrupt
	}
	done := false
	var err error
	if !im.metaPending.Load() {
		done, err = im.writeInPlace(p, uint64(off))
	}
	im.mu.RUnlock()
	if err != nil {
		return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: write at %d: %w", im.name, off, err))
	}
	if done {
		return len(p), nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return 0, errClosed
	}
	if im.corruptMarked.Load() {
		return 0, errMarkedCorrupt
	}
	// Set before anything changes, cleared by the request's persist: a
	// request that does not get there, whether it fails or ends in a
	// panic (a fault on p, guest memory a front-end truncated, which the
	// ring engine recovers), leaves entries in the caches only.
	im.metaPending.Store(true)
	if err := im.writeExclusive(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeExclusive is WriteAt's path with mu held exclusively: allocations,
// copy-on-write, and the metadata written before the request completes.
func (im *Image) writeExclusive(p []byte, off int64) error {
	if err := im.reclaimFrees(im.worstAlloc(uint64(off), uint64(len(p)))); err != nil {
		return im.markCorrupt(fmt.Errorf("qcow2 %s: release freed clusters: %w", im.name, err))
	}
	if err := im.writeLocked(p, uint64(off)); err != nil {
		return im.markCorrupt(fmt.Errorf("qcow2 %s: write at %d: %w", im.name, off, err))
	}
	if err := im.trimCaches(); err != nil {
		return im.markCorrupt(fmt.Errorf("qcow2 %s: write back metadata: %w", im.name, err))
	}
	if err := im.persist(); err != nil {
		return im.markCorrupt(fmt.Errorf("qcow2 %s: write metadata: %w", im.name, err))
	}
	return nil
}

// checkData refuses a guest data write to host cluster c of the image file
// when c holds metadata or lies outside the image.
func (im *Image) checkData(c uint64) error {
	if im.extData {
		return nil
	}
	if c == 0 || c >= im.fileClusters {
		return corruptf("data write to host cluster %d outside the image's clusters", c)
	}
	return im.meta.check(c, 1, 0)
}

// writeInPlace writes p if every cluster it touches is allocated, owned by
// the active image alone and needs no metadata change. It reports false
// (having written nothing) otherwise. The caller holds mu shared.
func (im *Image) writeInPlace(p []byte, pos uint64) (bool, error) {
	var segs [8]dataSeg
	list := segs[:0]
	for i, at := 0, pos; i < len(p); {
		in := at & (im.cs - 1)
		n := int(min(im.cs-in, uint64(len(p)-i)))
		ci, err := im.lookup(at >> im.cb)
		if err != nil {
			return false, err
		}
		if ci.typ != ctNormal || !ci.copied {
			return false, nil
		}
		if m := subMask(in>>im.scBits, (in+uint64(n)-1)>>im.scBits); ci.alloc&m != m {
			return false, nil
		}
		if err := im.checkData(ci.host / im.cs); err != nil {
			return false, err
		}
		list = appendSeg(list, ci.host+in, i, i+n)
		i += n
		at += uint64(n)
	}
	if err := writeSegs(im.data, p, list); err != nil {
		return false, err
	}
	return true, nil
}

// writeLocked writes p at guest offset pos, allocating as needed. The
// caller holds mu exclusively.
func (im *Image) writeLocked(p []byte, pos uint64) error {
	b := dataBatch{p: p}
	for i := 0; i < len(p); {
		in := pos & (im.cs - 1)
		n := int(min(im.cs-in, uint64(len(p)-i)))
		b.i = i
		if err := im.writeCluster(p[i:i+n], pos, &b); err != nil {
			// The batch's clusters keep their old content: their
			// data was not written, so their entries are not set
			// (the new host clusters leak).
			return err
		}
		i += n
		pos += uint64(n)
		if len(b.links) >= maxBatchLinks {
			// A long request (a descriptor may be as long as the
			// guest's RAM) is written and linked in parts, so that
			// its bookkeeping does not grow with it: 80 bytes a
			// cluster, 0.8 bytes a byte of 512-byte clusters (found
			// in review, helper-87). What is linked was written.
			if err := b.flush(im.data); err != nil {
				return err
			}
			if err := im.link(&b); err != nil {
				return err
			}
		}
	}
	if err := b.flush(im.data); err != nil {
		return err
	}
	return im.link(&b)
}

// link sets the L2 entries of the batch's clusters, now that their data is
// in the file, and releases what they replace.
func (im *Image) link(b *dataBatch) error {
	for i := range b.links {
		l := &b.links[i]
		t, idx, err := im.l2ForWrite(l.gc)
		if err != nil {
			return err
		}
		im.setEntry(t, idx, l.entry, l.bitmap)
		im.freeEntry(&l.old)
	}
	b.links = b.links[:0]
	return nil
}

// dataBatch gathers the data writes of one request and issues them as few
// writes as the host clusters allow: clusters allocated together are
// consecutive (the pool hands them out in order), so a 1 MiB write into
// new 64 KiB clusters is one write, not sixteen. writeLocked flushes it
// before it returns, so the data is in the file before any metadata that
// points to it. writeInPlace merges its segments the same way (appendSeg,
// writeSegs) in an array on its stack.
type dataBatch struct {
	p    []byte // the request's data
	i    int    // where in p the cluster being written starts
	segs []dataSeg
	// links are the L2 entries of the batched clusters, set (link) only
	// once their data is written: an entry must never name a host
	// cluster that did not get its data (a failed request would leave
	// the guest reading neither old nor new bytes).
	links []pendingLink
}

// maxBatchLinks bounds the clusters a dataBatch holds before writeLocked
// writes and links them.
const maxBatchLinks = 1024

// pendingLink is one batched cluster's new L2 entry and what it replaces.
type pendingLink struct {
	gc            uint64
	entry, bitmap uint64
	old           cinfo
}

type dataSeg struct {
	host uint64
	a, b int // p[a:b]
}

// add queues q, which is p[i:i+len(q)], for host offset host.
func (d *dataBatch) add(host uint64, q []byte) {
	d.segs = appendSeg(d.segs, host, d.i, d.i+len(q))
}

// appendSeg adds p[a:b] at host offset host to segs, extending the last
// segment when both are contiguous.
func appendSeg(segs []dataSeg, host uint64, a, b int) []dataSeg {
	if k := len(segs); k > 0 {
		if s := &segs[k-1]; s.b == a && s.host+uint64(s.b-s.a) == host {
			s.b = b
			return segs
		}
	}
	return append(segs, dataSeg{host, a, b})
}

func (d *dataBatch) flush(f ioFile) error {
	err := writeSegs(f, d.p, d.segs)
	d.segs = d.segs[:0]
	return err
}

// writeSegs writes the segments segs of p.
func writeSegs(f ioFile, p []byte, segs []dataSeg) error {
	for _, s := range segs {
		if _, err := f.WriteAt(p[s.a:s.b], int64(s.host)); err != nil {
			return fmt.Errorf("write data at %#x: %w", s.host, err)
		}
	}
	return nil
}

// l2ForWrite returns the L2 table for guest cluster gc, allocating it or
// copying it (when a snapshot shares it) so that the active image owns it,
// and the entry index.
func (im *Image) l2ForWrite(gc uint64) (*table, uint64, error) {
	l1i := gc >> im.l2Bits
	idx := gc & (im.l2Entries - 1)
	off, err := im.l2Offset(l1i)
	if err != nil {
		return nil, 0, err
	}
	if off == 0 {
		c, _, err := im.allocPooled()
		if err != nil {
			return nil, 0, fmt.Errorf("allocate L2 table: %w", err)
		}
		t := &table{off: c * im.cs, buf: make([]byte, im.cs), dirty: true, fresh: true}
		im.meta.add(c, metaL2)
		im.l2c.remove(t.off)
		im.l2c.add(t)
		im.setL1(l1i, t.off|flagCopied)
		return t, idx, nil
	}
	t, err := im.loadL2(off)
	if err != nil {
		return nil, 0, err
	}
	if im.l1[l1i]&flagCopied != 0 {
		return t, idx, nil
	}
	rc, err := im.refcount(off / im.cs)
	if err != nil {
		return nil, 0, err
	}
	switch {
	case rc == 0:
		return nil, 0, corruptf("L2 table at %#x is in use but has refcount 0", off)
	case rc == 1:
		im.setL1(l1i, off|flagCopied)
		return t, idx, nil
	}
	// Shared with a snapshot: copy it.
	c, _, err := im.allocPooled()
	if err != nil {
		return nil, 0, fmt.Errorf("allocate L2 table copy: %w", err)
	}
	nt := &table{off: c * im.cs, buf: make([]byte, im.cs), dirty: true, fresh: true}
	copy(nt.buf, t.buf)
	// Entries of a shared table cannot be exclusively owned; make sure no
	// stale copied flag lets a write bypass the refcount check.
	step := im.l2EntrySizeBytes()
	for i := uint64(0); i < uint64(len(nt.buf)); i += step {
		e := be.Uint64(nt.buf[i:])
		be.PutUint64(nt.buf[i:], e&^flagCopied)
	}
	im.meta.add(c, metaL2)
	im.meta.clear(off/im.cs, metaL2)
	im.l2c.remove(nt.off)
	im.l2c.add(nt)
	im.setL1(l1i, nt.off|flagCopied)
	im.freeCluster(off / im.cs)
	return nt, idx, nil
}

func (im *Image) l2EntrySizeBytes() uint64 {
	if im.extL2 {
		return 16
	}
	return 8
}

func (im *Image) setL1(i, v uint64) {
	im.l1[i] = v
	im.l1Dirty[i/64] = true
}

// owned reports whether the active image alone references ci's host
// cluster (refcount 1), so it may be written in place.
func (im *Image) owned(ci *cinfo) (bool, error) {
	if !ci.hasHost || ci.typ == ctCompressed {
		return false, nil
	}
	if im.extData || ci.copied {
		return true, nil
	}
	rc, err := im.refcount(ci.host / im.cs)
	if err != nil {
		return false, err
	}
	if rc == 0 {
		return false, corruptf("host cluster %#x is in use but has refcount 0", ci.host)
	}
	return rc == 1, nil
}

// newHost returns a host cluster for guest cluster gc: a fresh one, or the
// fixed one in an external data file. zero reports that the cluster reads
// as zeros (a fresh one beyond the file's former end).
func (im *Image) newHost(gc uint64) (host uint64, zero bool, err error) {
	if im.extData {
		return gc << im.cb, false, nil
	}
	c, zero, err := im.allocPooled()
	if err != nil {
		return 0, false, fmt.Errorf("allocate data cluster: %w", err)
	}
	return c * im.cs, zero, nil
}

// zeroFill reports whether the part of guest cluster ci (at guest offset
// base) that a partial write leaves untouched reads as zeros: a zero
// cluster, or an unallocated one with no backing data under it.
func (im *Image) zeroFill(ci *cinfo, base uint64) bool {
	switch ci.typ {
	case ctZero:
		return true
	case ctUnalloc:
		return im.backing == nil || base >= uint64(im.backingSize)
	}
	return false
}

// fillState fills buf, which covers guest range [g, g+len(buf)) of one
// subcluster (or cluster) in state st of cluster ci.
func (im *Image) fillState(buf []byte, g uint64, st int, ci *cinfo) error {
	switch st {
	case 2:
		in := g & (im.cs - 1)
		if _, err := readFullAt(im.data, buf, int64(ci.host+in)); err != nil {
			return fmt.Errorf("read data cluster at %#x: %w", ci.host, err)
		}
		return nil
	case 1:
		clear(buf)
		return nil
	}
	return im.readBacking(buf, g)
}

// writeCluster writes q at guest offset pos; q lies inside one cluster.
// Writes of q itself into a fresh cluster go through batch.
func (im *Image) writeCluster(q []byte, pos uint64, batch *dataBatch) error {
	gc := pos >> im.cb
	base := gc << im.cb
	in := pos - base
	end := in + uint64(len(q))
	t, idx, err := im.l2ForWrite(gc)
	if err != nil {
		return err
	}
	e, bm := im.entry(t, idx)
	ci, err := im.classify(e, bm, gc)
	if err != nil {
		return err
	}
	s0, s1 := in>>im.scBits, (end-1)>>im.scBits
	touched := subMask(s0, s1)
	own, err := im.owned(&ci)
	if err != nil {
		return err
	}

	if own && ci.typ == ctNormal {
		if err := im.checkData(ci.host / im.cs); err != nil {
			return err
		}
		if ci.alloc&touched == touched {
			if _, err := im.data.WriteAt(q, int64(ci.host+in)); err != nil {
				return fmt.Errorf("write data at %#x: %w", ci.host+in, err)
			}
		} else {
			// Extended L2: fill the partly written subclusters that were
			// not allocated, then write the touched subclusters.
			buf, start, err := im.mergeSubclusters(q, base, in, s0, s1, &ci)
			if err != nil {
				return err
			}
			if err := im.writeData(buf, ci.host+start, im.partSubclusters(in, end)); err != nil {
				return err
			}
		}
		if !ci.copied || ci.alloc&touched != touched {
			alloc := ci.alloc | touched
			zero := ci.zero &^ touched
			im.setEntry(t, idx, ci.host|flagCopied, uint64(zero)<<32|uint64(alloc))
		}
		return nil
	}

	if own && ci.typ == ctZero {
		// A preallocated zero cluster this image owns: reuse it.
		if err := im.checkData(ci.host / im.cs); err != nil {
			return err
		}
		buf := make([]byte, im.cs)
		copy(buf[in:], q)
		// The cluster's old bytes are not zeros: the fill must be durable.
		if err := im.writeData(buf, ci.host, uint64(len(q)) != im.cs); err != nil {
			return err
		}
		im.setEntry(t, idx, ci.host|flagCopied, 0)
		return nil
	}

	// Everything else gets a new host cluster.
	host, fresh, err := im.newHost(gc)
	if err != nil {
		return err
	}
	if err := im.checkData(host / im.cs); err != nil {
		return err
	}
	var alloc, zero uint32
	batched := false // the data waits in batch; so does the entry
	if im.extL2 && ci.typ == ctUnalloc {
		// Only the touched subclusters are written; the others keep
		// their state (unallocated or zero).
		buf, start, err := im.mergeSubclusters(q, base, in, s0, s1, &ci)
		if err != nil {
			return err
		}
		filled := im.partSubclusters(in, end) && !(fresh && im.zeroFill(&ci, base))
		if err := im.writeData(buf, host+start, filled); err != nil {
			return err
		}
		alloc, zero = touched, ci.zero&^touched
	} else if in == 0 && uint64(len(q)) == im.cs {
		// The whole cluster is written: nothing to copy.
		batch.add(host, q)
		alloc, batched = allSub, true
	} else if fresh && im.zeroFill(&ci, base) {
		// The new cluster reads as zeros and so must the rest of it:
		// only q is written (a 4 KiB write costs 4 KiB, not a cluster).
		batch.add(host+in, q)
		alloc, batched = allSub, true
	} else {
		buf := make([]byte, im.cs)
		switch ci.typ {
		case ctCompressed:
			if err := im.decompress(&ci, buf); err != nil {
				return err
			}
			alloc = allSub
		case ctZero:
			alloc = allSub
		case ctUnalloc:
			if err := im.readBacking(buf, base); err != nil {
				return err
			}
			alloc = allSub
		case ctNormal:
			// Shared with a snapshot (or, with extended L2, partly
			// allocated): copy the cluster, filling the touched
			// subclusters that were not allocated.
			if _, err := readFullAt(im.data, buf, int64(ci.host)); err != nil {
				return fmt.Errorf("read data cluster at %#x: %w", ci.host, err)
			}
			sc := uint64(1) << im.scBits
			for _, s := range edges(s0, s1) {
				if st := ci.state(uint(s)); st != 2 {
					if err := im.fillState(buf[s*sc:(s+1)*sc], base+s*sc, st, &ci); err != nil {
						return err
					}
				}
			}
			alloc, zero = ci.alloc|touched, ci.zero&^touched
		}
		copy(buf[in:], q)
		if err := im.writeData(buf, host, true); err != nil {
			return err
		}
	}
	if !im.extL2 {
		alloc, zero = 0, 0
	}
	bits := uint64(zero)<<32 | uint64(alloc)
	if batched {
		batch.links = append(batch.links, pendingLink{gc: gc, entry: host | flagCopied, bitmap: bits, old: ci})
		return nil
	}
	im.setEntry(t, idx, host|flagCopied, bits)
	im.freeEntry(&ci)
	return nil
}

// writeData writes buf at host offset off. filled says that buf holds bytes
// the request did not write (zeros, backing data, a compressed or shared
// cluster's copy) over a host cluster whose durable content differs (it
// was used before, or those bytes are not zeros): that write is made
// durable before it returns, because the L2 entry written after it makes
// the guest read them from there. Were the entry to survive a power
// failure that lost them, the guest would read stale bytes where it had
// durable ones (QEMU orders the same way: its L2 table depends on a flush
// after copy-on-write). A write of only the request's own bytes may be
// lost like any write not flushed yet.
func (im *Image) writeData(buf []byte, off uint64, filled bool) error {
	var err error
	if filled {
		err = im.data.WriteDurable(buf, int64(off))
	} else {
		_, err = im.data.WriteAt(buf, int64(off))
	}
	if err != nil {
		return fmt.Errorf("write data at %#x: %w", off, err)
	}
	return nil
}

// partSubclusters reports whether the write [in, end) of a cluster covers
// its first or last subcluster only in part (so merging fills the rest).
func (im *Image) partSubclusters(in, end uint64) bool {
	sc := uint64(1)<<im.scBits - 1
	return in&sc != 0 || end&sc != 0
}

// mergeSubclusters builds the bytes of subclusters s0..s1 of the cluster at
// guest offset base: q at offset in, and for the first and last subcluster,
// where q does not cover them, their current content.
func (im *Image) mergeSubclusters(q []byte, base, in, s0, s1 uint64, ci *cinfo) ([]byte, uint64, error) {
	sc := uint64(1) << im.scBits
	start, stop := s0*sc, (s1+1)*sc
	buf := make([]byte, stop-start)
	end := in + uint64(len(q))
	for _, s := range edges(s0, s1) {
		a, b := s*sc, (s+1)*sc
		if in <= a && end >= b {
			continue
		}
		if err := im.fillState(buf[a-start:b-start], base+a, ci.state(uint(s)), ci); err != nil {
			return nil, 0, err
		}
	}
	copy(buf[in-start:], q)
	return buf, start, nil
}

// edges returns the first and last subcluster of a range, once each.
func edges(s0, s1 uint64) []uint64 {
	if s0 == s1 {
		return []uint64{s0}
	}
	return []uint64{s0, s1}
}
