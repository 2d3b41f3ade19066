package qcow2

import (
	"errors"
	"fmt"
	"os"
)

// Header field offsets Resize updates.
const (
	hdrSizeOff     = 24 // virtual size, u64
	hdrL1SizeOff   = 36 // L1 entries, u32
	hdrL1OffsetOff = 40 // L1 table offset, u64
)

// ErrShrink marks a Resize to a smaller size, which qcow2 images refuse.
var ErrShrink = errors.New("shrinking a qcow2 image is not supported")

// Resize grows the virtual size of the qcow2 image in f (opened
// read-write, used by no one else: the caller holds the image's write
// lock) to size bytes, as `qemu-img resize` does. The new area reads as
// zeros. Only growing is supported, and only for an image without
// internal snapshots, bitmaps, a backing file (whose data beyond the old
// size would show through) or an external data file; an image with
// corruption is refused (leaks are fine).
//
// When the new size fits the clusters of the L1 table, only the header
// changes, in one write. Otherwise a larger L1 table is written after the
// end of the file, the dirty bit is set, the header is switched to the new
// table, and the refcounts are rebuilt; a crash at any point leaves the
// image as it was (with unreferenced bytes after its end) or dirty, of
// the old or the new size, which the next read-write open (here or in
// QEMU) repairs. A version 2 image has no dirty bit, and an image on a
// block device no room after its end, so these can only grow within
// their L1 table's clusters.
//
// opts declares the image's absolute path and its backing chain, as for
// Open (ReadOnly is ignored). Resize opens only the files in opts, on
// copies of their descriptors: the caller keeps f and every file in opts.
func Resize(f *os.File, size int64, opts Options) error {
	return resizeWith(f, size, opts, nil)
}

