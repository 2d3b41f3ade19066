package qcow2

import (
	"fmt"
)

// Refcount entries: refcount_bits wide; for widths below 8 bits entry 0 is
// the least significant bits of byte 0.

func getRC(buf []byte, bits, i uint64) uint64 {
	switch bits {
	case 64:
		return be.Uint64(buf[i*8:])
	case 32:
		return uint64(be.Uint32(buf[i*4:]))
	case 16:
		return uint64(be.Uint16(buf[i*2:]))
	case 8:
		return uint64(buf[i])
	}
	bit := i * bits
	return uint64(buf[bit/8]>>(bit%8)) & (1<<bits - 1)
}

func setRC(buf []byte, bits, i, v uint64) {
	switch bits {
	case 64:
		be.PutUint64(buf[i*8:], v)
	case 32:
		be.PutUint32(buf[i*4:], uint32(v))
	case 16:
		be.PutUint16(buf[i*2:], uint16(v))
	case 8:
		buf[i] = byte(v)
	default:
		bit := i * bits
		mask := byte(1<<bits-1) << (bit % 8)
		buf[bit/8] = buf[bit/8]&^mask | byte(v<<(bit%8))&mask
	}
}

func maxRC(bits uint64) uint64 {
	if bits == 64 {
		return ^uint64(0)
	}
	return 1<<bits - 1
}

// refblockOffset validates and returns the offset of refcount block b (0 if
// it is not allocated).
func (im *Image) refblockOffset(b uint64) (uint64, error) {
	if b >= uint64(len(im.rt)) {
		return 0, nil
	}
	e := im.rt[b]
	if e == 0 {
		return 0, nil
	}
	if e&rtReservedMask != 0 {
		return 0, corruptf("refcount table entry %d (%#x) has reserved bits set", b, e)
	}
	off := e & rtOffsetMask
	if off%im.cs != 0 {
		return 0, corruptf("refcount block %d at %#x is not aligned to a cluster", b, off)
	}
	if off/im.cs >= im.fileClusters || off >= maxHostOffset {
		return 0, corruptf("refcount block %d at %#x lies past the end of the image", b, off)
	}
	if k := im.meta.at(off/im.cs) &^ metaRefBlock; k != 0 {
		return 0, corruptf("refcount block %d at %#x overlaps the %s", b, off, k)
	}
	return off, nil
}

// loadRefblock returns refcount block b, which lies at off, from the cache
// or the file.
//
// Nothing may use a cluster at or past the end of the image file (a
// reference there is corruption, refused when followed), and every cluster
// this Image allocates moves that end before its refcount is raised. So a
// nonzero refcount read from the file for such a cluster is a leak, left by
// a crash or put there by whoever made the image: it is dropped here, in
// memory, and reaches the file with the block's next write-back. Trusting
// it would let a small image send the allocator as far as the first zero
// refcount (a full block of 1-bit refcounts covers 32 GiB of 64 KiB
// clusters) and grow the file to there.
func (im *Image) loadRefblock(b, off uint64) (*table, error) {
	if t := im.rbc.get(off); t != nil {
		return t, nil
	}
	buf := make([]byte, im.cs)
	if _, err := readFullAt(im.f, buf, int64(off)); err != nil {
		return nil, fmt.Errorf("read refcount block at %#x: %w", off, err)
	}
	if first := b * im.rbEntries; first+im.rbEntries > im.fileClusters {
		var dropped uint64
		for i := max(im.fileClusters, first) - first; i < im.rbEntries; i++ {
			if getRC(buf, im.rcBits, i) != 0 {
				setRC(buf, im.rcBits, i, 0)
				dropped++
			}
		}
		if dropped > 0 {
			im.log.Warn("ignoring refcounts of clusters past the end of the image file (leaked)",
				"refcount_block", b, "clusters", dropped)
		}
	}
	return im.rbc.add(&table{off: off, buf: buf}), nil
}

// refcount returns the refcount of host cluster c.
func (im *Image) refcount(c uint64) (uint64, error) {
	off, err := im.refblockOffset(c / im.rbEntries)
	if err != nil || off == 0 {
		return 0, err
	}
	t, err := im.loadRefblock(c/im.rbEntries, off)
	if err != nil {
		return 0, err
	}
	return getRC(t.buf, im.rcBits, c%im.rbEntries), nil
}

