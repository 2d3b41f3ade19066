package qcow2

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
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
// internal snapshots, bitmaps or an external data file; an image with
// corruption is refused (leaks are fine).
//
// opts declares the image's absolute path and its backing chain, as for
// Open (ReadOnly is ignored): an image with a backing file is grown only
// with its chain declared, since the backing file's data beyond the old
// size must not show through the new area. Resize opens only the files in
// opts, on copies of their descriptors: the caller keeps f and every file
// in opts.
//
// Where the new area needs no zeroing and the new size fits the clusters
// of the L1 table, only the header changes, in one write. Otherwise, in
// order, each step durable before the next:
//   - the L1 table grows: in its clusters (the header's entry count), or
//     as a larger table written after the end of the file, then the dirty
//     bit, the header switched to it, and the refcounts rebuilt;
//   - the new area is zeroed, still beyond the image's virtual size: the
//     backing file's data there is hidden with zero clusters, and the part
//     of the old last cluster beyond the old size is zeroed (copied up
//     from the backing file when the image has none of its own);
//   - the header takes the new size.
//
// A crash at any point leaves the image as it was (with unreferenced bytes
// after its end, or a larger L1 table, or zeroed clusters beyond its
// size), or dirty, which the next read-write open (here or in QEMU)
// repairs; always of the old size or of the new one with the new area
// zeroed. A version 2 image has no dirty bit and no zero clusters, and an
// image on a block device no room after its end, so these can grow only
// within their L1 table's clusters, and a version 2 image only where its
// backing file has no data.
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
	if opts.DataFile != nil {
		return fmt.Errorf("%w: resizing an image with an external data file is not supported", ErrUnsupported)
	}
	_, fileSize, err := identify(f)
	if err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return err
	}
	if h.incompat&incompatDirty != 0 && h.incompat&incompatCorrupt == 0 {
		// Left dirty (an interrupted resize, a crash with lazy
		// refcounts): repaired as a read-write open repairs it, then
		// resized, as qemu-img resize does (it was refused; found in
		// review, helper-92).
		if h, fileSize, err = repairDirty(f, opts); err != nil {
			return fmt.Errorf("repair the image left dirty: %w", err)
		}
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
	case uint64(size) == old:
		return nil
	}
	cs := h.clusterSize()
	need := divRoundUp(uint64(size), cs*h.l2Entries())
	if need*8 > maxL1Bytes {
		return fmt.Errorf("new size %d needs an L1 table of %d bytes (limit %d)%s", size, need*8, maxL1Bytes, largerClusters(h.clusterBits, "convert to"))
	}
	// Nothing may be built on corruption; leaks are harmless.
	res, err := Check(f, RepairNone)
	if err != nil {
		return fmt.Errorf("check before resizing: %w", err)
	}
	if n := res.Corruptions + res.CheckErrors; n > 0 {
		return fmt.Errorf("%w: %d errors found before resizing; check and repair the image first (img check)", ErrCorrupt, n)
	}

	// The new area needs zeroing where the old last cluster runs past the
	// old size (its tail may hold the backing file's data, copied up with
	// the cluster, or what a shrink left), where the image maps clusters
	// beyond its size (QEMU's shrink unmaps them, a hostile image need
	// not), and where the backing file has data. The image and its
	// declared chain are opened first, read-only, whenever a backing file
	// is involved or zeroing will open the image, so that what Open
	// refuses changes nothing.
	zero := old%cs != 0
	if !zero {
		if zero, err = mappedBeyond(f, h, old); err != nil {
			return err
		}
	}
	if h.backingOff != 0 || len(opts.Backing) > 0 || zero {
		bsize, err := backingSize(f, opts)
		if err != nil {
			return err
		}
		zero = zero || bsize > int64(old)
		if h.version < 3 && bsize > int64(divRoundUp(old, cs)*cs) {
			return fmt.Errorf("%w: the backing file has data beyond the old size, which a version 2 image cannot hide without allocating the whole area (it has no zero clusters); convert it to version 3 first (qemu-img amend -o compat=1.1)", ErrUnsupported)
		}
	}
	zeroAndSize := func() error {
		if err := step("zero"); err != nil {
			return err
		}
		if err := zeroGrown(f, opts, old, size); err != nil {
			return fmt.Errorf("zero the new area: %w", err)
		}
		var b [8]byte
		be.PutUint64(b[:], uint64(size))
		if err := step("size"); err != nil {
			return err
		}
		return writeSynced(f, b[:], hdrSizeOff)
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
		if zero {
			if l1 != uint64(h.l1Size) {
				var b [4]byte
				be.PutUint32(b[:], uint32(l1))
				if err := step("l1"); err != nil {
					return err
				}
				if err := writeSynced(f, b[:], hdrL1SizeOff); err != nil {
					return fmt.Errorf("grow the L1 table: %w", err)
				}
			}
			return zeroAndSize()
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
	// From here on, a step that fails puts the image back as it was:
	// the log saves what the header switch and the repair overwrite.
	undo, err := newUndoLog(f)
	if err != nil {
		return err
	}
	failed := func(err error) error {
		if rerr := undo.restore(f); rerr != nil {
			return fmt.Errorf("%w; restoring the image failed too (repair it with img check --repair all): %v", err, rerr)
		}
		return err
	}
	if err := step("table"); err != nil {
		return err
	}
	if err := writeSynced(f, table, int64(newOff)); err != nil {
		return failed(fmt.Errorf("write new L1 table: %w", err))
	}
	if err := step("dirty"); err != nil {
		return err
	}
	if err := writeIncompatUndo(f, h.incompat|incompatDirty, undo); err != nil {
		return failed(err)
	}
	// With zeroing to do, the header keeps the old size until the new
	// area is zeroed.
	hdrSize := uint64(size)
	if zero {
		hdrSize = old
	}
	var b [hdrL1OffsetOff + 8 - hdrSizeOff]byte
	be.PutUint64(b[0:], hdrSize)
	be.PutUint32(b[hdrL1SizeOff-4-hdrSizeOff:], h.cryptMethod)
	be.PutUint32(b[hdrL1SizeOff-hdrSizeOff:], uint32(need))
	be.PutUint64(b[hdrL1OffsetOff-hdrSizeOff:], newOff)
	if err := step("header"); err != nil {
		return err
	}
	if err := undo.writeAt(f, b[:], hdrSizeOff); err != nil {
		return failed(err)
	}
	if err := fdatasync(f); err != nil {
		return failed(err)
	}
	// The rebuild counts the new table, frees the old one and clears
	// the dirty bit.
	if err := step("repair"); err != nil {
		return err
	}
	res, err = CheckWith(f, CheckOptions{Repair: RepairAll, undo: undo})
	if err != nil {
		return failed(fmt.Errorf("rebuild refcounts after moving the L1 table: %w", err))
	}
	if !res.Clean() {
		return failed(fmt.Errorf("%w: %d errors remain after moving the L1 table", ErrCorrupt, res.Corruptions+res.CheckErrors))
	}
	if resizeRepairFault != nil {
		if err := resizeRepairFault(); err != nil {
			return failed(err)
		}
	}
	if zero {
		return zeroAndSize()
	}
	return nil
}

// resizeRepairFault, set by tests, fails a Resize after its refcount
// repair (as a repair that leaves errors does).
var resizeRepairFault func() error

// mappedBeyond reports whether any L2 entry of the image in f (checked,
// so its tables lie inside the file) describes a guest cluster at or
// beyond old, which must be cluster-aligned.
func mappedBeyond(f *os.File, h *header, old uint64) (bool, error) {
	cs := h.clusterSize()
	l2e := h.l2Entries()
	first := old / cs // the first guest cluster beyond the old size
	if first/l2e >= uint64(h.l1Size) {
		return false, nil
	}
	l1, err := readTableAt(f, h.l1Off, uint64(h.l1Size))
	if err != nil {
		return false, fmt.Errorf("read L1 table: %w", err)
	}
	words := cs / 8 / l2e // 8-byte words per entry: 1, or 2 with extended L2
	for i := first / l2e; i < uint64(len(l1)); i++ {
		off := l1[i] & l1OffsetMask
		if off == 0 {
			continue
		}
		l2, err := readTableAt(f, off, cs/8)
		if err != nil {
			return false, fmt.Errorf("read L2 table %d: %w", i, err)
		}
		from := uint64(0)
		if i == first/l2e {
			from = first % l2e
		}
		for _, w := range l2[from*words:] {
			if w != 0 {
				return true, nil
			}
		}
	}
	return false, nil
}

// backingSize opens the image in f read-only with the chain opts declares
// (which Open checks against the names the image records) and returns its
// backing file's virtual size, 0 without one.
func backingSize(f *os.File, opts Options) (int64, error) {
	o, done, err := dupOpen(f, opts)
	if err != nil {
		return 0, err
	}
	defer done()
	o.ReadOnly = true
	im, err := Open(o.file, o.Options)
	if err != nil {
		return 0, err
	}
	n := int64(0)
	if im.backing != nil {
		n = im.backingSize
	}
	return n, im.Close()
}

// zeroGrown zeroes [old, size) of the image in f, opened read-write at
// virtual size size (its header still says old), and makes it durable.
func zeroGrown(f *os.File, opts Options, old uint64, size int64) error {
	o, done, err := dupOpen(f, opts)
	if err != nil {
		return err
	}
	defer done()
	o.ReadOnly = false
	o.growTo = size
	im, err := Open(o.file, o.Options)
	if err != nil {
		return err
	}
	if err := im.WriteZeroes(int64(old), size-int64(old), false); err != nil {
		im.Close()
		return err
	}
	if err := im.Flush(); err != nil {
		im.Close()
		return err
	}
	return im.Close()
}

// dupOpened is Options whose files (and the image's, file) are copies of
// the caller's descriptors, for an Open that takes ownership of them.
type dupOpened struct {
	Options
	file *os.File
}

// dupOpen copies the descriptors of f and of every file opts declares.
// done closes the copies (again, harmlessly, after an Image closed them).
func dupOpen(f *os.File, opts Options) (*dupOpened, func(), error) {
	var files []*os.File
	done := func() {
		for _, c := range files {
			c.Close()
		}
	}
	dup := func(src *os.File) (*os.File, error) {
		if src == nil {
			return nil, nil
		}
		fd, err := unix.FcntlInt(src.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("duplicate %s: %w", src.Name(), err)
		}
		c := os.NewFile(uintptr(fd), src.Name())
		files = append(files, c)
		return c, nil
	}
	o := &dupOpened{Options: opts}
	var err error
	if o.file, err = dup(f); err != nil {
		done()
		return nil, nil, err
	}
	o.Backing = make([]Layer, len(opts.Backing))
	for i, l := range opts.Backing {
		o.Backing[i] = l
		if o.Backing[i].File, err = dup(l.File); err != nil {
			done()
			return nil, nil, err
		}
	}
	return o, done, nil
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

// repairDirty repairs a dirty image through a read-write Open of a second
// handle on f (Open repairs the refcounts; Close writes it back clean) and
// returns the header and size as they are then.
func repairDirty(f *os.File, opts Options) (*header, int64, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("dup: %w", err)
	}
	o := opts
	o.ReadOnly = false
	im, err := Open(os.NewFile(uintptr(fd), f.Name()), o)
	if err != nil {
		return nil, 0, err
	}
	if err := im.Close(); err != nil {
		return nil, 0, err
	}
	_, fileSize, err := identify(f)
	if err != nil {
		return nil, 0, fmt.Errorf("stat: %w", err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return nil, 0, err
	}
	if h.incompat&incompatDirty != 0 {
		return nil, 0, errors.New("the image is still dirty after the repair")
	}
	return h, fileSize, nil
}