// resizeWith is Resize with a hook called before each durable step (the
// crash tests stop there).
func resizeWith(f *os.File, size int64, opts Options, hook func(step string) error) error {
	if f == nil {
		return errors.New("qcow2: nil image file")
	}
	step := func(name string) error {
		if hook == nil {
			return nil
		}
		return hook(name)
	}
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("new size %d is not a positive multiple of 512", size)
	}
	_, fileSize, err := identify(f)
	if err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return err
	}
	old := h.size
	switch {
	case uint64(size) < old:
		return fmt.Errorf("%w (the image has %d bytes, asked for %d)", ErrShrink, old, size)
	case h.incompat&incompatCorrupt != 0:
		return fmt.Errorf("%w: image is marked corrupt; check and repair it first (img check --repair all)", ErrCorrupt)
	case h.incompat&incompatDirty != 0:
		return fmt.Errorf("image was not closed cleanly (dirty); repair its refcounts first (img check --repair all)")
	case h.cryptMethod != 0:
		return fmt.Errorf("%w: encrypted images cannot be resized", ErrUnsupported)
	case h.nbSnapshots > 0:
		return fmt.Errorf("%w: the image has %d internal snapshots; resizing one is not supported", ErrUnsupported, h.nbSnapshots)
	case h.bitmapsExtRaw:
		return fmt.Errorf("%w: the image has persistent bitmaps; resizing one is not supported", ErrUnsupported)
	case h.incompat&incompatDataFile != 0 || h.hasDataFileName:
		return fmt.Errorf("%w: the image has an external data file; resizing one is not supported", ErrUnsupported)
	case h.backingOff != 0:
		return fmt.Errorf("%w: the image has a backing file, whose data beyond the old size would show through the new area; resizing one is not supported", ErrUnsupported)
	case uint64(size) == old:
		return nil
	}
	cs := h.clusterSize()
	need := divRoundUp(uint64(size), cs*h.l2Entries())
	if need*8 > maxL1Bytes {
		return fmt.Errorf("new size %d needs an L1 table of %d bytes (limit %d); convert to larger clusters", size, need*8, maxL1Bytes)
	}
	// Nothing may be built on corruption; leaks are harmless.
	res, err := Check(f, RepairNone)
	if err != nil {
		return fmt.Errorf("check before resizing: %w", err)
	}
	if n := res.Corruptions + res.CheckErrors; n > 0 {
		return fmt.Errorf("%w: %d errors found before resizing; check and repair the image first (img check)", ErrCorrupt, n)
	}

	// The L1 table grows in place when its clusters have room and that
	// room is zeros (as QEMU leaves it).
	l1Bytes := uint64(h.l1Size) * 8
	room := divRoundUp(l1Bytes, cs) * cs
	if need <= uint64(h.l1Size) || (need*8 <= room && zeroAt(f, h.l1Off+l1Bytes, need*8-l1Bytes)) {
		l1 := max(need, uint64(h.l1Size))
		// qemu-img create ends the file after the table's entries, not
		// at the end of its cluster: the grown table must be in the
		// file (this package refuses one that is not), so its room is
		// written out first. That room is the table's own cluster, so a
		// crash after it leaves only a longer file.
		if end := h.l1Off + l1*8; end > uint64(fileSize) {
			if err := step("extend"); err != nil {
				return err
			}
			if err := writeSynced(f, make([]byte, end-uint64(fileSize)), fileSize); err != nil {
				return fmt.Errorf("extend the L1 table's cluster: %w", err)
			}
		}
		var b [hdrL1SizeOff + 4 - hdrSizeOff]byte
		be.PutUint64(b[0:], uint64(size))
		be.PutUint32(b[hdrL1SizeOff-4-hdrSizeOff:], h.cryptMethod)
		be.PutUint32(b[hdrL1SizeOff-hdrSizeOff:], uint32(l1))
		if err := step("header"); err != nil {
			return err
		}
		return writeSynced(f, b[:], hdrSizeOff)
	}
	if h.version < 3 {
		return fmt.Errorf("%w: a version 2 image can grow only within its L1 table (%d bytes at most here); convert it to version 3 first", ErrUnsupported, room/8*cs*h.l2Entries())
	}

	if st, err := f.Stat(); err == nil && st.Mode()&os.ModeDevice != 0 {
		return fmt.Errorf("%w: on a block device the L1 table cannot move past the device's end, so the image can grow only within its L1 table (%d bytes at most here)", ErrUnsupported, room/8*cs*h.l2Entries())
	}

	// A new, larger L1 table after the end of the file, then the dirty
	// bit, then the header: until the refcounts are rebuilt, they do not
	// know the new table. A table that cannot be written changes nothing.
	l1, err := readTableAt(f, h.l1Off, uint64(h.l1Size))
	if err != nil {
		return fmt.Errorf("read L1 table: %w", err)
	}
	table := make([]byte, divRoundUp(need*8, cs)*cs)
	for i, e := range l1 {
		be.PutUint64(table[i*8:], e)
	}
	newOff := divRoundUp(uint64(fileSize), cs) * cs
	if newOff+uint64(len(table)) > maxHostOffset {
		return fmt.Errorf("%w: no room for a new L1 table after the end of the file", ErrUnsupported)
	}
	if err := step("table"); err != nil {
		return err
	}
	if err := writeSynced(f, table, int64(newOff)); err != nil {
		f.Truncate(fileSize) // what was written is unreferenced
		return fmt.Errorf("write new L1 table: %w", err)
	}
	if err := step("dirty"); err != nil {
		return err
	}
	if err := writeIncompat(f, h.incompat|incompatDirty); err != nil {
		return err
	}
	var b [hdrL1OffsetOff + 8 - hdrSizeOff]byte
	be.PutUint64(b[0:], uint64(size))
	be.PutUint32(b[hdrL1SizeOff-4-hdrSizeOff:], h.cryptMethod)
	be.PutUint32(b[hdrL1SizeOff-hdrSizeOff:], uint32(need))
	be.PutUint64(b[hdrL1OffsetOff-hdrSizeOff:], newOff)
	if err := step("header"); err != nil {
		return err
	}
	if err := writeSynced(f, b[:], hdrSizeOff); err != nil {
		return err
	}
	// The rebuild counts the new table, frees the old one and clears
	// the dirty bit.
	if err := step("repair"); err != nil {
		return err
	}
	res, err = Check(f, RepairAll)
	if err != nil {
		return fmt.Errorf("rebuild refcounts after moving the L1 table: %w", err)
	}
	if !res.Clean() {
		return fmt.Errorf("%w: %d errors remain after moving the L1 table", ErrCorrupt, res.Corruptions+res.CheckErrors)
	}
	return nil
}

// zeroAt reports whether the n bytes of f at off are all zero (false on a
// read error: the caller then takes the path that does not need them).
func zeroAt(f *os.File, off, n uint64) bool {
	if n == 0 {
		return true
	}
	b := make([]byte, n)
	if _, err := readFullAt(f, b, int64(off)); err != nil {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// writeSynced writes p at off and makes it durable.
func writeSynced(f *os.File, p []byte, off int64) error {
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return fdatasync(f)
}
