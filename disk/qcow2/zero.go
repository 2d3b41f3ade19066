package qcow2

import (
	"fmt"

	"github.com/krun-core/krun-core/disk"
)

func (im *Image) checkRange64(off, n int64) error {
	if off < 0 || n < 0 || off > im.size || n > im.size-off {
		return fmt.Errorf("qcow2 %s: offset %d length %d: %w", im.name, off, n, disk.ErrOutOfRange)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeroes. On version 3 images whole
// clusters get the zero flag (keeping their allocation unless unmap is set);
// elsewhere zeroes are written.
func (im *Image) WriteZeroes(off, n int64, unmap bool) error {
	return im.zeroOrDiscard(off, n, unmap, false)
}

// Discard deallocates whole clusters of [off, off+n). Discarded clusters
// read as zeroes, except on version 2 images with a backing file, where
// nothing is discarded (such an image cannot hide backing data). Partial
// clusters are left alone.
func (im *Image) Discard(off, n int64) error {
	return im.zeroOrDiscard(off, n, true, true)
}

// A DISCARD or WRITE_ZEROES range may cover the whole disk (a guest that
// discards its 1 TiB disk at mkfs time). It is served in pieces of at most
// pieceClusters clusters (and pieceZeroBytes of zeroes written), each with
// mu held exclusively and ending with the piece's metadata written
// (persist), exactly as if the guest had sent each piece as a request of
// its own; mu is released between pieces, so that the guest's other
// requests, reads included, wait for one piece at most rather than the
// whole range (found in review: they stalled for as long as the range
// took). Every guarantee of a request therefore holds for each piece: the
// order of metadata writes, metaPending (clear between pieces, set by a
// piece that fails), the latched sync failure, the corrupt mark. A read of
// the range meanwhile finds each cluster as it was or as the request
// leaves it, never anything else. The request succeeds only if every piece
// does; one that fails mid-way leaves the pieces before it done (they read
// as zeroes), as a real disk may.
const (
	defaultPieceClusters = 8192    // one L2 table of 64 KiB clusters
	pieceZeroBytes       = 4 << 20 // zeroes written as data (raw data file, version 2)
)

func (im *Image) zeroOrDiscard(off, n int64, unmap, discard bool) error {
	if im.ro {
		return disk.ErrReadOnly
	}
	if err := im.checkRange64(off, n); err != nil {
		return err
	}
	pos, end := uint64(off), uint64(off+n)
	for {
		next, err := im.zeroOrDiscardPiece(pos, end, unmap, discard)
		if err != nil || next >= end {
			return err
		}
		pos = next
		if im.pieceHook != nil {
			im.pieceHook(pos)
		}
	}
}

// zeroOrDiscardPiece serves one piece of [pos, end) with mu held and
// returns where the next piece starts (end when the range is done).
func (im *Image) zeroOrDiscardPiece(pos, end uint64, unmap, discard bool) (uint64, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	next, err := im.zeroOrDiscardLocked(pos, end, unmap, discard)
	if err != nil && err != errClosed && err != errMarkedCorrupt {
		im.metaPending.Store(true) // its changes may be in the caches only; persist clears it
	}
	return next, err
}

// zeroOrDiscardLocked serves [pos, end) up to the bounds of a piece, writes
// its metadata and returns where it stopped.
func (im *Image) zeroOrDiscardLocked(pos, end uint64, unmap, discard bool) (uint64, error) {
	if im.closed {
		return 0, errClosed
	}
	if im.corruptMarked.Load() {
		return 0, errMarkedCorrupt
	}
	what := "write zeroes"
	if discard {
		what = "discard"
	}
	start := pos
	zeroed0 := im.zeroWritten
	for work := uint64(0); pos < end; work++ {
		if work >= im.pieceClusters || im.zeroWritten-zeroed0 >= pieceZeroBytes {
			break // the rest is the next piece's, after others had mu
		}
		gc := pos >> im.cb
		base := gc << im.cb
		if pos != start && gc&(1<<im.l2Bits-1) == 0 {
			// A new L2 table: the ones behind are written back as
			// the cache's bound says, as between two write requests.
			// A piece may span gigabytes (large clusters); with small
			// clusters its tables (and the clusters it frees) would
			// otherwise all stay in memory until it ends.
			if err := im.trimCaches(); err != nil {
				return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: write back metadata: %w", im.name, err))
			}
		}
		if l1i := gc >> im.l2Bits; im.l1[l1i]&l1OffsetMask == 0 && (im.backing == nil || base >= uint64(im.backingSize)) {
			// Nothing is allocated under this L1 entry and there is no
			// backing data to hide: it reads as zeroes already.
			pos = min((l1i+1)<<(im.l2Bits+im.cb), end)
			continue
		}
		in := pos - base
		l := min(im.cs-in, end-pos)
		full := in == 0 && (l == im.cs || base+l == uint64(im.size))
		var err error
		if discard {
			err = im.discardCluster(gc, full)
		} else {
			err = im.zeroCluster(gc, in, l, full, unmap)
		}
		if err != nil {
			return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: %s at %d: %w", im.name, what, pos, err))
		}
		pos += l
	}
	if err := im.trimCaches(); err != nil {
		return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: write back metadata: %w", im.name, err))
	}
	if err := im.persist(); err != nil {
		return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: write metadata: %w", im.name, err))
	}
	return pos, nil
}

// writeZeroData writes l zero bytes as data at guest offset pos (where
// no zero flag can say it), counted against the piece's bound.
func (im *Image) writeZeroData(l, pos uint64) error {
	im.zeroWritten += l
	return im.writeLocked(make([]byte, l), pos)
}

// readsZero reports whether guest range [base+in, base+in+l) of a cluster
// described by ci already reads as zeroes without looking at data.
func (im *Image) readsZero(ci *cinfo, base, in, l uint64) bool {
	if ci.typ == ctCompressed {
		return false
	}
	noBacking := im.backing == nil || base+in >= uint64(im.backingSize)
	for s := in >> im.scBits; s <= (in+l-1)>>im.scBits; s++ {
		switch ci.state(uint(s)) {
		case 2:
			return false
		case 0:
			if !noBacking {
				return false
			}
		}
	}
	return true
}

// zeroCluster zeroes [in, in+l) of guest cluster gc.
func (im *Image) zeroCluster(gc, in, l uint64, full, unmap bool) error {
	base := gc << im.cb
	ci, err := im.lookup(gc)
	if err != nil {
		return err
	}
	if im.readsZero(&ci, base, in, l) && !(unmap && full && ci.hasHost && !im.extData) {
		return nil
	}
	if im.rawData {
		// The data file must stay a valid raw image: write real zeroes.
		return im.writeZeroData(l, base+in)
	}
	if im.h.version < 3 {
		if full && unmap && (im.backing == nil || base >= uint64(im.backingSize)) {
			return im.deallocate(gc)
		}
		return im.writeZeroData(l, base+in)
	}
	if !full && !im.extL2 {
		return im.writeZeroData(l, base+in)
	}
	sc := uint64(1) << im.scBits
	// Subclusters entirely inside the range get the zero bit; partly
	// covered ones get written.
	s0 := divRoundUp(in, sc)
	s1 := (in + l) / sc // exclusive
	if full {
		s0, s1 = 0, 32
	}
	if s0 >= s1 {
		return im.writeZeroData(l, base+in)
	}
	if head := s0*sc - in; s0*sc > in {
		if err := im.writeZeroData(head, base+in); err != nil {
			return err
		}
	}
	if tail := in + l - s1*sc; in+l > s1*sc && !full {
		if err := im.writeZeroData(tail, base+s1*sc); err != nil {
			return err
		}
	}
	t, idx, err := im.l2ForWrite(gc)
	if err != nil {
		return err
	}
	e, bm := im.entry(t, idx)
	if ci, err = im.classify(e, bm, gc); err != nil {
		return err
	}
	own, err := im.owned(&ci)
	if err != nil {
		return err
	}
	if !full {
		// Extended L2, whole subclusters of a cluster.
		m := subMask(s0, s1-1)
		if ci.typ == ctCompressed || (ci.typ == ctNormal && !own) {
			return im.writeZeroData((s1-s0)*sc, base+s0*sc)
		}
		ne := uint64(0)
		if ci.hasHost {
			ne = ci.host | flagCopied
		}
		im.setEntry(t, idx, ne, uint64(ci.zero|m)<<32|uint64(ci.alloc&^m))
		return nil
	}
	keep := own && !unmap && (ci.typ == ctNormal || ci.typ == ctZero)
	if im.extData && ci.hasHost {
		keep = true
	}
	switch {
	case im.extL2 && keep:
		im.setEntry(t, idx, ci.host|flagCopied, uint64(allSub)<<32)
	case im.extL2:
		im.setEntry(t, idx, 0, uint64(allSub)<<32)
	case keep:
		im.setEntry(t, idx, ci.host|flagCopied|flagZero, 0)
	default:
		im.setEntry(t, idx, flagZero, 0)
	}
	if !keep {
		im.freeEntry(&ci)
	}
	return nil
}

// discardCluster deallocates guest cluster gc if the discard covers it.
func (im *Image) discardCluster(gc uint64, full bool) error {
	if !full || im.rawData {
		return nil
	}
	base := gc << im.cb
	hasBacking := im.backing != nil && base < uint64(im.backingSize)
	if hasBacking {
		if im.h.version < 3 {
			return nil
		}
		return im.zeroCluster(gc, 0, min(im.cs, uint64(im.size)-base), true, true)
	}
	return im.deallocate(gc)
}

// deallocate makes guest cluster gc unallocated and releases its host
// clusters. Only used where unallocated reads as zeroes.
func (im *Image) deallocate(gc uint64) error {
	ci, err := im.lookup(gc)
	if err != nil {
		return err
	}
	if ci.typ == ctUnalloc && ci.zero == 0 {
		return nil
	}
	t, idx, err := im.l2ForWrite(gc)
	if err != nil {
		return err
	}
	e, bm := im.entry(t, idx)
	if ci, err = im.classify(e, bm, gc); err != nil {
		return err
	}
	im.setEntry(t, idx, 0, 0)
	im.freeEntry(&ci)
	return nil
}