// addRefcount adds delta to the refcount of host cluster c, creating its
// refcount block if needed.
func (im *Image) addRefcount(c uint64, delta int) error {
	if delta > 0 {
		if err := im.ensureRefblock(c / im.rbEntries); err != nil {
			return err
		}
	}
	off, err := im.refblockOffset(c / im.rbEntries)
	if err != nil {
		return err
	}
	if off == 0 {
		return corruptf("refcount of host cluster %d would drop below zero", c)
	}
	t, err := im.loadRefblock(c/im.rbEntries, off)
	if err != nil {
		return err
	}
	i := c % im.rbEntries
	v := getRC(t.buf, im.rcBits, i)
	switch {
	case delta < 0 && v < uint64(-delta):
		return corruptf("refcount of host cluster %d would drop below zero", c)
	case delta > 0 && maxRC(im.rcBits)-v < uint64(delta):
		return fmt.Errorf("refcount of host cluster %d would exceed %d (refcount_bits %d)", c, maxRC(im.rcBits), im.rcBits)
	}
	if delta < 0 {
		v -= uint64(-delta)
	} else {
		v += uint64(delta)
	}
	setRC(t.buf, im.rcBits, i, v)
	t.dirty = true
	im.metaChanged = true
	if v == 0 && c < im.freeHint {
		im.freeHint = c
	}
	return nil
}

func (im *Image) isReserved(c uint64) bool {
	for _, r := range im.reserved {
		if c >= r[0] && c < r[0]+r[1] {
			return true
		}
	}
	return false
}

// isFree reports whether host cluster c may be allocated.
func (im *Image) isFree(c uint64) (bool, error) {
	if im.isReserved(c) || im.meta.at(c) != 0 {
		return false, nil
	}
	rc, err := im.refcount(c)
	return rc == 0, err
}

// nextZero returns the first cluster at or after c whose refcount is 0,
// scanning refcount blocks in memory rather than cluster by cluster.
func (im *Image) nextZero(c uint64) (uint64, error) {
	E := im.rbEntries
	for {
		b := c / E
		off, err := im.refblockOffset(b)
		if err != nil || off == 0 {
			return c, err
		}
		t, err := im.loadRefblock(b, off)
		if err != nil {
			return 0, err
		}
		if i, ok := firstZeroRC(t.buf, im.rcBits, c%E); ok {
			return b*E + i, nil
		}
		c = (b + 1) * E
		if c*im.cs >= maxHostOffset {
			return c, nil
		}
	}
}

// firstZeroRC returns the index of the first zero entry at or after i in a
// refcount block.
func firstZeroRC(buf []byte, bits, i uint64) (uint64, bool) {
	n := uint64(len(buf)) * 8 / bits
	if bits < 8 {
		per := 8 / bits
		for i < n {
			if i%per == 0 && buf[i/per] != 0 && allFieldsSet(buf[i/per], bits) {
				i += per
				continue
			}
			if getRC(buf, bits, i) == 0 {
				return i, true
			}
			i++
		}
		return 0, false
	}
	w := bits / 8
	for ; i < n; i++ {
		p := buf[i*w : i*w+w]
		zero := true
		for _, x := range p {
			if x != 0 {
				zero = false
				break
			}
		}
		if zero {
			return i, true
		}
	}
	return 0, false
}

// allFieldsSet reports whether every bits-wide field of x is nonzero.
func allFieldsSet(x byte, bits uint64) bool {
	m := byte(1<<bits - 1)
	for s := uint64(0); s < 8; s += bits {
		if x>>s&m == 0 {
			return false
		}
	}
	return true
}

// findFree returns the first run of n free clusters at or after the hint.
func (im *Image) findFree(n uint64) (uint64, error) {
	start, _, err := im.findFreeRun(n, n)
	return start, err
}

// findFreeRun returns the first run of free clusters at or after the free
// hint that is at least least clusters long (or reaches want), and its
// length, want at most.
func (im *Image) findFreeRun(want, least uint64) (start, n uint64, err error) {
	least = min(max(least, 1), want)
	c := max(im.freeHint, 1)
	for {
		if c, err = im.nextZero(c); err != nil {
			return 0, 0, err
		}
		for n = 0; n < want; n++ {
			free, err := im.isFree(c + n)
			if err != nil {
				return 0, 0, err
			}
			if !free {
				break
			}
		}
		if (c+n)*im.cs > maxHostOffset || c+n < c {
			return 0, 0, fmt.Errorf("no free space below the 2^56 byte host offset limit")
		}
		if n >= least {
			return c, n, nil
		}
		c += n + 1
	}
}

// allocRun allocates findFreeRun's run with refcount 1.
func (im *Image) allocRun(want, least uint64) (start, n uint64, err error) {
	if start, n, err = im.findFreeRun(max(want, 1), least); err != nil {
		return 0, 0, err
	}
	return start, n, im.reserveRun(start, n)
}

// allocClusters allocates n contiguous host clusters with refcount 1.
func (im *Image) allocClusters(n uint64) (uint64, error) {
	if im.extData && n == 0 {
		return 0, nil
	}
	start, err := im.findFree(n)
	if err != nil {
		return 0, err
	}
	return start, im.reserveRun(start, n)
}

// reserveRun gives the free clusters start..start+n-1 refcount 1.
func (im *Image) reserveRun(start, n uint64) error {
	im.reserved = append(im.reserved, [2]uint64{start, n})
	defer func() { im.reserved = im.reserved[:len(im.reserved)-1] }()
	// The end moves first: loadRefblock drops refcounts past it.
	if start+n > im.fileClusters {
		im.fileClusters = start + n
	}
	for b := start / im.rbEntries; b <= (start+n-1)/im.rbEntries; b++ {
		if err := im.ensureRefblock(b); err != nil {
			return err
		}
	}
	for c := start; c < start+n; c++ {
		if err := im.addRefcount(c, 1); err != nil {
			return err
		}
	}
	im.freeHint = start + n
	return nil
}

// ensureRefblock makes sure refcount block b exists (in memory). A new
// block is placed inside the range it covers when possible, so that it
// describes itself; when a reservation holds that whole range (a large
// pool with small clusters), it is placed elsewhere and counted by another
// block, possibly a new one too (writeRefTable orders their table entries).
func (im *Image) ensureRefblock(b uint64) error {
	if b >= uint64(len(im.rt)) {
		if err := im.growReftable(b + 1); err != nil {
			return err
		}
	}
	if off, err := im.refblockOffset(b); err != nil || off != 0 {
		return err
	}
	E := im.rbEntries
	var r uint64
	self := false
	for c := max(b*E, 1); c < (b+1)*E; c++ {
		if !im.isReserved(c) && im.meta.at(c) == 0 {
			r, self = c, true
			break
		}
	}
	if !self {
		var err error
		if r, err = im.allocClusters(1); err != nil {
			return err
		}
	}
	buf := make([]byte, im.cs)
	if self {
		setRC(buf, im.rcBits, r-b*E, 1)
	}
	im.rbc.remove(r * im.cs)
	im.rbc.add(&table{off: r * im.cs, buf: buf, dirty: true})
	im.meta.add(r, metaRefBlock)
	if r >= im.fileClusters {
		im.fileClusters = r + 1
	}
	im.rt[b] = r * im.cs
	im.rtDirty[b*8/512] = true
	im.rtNew = append(im.rtNew, b)
	im.metaChanged = true
	return nil
}

// growReftable moves the refcount table to a larger place with at least
// minEntries entries. The new table reaches the disk (and the header points
// to it) at the next write-back.
func (im *Image) growReftable(minEntries uint64) error {
	cs := im.cs
	per := cs / 8
	newEntries := max(minEntries, uint64(len(im.rt))*2)
	var start, nc uint64
	for {
		newEntries = divRoundUp(newEntries, per) * per
		nc = newEntries / per
		if nc*cs > maxRefTableBytes {
			return fmt.Errorf("refcount table would exceed %d bytes (%d clusters of %d bytes)", maxRefTableBytes, nc, cs)
		}
		var err error
		if start, err = im.findFree(nc); err != nil {
			return err
		}
		if last := (start + nc - 1) / im.rbEntries; last >= newEntries {
			newEntries = last + 1
			continue
		}
		break
	}
	im.reserved = append(im.reserved, [2]uint64{start, nc})
	defer func() { im.reserved = im.reserved[:len(im.reserved)-1] }()

	oldOff, oldN := im.rtOff, uint64(len(im.rt))*8/cs
	wasMoved := im.rtMoved
	rt := make([]uint64, newEntries)
	copy(rt, im.rt)
	im.rt = rt
	im.rtOff = start * cs
	im.rtMoved = true
	im.meta.addRange(start, nc, metaRefTable)
	if start+nc > im.fileClusters {
		im.fileClusters = start + nc
	}
	for b := start / im.rbEntries; b <= (start+nc-1)/im.rbEntries; b++ {
		if err := im.ensureRefblock(b); err != nil {
			return err
		}
	}
	for c := start; c < start+nc; c++ {
		if err := im.addRefcount(c, 1); err != nil {
			return err
		}
	}
	if wasMoved {
		// The previous in-memory table never reached the header.
		im.meta.removeRange(oldOff/cs, oldN, metaRefTable)
		for c := oldOff / cs; c < oldOff/cs+oldN; c++ {
			if err := im.addRefcount(c, -1); err != nil {
				return err
			}
		}
	} else {
		im.oldRT = [2]uint64{oldOff / cs, oldN}
	}
	im.log.Debug("refcount table grown", "entries", newEntries, "offset", im.rtOff)
	return nil
}

// freeCluster schedules host cluster c for release once the table change
// that dropped the reference is on disk.
func (im *Image) freeCluster(c uint64) {
	im.pendingFree = append(im.pendingFree, c)
}

// freeEntry schedules the release of whatever host clusters ci holds.
func (im *Image) freeEntry(ci *cinfo) {
	switch {
	case im.extData:
		return
	case ci.typ == ctCompressed:
		first := ci.coff / im.cs
		last := (ci.coff + ci.csize - 1) / im.cs
		for c := first; c <= last; c++ {
			im.freeCluster(c)
		}
		im.dropDecompressCache()
	case ci.hasHost:
		im.freeCluster(ci.host / im.cs)
	}
}
