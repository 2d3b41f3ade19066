package qcow2

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"

	"golang.org/x/sys/unix"
)

// RepairMode selects what Check fixes.
type RepairMode int

const (
	// RepairNone only reports.
	RepairNone RepairMode = iota
	// RepairLeaks lowers refcounts that are higher than the references.
	RepairLeaks
	// RepairAll also raises refcounts that are too low (rebuilding the
	// refcount structure if needed) and fixes copied flags.
	RepairAll
)

// CheckResult reports what Check found, in the terms `qemu-img check`
// uses. After a repair the counts are those of a second pass over the
// repaired image.
type CheckResult struct {
	Corruptions      int
	Leaks            int
	CheckErrors      int
	CorruptionsFixed int
	LeaksFixed       int
	// RefcountsRebuilt is set when the refcount structure was rewritten.
	RefcountsRebuilt bool

	ImageEndOffset     int64
	TotalClusters      int64 // guest clusters
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64

	// SharedL2Tables counts the L2 tables that more than one entry of
	// the active L1 table names. With refcounts and copied flags to
	// match this is no corruption (qemu-img check accepts it), but a
	// read-write Open refuses such an image (see sharedL2), so an upload
	// gate must too.
	SharedL2Tables int

	// Messages describe each finding, one line each (bounded).
	Messages []string
}

// Clean reports whether the image has neither errors nor leaks.
func (r *CheckResult) Clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}

const maxCheckMessages = 1000

// CheckOptions tunes CheckWith.
type CheckOptions struct {
	Repair RepairMode
	// MemoryLimit bounds the bytes of bookkeeping the check may hold
	// (reference counts, maps of metadata clusters, pending fixes); an
	// image that needs more is refused with one line. 0 means a quarter of
	// the process's data limit (RLIMIT_DATA; 1 GiB for a sandboxed plugin),
	// or 1 GiB where the data limit is unlimited.
	MemoryLimit int64

	// undo, if set, saves what the repair overwrites (for Resize, which
	// puts the image back when its repair fails).
	undo *undoLog
}

// Check verifies the image's refcounts against the references its tables
// make, and table entries against the format's rules. With a repair mode
// it fixes what it reports (and nothing else), then checks again.
func Check(f *os.File, repair RepairMode) (CheckResult, error) {
	return CheckWith(f, CheckOptions{Repair: repair})
}

// DefaultCheckMemory is CheckOptions.MemoryLimit's default: a quarter of
// the process's data limit, 1 GiB without one.
func DefaultCheckMemory() int64 {
	// prlimit64, which the plugins' seccomp profiles allow for reading,
	// rather than getrlimit, which they refuse.
	var rl unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_DATA, nil, &rl); err != nil || rl.Cur == unix.RLIM_INFINITY || rl.Cur > 4<<30 {
		return 1 << 30
	}
	return max(int64(rl.Cur/4), 16<<20)
}

// CheckWith is Check with options.
func CheckWith(f *os.File, o CheckOptions) (CheckResult, error) {
	repair := o.Repair
	memLimit := o.MemoryLimit
	if memLimit <= 0 {
		memLimit = DefaultCheckMemory()
	}
	if f == nil {
		return CheckResult{}, errors.New("qcow2: nil image file")
	}
	_, size, err := identify(f)
	if err != nil {
		return CheckResult{}, fmt.Errorf("stat: %w", err)
	}
	h, err := readHeader(f, size)
	if err != nil {
		return CheckResult{}, err
	}
	if repair != RepairNone && h.incompat&incompatCorrupt != 0 && repair != RepairAll {
		return CheckResult{}, fmt.Errorf("%w: image is marked corrupt; only a full repair may write to it", ErrCorrupt)
	}
	c, err := newChecker(f, h, uint64(memLimit))
	if err != nil {
		return CheckResult{}, err
	}
	c.undo = o.undo
	res, err := c.run(repair)
	if err != nil || repair == RepairNone {
		return res, err
	}
	fixedL, fixedC, rebuilt := res.LeaksFixed, res.CorruptionsFixed, res.RefcountsRebuilt
	if fixedL+fixedC > 0 || rebuilt {
		if err := fdatasync(f); err != nil {
			return res, err
		}
	}
	// Second pass over the repaired image.
	_, size, err = identify(f)
	if err != nil {
		return res, fmt.Errorf("stat: %w", err)
	}
	if h, err = readHeader(f, size); err != nil {
		return res, err
	}
	// (A pass without repair writes nothing: no undo log.)
	if c, err = newChecker(f, h, uint64(memLimit)); err != nil {
		return res, err
	}
	res2, err := c.run(RepairNone)
	if err != nil {
		return res2, err
	}
	res2.LeaksFixed, res2.CorruptionsFixed, res2.RefcountsRebuilt = fixedL, fixedC, rebuilt
	res2.Messages = append(res.Messages, res2.Messages...)
	if repair == RepairAll && res2.Clean() && h.incompat&(incompatCorrupt|incompatDirty) != 0 {
		if err := writeIncompatUndo(f, h.incompat&^(incompatCorrupt|incompatDirty), o.undo); err != nil {
			return res2, err
		}
	}
	return res2, nil
}

func writeIncompat(f *os.File, v uint64) error {
	return writeIncompatUndo(f, v, nil)
}

// writeIncompatUndo is writeIncompat saving what it overwrites in u.
func writeIncompatUndo(f *os.File, v uint64, u *undoLog) error {
	var b [8]byte
	be.PutUint64(b[:], v)
	if err := u.writeAt(f, b[:], hdrIncompatOff); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	return fdatasync(f)
}

type checker struct {
	f  *os.File
	h  *header
	cs uint64
	// activeDups counts the L2 tables that several entries of the
	// active L1 table name (the walks read each such table once).
	activeDups map[uint64]uint64
	fileSize   uint64
	nb         uint64 // clusters counted
	// refs counts the references to each host cluster, in chunks of
	// refChunk clusters allocated when a cluster in them is first
	// referenced: a sparse 400 GiB file of 512-byte clusters costs what
	// its used part does.
	refs     [][]uint16
	over     map[uint64]uint64 // references beyond 65535
	rt       []uint64
	snaps    []snapshot
	snapSize uint64
	extData  bool
	res      CheckResult
	nmsg     int

	// skipRefStructs leaves the refcount table and blocks out of refs
	// (for a rebuild, which replaces them).
	skipRefStructs bool
	// refStructBad is set when the refcount structure itself is corrupt
	// (a reserved bit in the table, a table or block cluster shared with
	// other metadata or data): a full repair rebuilds it rather than
	// adjusting refcounts in it.
	refStructBad bool
	// refStructErrs counts the corruptions of the refcount structure
	// itself, which a rebuild fixes.
	refStructErrs int

	rbCache map[uint64][]byte
	rbDirty map[uint64]bool

	// mult is how many times the table being walked is referenced;
	// references and errors found in it count that many times, as if it
	// had been walked once per reference.
	mult uint64
	// readBudget bounds the bytes of snapshot L1 tables and bitmap
	// tables read, so that a hostile image cannot make a check endless.
	readBudget uint64
	// meta records which clusters hold metadata, so that a repair never
	// writes one kind of table over another.
	meta map[uint64]metaKind

	// mem is the bookkeeping charged so far, memLimit its bound; memErr
	// is set (once) when a charge goes past it.
	mem, memLimit uint64
	memErr        error

	// undo, if set, saves what each write overwrites.
	undo *undoLog
}

// refChunk is the number of clusters one chunk of refs covers (128 KiB).
const (
	refChunkBits = 16
	refChunk     = 1 << refChunkBits
)

// Estimated bytes one entry of the checker's maps and slices costs, for
// charge.
const (
	mapEntryBytes  = 48
	fixEntryBytes  = 24
	sliceSlotBytes = 24
)

// charge accounts n bytes of bookkeeping. Past memLimit it records a
// one-line error, which the walk reports when it returns, and says no.
func (c *checker) charge(n uint64) bool {
	if c.memErr != nil {
		return false
	}
	c.mem += n
	if c.mem > c.memLimit {
		c.memErr = fmt.Errorf("image too large to check within %d MiB of memory (%d clusters of %d bytes in a %d-byte file)",
			c.memLimit>>20, c.nb, c.cs, c.fileSize)
		return false
	}
	return true
}

// setMeta ORs k into cluster cl's kinds.
func (c *checker) setMeta(cl uint64, k metaKind) {
	if v, ok := c.meta[cl]; ok {
		c.meta[cl] = v | k
		return
	}
	if c.charge(mapEntryBytes) {
		c.meta[cl] = k
	}
}

// mark records that [off, off+n) holds metadata of kind k.
func (c *checker) mark(off, n uint64, k metaKind) {
	if n == 0 || off+n < off {
		return
	}
	for cl := off / c.cs; cl <= (off+n-1)/c.cs && cl <= c.nb; cl++ {
		c.setMeta(cl, k)
	}
}

// guard refuses a repair write of kind k to [off, off+n) that would land
// on other metadata.
func (c *checker) guard(off, n uint64, allowed metaKind) error {
	for cl := off / c.cs; cl <= (off+n-1)/c.cs; cl++ {
		if other := c.meta[cl] &^ allowed; other != 0 {
			return fmt.Errorf("%w: refusing a repair write at %#x: it would overwrite the %s", ErrCorrupt, off, other)
		}
	}
	return nil
}

const checkReadBudget = 1 << 30

func (c *checker) spend(n uint64) error {
	if n > c.readBudget {
		return fmt.Errorf("image references more than %d bytes of snapshot and bitmap tables; refusing to check it", uint64(checkReadBudget))
	}
	c.readBudget -= n
	return nil
}

func newChecker(f *os.File, h *header, memLimit uint64) (*checker, error) {
	cs := h.clusterSize()
	c := &checker{
		f:        f,
		h:        h,
		cs:       cs,
		fileSize: uint64(h.fileSize),
		extData:  h.incompat&incompatDataFile != 0,
		over:     map[uint64]uint64{},
		rbCache:  map[uint64][]byte{},
		rbDirty:  map[uint64]bool{},
		mult:     1,
		memLimit: memLimit,
	}
	c.nb = divRoundUp(c.fileSize, cs)
	if c.nb > 1<<31 {
		return nil, fmt.Errorf("image file too large to check (%d clusters)", c.nb)
	}
	var err error
	if c.snaps, c.snapSize, err = readSnapshots(f, h); err != nil {
		return nil, err
	}
	if c.rt, err = readTableAt(f, h.rtOff, h.refTableBytes()/8); err != nil {
		return nil, fmt.Errorf("read refcount table: %w", err)
	}
	return c, nil
}

func readTableAt(f *os.File, off, n uint64) ([]uint64, error) {
	if n == 0 {
		return nil, nil
	}
	buf := make([]byte, n*8)
	if _, err := readFullAt(f, buf, int64(off)); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = be.Uint64(buf[i*8:])
	}
	return t, nil
}

func (c *checker) msg(format string, args ...any) {
	c.nmsg++
	if c.nmsg <= maxCheckMessages {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
	} else if c.nmsg == maxCheckMessages+1 {
		c.res.Messages = append(c.res.Messages, "(further messages suppressed)")
	}
}

func (c *checker) corrupt(format string, args ...any) {
	c.res.Corruptions += int(c.mult)
	if c.mult > 1 {
		format += fmt.Sprintf(" (in a table referenced %d times)", c.mult)
	}
	c.msg("ERROR "+format, args...)
}

// inc counts one reference to every cluster of [off, off+n).
func (c *checker) inc(off, n uint64) {
	if n == 0 {
		return
	}
	if off+n < off || off+n >= c.fileSize+c.cs {
		c.corrupt("counting reference for region exceeding the end of the file by one cluster or more: offset %#x size %#x", off, n)
		return
	}
	for k := off / c.cs; k <= (off+n-1)/c.cs; k++ {
		ch := c.chunk(k)
		if ch == nil {
			return // over the memory limit: the walk reports it
		}
		i := k % refChunk
		if v := uint64(ch[i]) + c.mult; v > 0xffff {
			if _, ok := c.over[k]; !ok && !c.charge(mapEntryBytes) {
				return
			}
			c.over[k] += v - 0xffff
			ch[i] = 0xffff
		} else {
			ch[i] = uint16(v)
		}
	}
}

// chunk returns the chunk of refs holding cluster k, allocating it (and
// charging it) if need be; nil past the memory limit.
func (c *checker) chunk(k uint64) []uint16 {
	ci := k >> refChunkBits
	if ci >= uint64(len(c.refs)) {
		n := max(ci+1, (c.nb>>refChunkBits)+1)
		if !c.charge((n - uint64(len(c.refs))) * sliceSlotBytes) {
			return nil
		}
		grow := make([][]uint16, n)
		copy(grow, c.refs)
		c.refs = grow
	}
	if c.refs[ci] == nil {
		if !c.charge(refChunk * 2) {
			return nil
		}
		c.refs[ci] = make([]uint16, refChunk)
	}
	return c.refs[ci]
}

func (c *checker) ref(k uint64) uint64 {
	ci := k >> refChunkBits
	if ci >= uint64(len(c.refs)) || c.refs[ci] == nil {
		return 0
	}
	return uint64(c.refs[ci][k%refChunk]) + c.over[k]
}

// noRefs reports whether no cluster of k's chunk is referenced.
func (c *checker) noRefs(k uint64) bool {
	ci := k >> refChunkBits
	return ci >= uint64(len(c.refs)) || c.refs[ci] == nil
}

// refEnd returns one past the highest referenced cluster (0 if none).
func (c *checker) refEnd() uint64 {
	for ci := len(c.refs) - 1; ci >= 0; ci-- {
		ch := c.refs[ci]
		for i := len(ch) - 1; i >= 0; i-- {
			if ch[i] != 0 {
				return uint64(ci)<<refChunkBits + uint64(i) + 1
			}
		}
	}
	return 0
}

// anyRef reports whether a cluster in [lo, hi) is referenced.
func (c *checker) anyRef(lo, hi uint64) bool {
	for k := lo; k < hi; {
		if c.noRefs(k) {
			k = (k>>refChunkBits + 1) << refChunkBits
			continue
		}
		if c.ref(k) > 0 {
			return true
		}
		k++
	}
	return false
}

// refcount reads the on-disk refcount of cluster k.
func (c *checker) refcount(k uint64) (uint64, error) {
	E := c.h.refblockEntries()
	b := k / E
	if b >= uint64(len(c.rt)) {
		return 0, nil
	}
	off, err := c.refblockOff(b)
	if err != nil || off == 0 {
		return 0, err
	}
	buf, err := c.refblock(off)
	if err != nil {
		return 0, err
	}
	return getRC(buf, c.h.refcountBits(), k%E), nil
}

// refblockOff returns the offset of refcount block b, 0 where the table
// has no entry for it (b past the table's end, or an empty entry).
func (c *checker) refblockOff(b uint64) (uint64, error) {
	if b >= uint64(len(c.rt)) {
		return 0, nil
	}
	e := c.rt[b]
	if e&rtReservedMask != 0 {
		return 0, corruptf("refcount table entry %d has reserved bits set", b)
	}
	off := e & rtOffsetMask
	if off == 0 {
		return 0, nil
	}
	if off%c.cs != 0 {
		return 0, corruptf("refcount block %d at %#x is not cluster aligned", b, off)
	}
	if off >= c.fileSize {
		return 0, corruptf("refcount block %d at %#x is outside the image", b, off)
	}
	return off, nil
}

func (c *checker) refblock(off uint64) ([]byte, error) {
	if b, ok := c.rbCache[off]; ok {
		return b, nil
	}
	// The cache holds at most 1024 blocks or 32 MiB: clean blocks are
	// dropped, and dirty ones written early once they hold 16 MiB.
	if len(c.rbCache) > 1024 || uint64(len(c.rbCache))*c.cs > 32<<20 {
		if uint64(len(c.rbDirty))*c.cs > 16<<20 || len(c.rbDirty) > 512 {
			if err := c.flushRefblocks(); err != nil {
				return nil, err
			}
		}
		for k := range c.rbCache {
			if !c.rbDirty[k] {
				delete(c.rbCache, k)
			}
		}
	}
	b := make([]byte, c.cs)
	if _, err := readFullAt(c.f, b, int64(off)); err != nil {
		return nil, err
	}
	c.rbCache[off] = b
	return b, nil
}

// l2ref records how often the snapshots reference an L2 table.
type l2ref struct {
	mult uint64
	l1i  uint64
}

// walkL1 counts the references of an L1 table (walked mult times) and the
// L2 tables below it. The active table's L2 tables are walked at once;
// snapshot tables' L2 tables are collected in shared, to be walked once
// each with their multiplicity.
func (c *checker) walkL1(l1Off uint64, l1Size uint32, active bool, shared map[uint64]*l2ref) error {
	c.inc(l1Off, uint64(l1Size)*8)
	if active {
		c.mark(l1Off, uint64(l1Size)*8, metaL1)
	} else {
		c.mark(l1Off, uint64(l1Size)*8, metaSnapL1)
	}
	l1, err := readTableAt(c.f, l1Off, uint64(l1Size))
	if err != nil {
		return fmt.Errorf("read L1 table at %#x: %w", l1Off, err)
	}
	if active {
		if c.activeDups, err = c.duplicateL2(l1); err != nil {
			return err
		}
	}
	walked := map[uint64]bool{} // duplicated L2 tables walked already
	var next uint64
	buf := make([]byte, c.cs)
	for i, e := range l1 {
		if e == 0 {
			continue
		}
		if e&l1ReservedMask != 0 {
			c.corrupt("found L1 entry with reserved bits set: %x", e)
		}
		off := e & l1OffsetMask
		if off == 0 {
			continue
		}
		c.inc(off, c.cs)
		if off%c.cs != 0 {
			c.corrupt("l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", off)
			continue
		}
		if off >= c.fileSize {
			continue // counted as exceeding the end of the file
		}
		if active {
			c.mark(off, c.cs, metaL2)
		} else {
			c.mark(off, c.cs, metaSnapL2)
		}
		if !active {
			r := shared[off]
			if r == nil {
				if !c.charge(mapEntryBytes + 16) {
					return c.memErr
				}
				r = &l2ref{l1i: uint64(i)}
				shared[off] = r
			}
			r.mult += c.mult
			continue
		}
		n := c.activeDups[off]
		if n > 0 {
			// Named by n entries: walked once, its references counted
			// n times (as the snapshots' shared tables are), so that
			// an image whose L1 names one table millions of times
			// costs one walk, not millions.
			if walked[off] {
				continue
			}
			walked[off] = true
			c.mult = n
		}
		if _, err := readFullAt(c.f, buf, int64(off)); err != nil {
			c.mult = 1
			return fmt.Errorf("read L2 table at %#x: %w", off, err)
		}
		next = 0 // contiguity is counted within one L2 table, as QEMU does
		c.walkL2(buf, uint64(i), active, &next)
		c.mult = 1
	}
	return nil
}

// duplicateL2 returns the L2 table offsets that more than one entry of
// the L1 table l1 names, with how many name each (nil when none do).
func (c *checker) duplicateL2(l1 []uint64) (map[uint64]uint64, error) {
	if !c.charge(uint64(len(l1)) * 8) {
		return nil, c.memErr
	}
	offs := make([]uint64, 0, len(l1))
	for _, e := range l1 {
		if off := e & l1OffsetMask; off != 0 && off%c.cs == 0 && off < c.fileSize {
			offs = append(offs, off)
		}
	}
	slices.Sort(offs)
	var dups map[uint64]uint64
	for i := 0; i < len(offs); {
		j := i + 1
		for j < len(offs) && offs[j] == offs[i] {
			j++
		}
		if j-i > 1 {
			if !c.charge(mapEntryBytes) {
				return nil, c.memErr
			}
			if dups == nil {
				dups = map[uint64]uint64{}
			}
			dups[offs[i]] = uint64(j - i)
		}
		i = j
	}
	return dups, nil
}

// walkSnapshots walks every snapshot's L1 table, reading each distinct
// table once, then each distinct L2 table once.
func (c *checker) walkSnapshots() error {
	type key struct {
		off  uint64
		size uint32
	}
	groups := map[key]uint64{}
	var keys []key
	for _, s := range c.snaps {
		k := key{s.l1Off, s.l1Size}
		if groups[k] == 0 {
			keys = append(keys, k)
		}
		groups[k]++
	}
	shared := map[uint64]*l2ref{}
	for _, k := range keys {
		if err := c.spend(uint64(k.size) * 8); err != nil {
			return err
		}
		c.mult = groups[k]
		err := c.walkL1(k.off, k.size, false, shared)
		c.mult = 1
		if err != nil {
			return err
		}
	}
	offs := make([]uint64, 0, len(shared))
	for off := range shared {
		offs = append(offs, off)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	buf := make([]byte, c.cs)
	var next uint64
	for _, off := range offs {
		if _, err := readFullAt(c.f, buf, int64(off)); err != nil {
			return fmt.Errorf("read L2 table at %#x: %w", off, err)
		}
		c.mult = shared[off].mult
		c.walkL2(buf, shared[off].l1i, false, &next)
		c.mult = 1
	}
	return nil
}

func (c *checker) walkL2(buf []byte, l1i uint64, active bool, next *uint64) {
	h := c.h
	cb := h.clusterBits
	step := h.l2EntrySize()
	n := h.l2Entries()
	for j := uint64(0); j < n; j++ {
		e := be.Uint64(buf[j*step:])
		var bm uint64
		if h.extendedL2() {
			bm = be.Uint64(buf[j*step+8:])
		}
		gc := l1i*n + j
		if e&flagCompressed != 0 {
			if e&flagCopied != 0 {
				c.corrupt("coffset=%#x: copied flag must never be set for compressed clusters", e&^flagCopied)
			}
			if c.extData {
				c.corrupt("compressed cluster %d with data file, entry=%#x", gc, e)
				continue
			}
			if h.extendedL2() && bm != 0 {
				c.corrupt("compressed cluster %d with non-zero subcluster allocation bitmap, entry=%#x", gc, e)
			}
			x := 62 - (cb - 8)
			coff := e & (1<<x - 1)
			nsec := (e>>x)&(1<<(cb-8)-1) + 1
			if active {
				// Compressed clusters count as fragmented, and leave the
				// contiguity of the others alone (QEMU's counts).
				c.res.AllocatedClusters++
				c.res.CompressedClusters++
				c.res.FragmentedClusters++
			}
			c.inc(coff&^511, nsec*512)
			continue
		}
		if e&l2ReservedMask != 0 {
			c.corrupt("found l2 entry with reserved bits set: %x", e)
		}
		if e&flagZero != 0 && (h.version < 3 || h.extendedL2()) {
			// The reader refuses it (and marks the image corrupt): the
			// bit is always 0 there (version 2, extended L2 entries).
			c.corrupt("zero flag in L2 entry %#x not allowed in this image", e)
		}
		off := e & l2OffsetMask
		if h.extendedL2() {
			alloc, zero := uint32(bm), uint32(bm>>32)
			if alloc&zero != 0 || (off == 0 && !(c.extData && e&flagCopied != 0) && alloc != 0) {
				c.corrupt("Invalid cluster entry found (L2 index %#x, L2 entry %#x, bitmap %#x)", gc, e, bm)
			}
		}
		hasHost := off != 0 || (c.extData && e&flagCopied != 0)
		if !hasHost {
			continue
		}
		// Zero clusters that keep their allocation count as allocated,
		// as in QEMU.
		if active {
			c.res.AllocatedClusters++
			if *next != 0 && off != *next {
				c.res.FragmentedClusters++
			}
			*next = off + c.cs
		}
		if off%c.cs != 0 {
			c.corrupt("offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", off)
		}
		if !c.extData {
			c.inc(off, c.cs)
		}
	}
}

// count computes every reference the image makes.
func (c *checker) count() error {
	h := c.h
	c.refs = nil
	c.meta = map[uint64]metaKind{}
	c.inc(0, c.cs)
	c.mark(0, c.cs, metaHeader)
	if !c.skipRefStructs {
		c.mark(h.rtOff, h.refTableBytes(), metaRefTable)
	}
	if h.nbSnapshots > 0 {
		c.mark(h.snapOff, c.snapSize, metaSnapTable)
	}
	if h.bitmaps != nil {
		c.mark(h.bitmaps.dirOff, h.bitmaps.dirSize, metaBitmapDir)
	}
	if h.crypto != nil {
		c.mark(h.crypto.off, h.crypto.len, metaCrypto)
	}
	c.readBudget = checkReadBudget
	if err := c.walkL1(h.l1Off, h.l1Size, true, nil); err != nil {
		return err
	}
	c.res.SharedL2Tables = len(c.activeDups)
	if c.memErr != nil {
		return c.memErr
	}
	if err := c.walkSnapshots(); err != nil {
		return err
	}
	if h.nbSnapshots > 0 {
		c.inc(h.snapOff, c.snapSize)
	}
	if !c.skipRefStructs {
		c.inc(h.rtOff, h.refTableBytes())
	}
	if h.crypto != nil && h.crypto.len > 0 {
		c.inc(h.crypto.off, h.crypto.len)
	}
	if h.bitmaps != nil {
		if err := c.countBitmaps(); err != nil {
			return err
		}
	}
	if !c.skipRefStructs {
		for b, e := range c.rt {
			if e&rtReservedMask != 0 {
				c.corrupt("refcount table entry %d has reserved bits set", b)
				c.refStructBad = true
				c.refStructErrs++
				continue
			}
			off := e & rtOffsetMask
			if off == 0 {
				continue
			}
			if off%c.cs != 0 {
				c.corrupt("refcount block %d is not cluster aligned; refcount table entry corrupted", b)
				continue
			}
			if off >= c.fileSize {
				c.corrupt("refcount block %d is outside image", b)
				continue
			}
			c.inc(off, c.cs)
			c.mark(off, c.cs, metaRefBlock)
		}
		c.checkRefStructs()
	}
	c.checkOverlaps()
	return c.memErr
}

// checkRefStructs reports the clusters of the refcount table and blocks
// that something else references too (as QEMU does: each must have
// refcount 1, and a refcount of 2 that matches the references is no
// less wrong); a full repair rebuilds the refcount structure then.
func (c *checker) checkRefStructs() {
	h := c.h
	if n := h.refTableBytes(); n > 0 {
		for k := h.rtOff / c.cs; k <= (h.rtOff+n-1)/c.cs && k < c.nb; k++ {
			r := c.ref(k)
			if r == 1 {
				continue
			}
			c.refStructBad = true
			// Where the on-disk refcount differs from the references,
			// the comparison reports the cluster, as qemu-img does
			// (which has no check of its own for the table): counted
			// once. Where it matches (2 and 2), only this says it.
			if rc, err := c.refcount(k); err == nil && rc == r {
				c.corrupt("refcount table cluster %d refcount=%d", k, r)
				c.refStructErrs++
			}
		}
	}
	for b, e := range c.rt {
		off := e & rtOffsetMask
		if e&rtReservedMask != 0 || off == 0 || off%c.cs != 0 || off >= c.fileSize {
			continue // reported by count
		}
		if r := c.ref(off / c.cs); r != 1 {
			c.corrupt("refcount block %d refcount=%d", b, r)
			c.refStructBad = true
			c.refStructErrs++
		}
	}
}

// singleMeta are the kinds of metadata that must be referenced exactly
// once: nothing else may take their clusters for data or for an L2
// table. (Snapshots may share L1 and L2 tables; the refcount structure is
// checkRefStructs' business.) The bitmap directory and tables are among
// them: a read-write open writes the directory (the in_use flag), which
// would change a guest cluster or a snapshot's that shared it.
const singleMeta = metaHeader | metaL1 | metaSnapTable | metaBitmapDir

// twoKinds says whether a cluster marked k holds two kinds of metadata
// at once; an L2 table that snapshots share is one kind.
func twoKinds(k metaKind) bool { return k&(k-1) != 0 && k != metaL2|metaSnapL2 }

// checkOverlaps reports the clusters that hold two kinds of metadata at
// once (which the reader refuses), and the header, active L1 and snapshot
// table clusters that something else references too.
func (c *checker) checkOverlaps() {
	var cls []uint64
	for cl, k := range c.meta {
		if k&(metaRefTable|metaRefBlock) != 0 && !c.skipRefStructs {
			continue // its refcount is not 1: checkRefStructs says so
		}
		if twoKinds(k) || (k&singleMeta != 0 && c.ref(cl) > 1) {
			cls = append(cls, cl)
		}
	}
	slices.Sort(cls)
	for _, cl := range cls {
		if k := c.meta[cl]; twoKinds(k) {
			c.corrupt("cluster %d is used as %s at once", cl, k)
		} else {
			c.corrupt("cluster %d holds the %s but has %d references", cl, k, c.ref(cl))
		}
	}
}

// countBitmaps counts the references of the bitmap directory, the bitmap
// tables and the clusters they name. Tables may overlap (a hostile image
// can give all its 65535 bitmaps one table, or tables that start one
// cluster apart and run to the end of the file): each byte of their union
// is read once, and what it holds counted as often as tables cover it, so
// the work is bounded by the file, not by bitmaps times table sizes.
func (c *checker) countBitmaps() error {
	bm := c.h.bitmaps
	c.inc(bm.dirOff, bm.dirSize)
	dir, err := bm.readDir(c.f)
	if err != nil {
		return err
	}
	ents, err := parseBitmapDir(dir, bm.nbBitmaps)
	if err != nil {
		c.corrupt("bitmap directory: %v", err)
		return nil
	}
	// Where the tables start (+1) and end (-1).
	type edge struct {
		at uint64
		d  int
	}
	var edges []edge
	for _, be := range ents {
		if be.tableOff%c.cs != 0 {
			c.corrupt("bitmap %q: table offset %#x not aligned", be.name, be.tableOff)
			continue
		}
		size := uint64(be.tableSize) * 8
		if be.tableOff+size < be.tableOff || be.tableOff+size > c.fileSize {
			// Neither counted nor marked: a table past the end
			// could make every bitmap mark the whole file.
			c.corrupt("bitmap %q: table at %#x of %d bytes exceeds the end of the file", be.name, be.tableOff, size)
			continue
		}
		if size > 0 {
			edges = append(edges, edge{be.tableOff, 1}, edge{be.tableOff + size, -1})
		}
	}
	slices.SortFunc(edges, func(a, b edge) int { return cmp.Compare(a.at, b.at) })
	defer func() { c.mult = 1 }()
	cover := 0
	var buf []byte
	for i, e := range edges {
		cover += e.d
		if cover == 0 || i+1 == len(edges) || edges[i+1].at == e.at {
			continue
		}
		// [e.at, next) is covered by cover tables. Tables start on
		// cluster boundaries, so the tables that touch a cluster are
		// those that cover its first byte: each cluster is counted in
		// the stretch that holds its first byte.
		next := edges[i+1].at
		if err := c.spend(next - e.at); err != nil {
			return err
		}
		c.mult = uint64(cover)
		for cl := divRoundUp(e.at, c.cs); cl*c.cs < next; cl++ {
			c.inc(cl*c.cs, 1)
			c.mark(cl*c.cs, 1, metaBitmapDir)
		}
		for off := e.at; off < next; {
			n := min(next-off, 1<<20)
			if uint64(cap(buf)) < n {
				buf = make([]byte, n)
			}
			b := buf[:n]
			if _, err := readFullAt(c.f, b, int64(off)); err != nil {
				return fmt.Errorf("read bitmap table at %#x: %w", off, err)
			}
			for j := 0; j+8 <= len(b); j += 8 {
				if o := be.Uint64(b[j:]) & l1OffsetMask; o != 0 {
					c.inc(o, c.cs)
				}
			}
			off += n
		}
	}
	return nil
}

func (c *checker) run(repair RepairMode) (CheckResult, error) {
	h := c.h
	c.res.TotalClusters = int64(divRoundUp(h.size, c.cs))
	if err := c.count(); err != nil {
		return c.res, err
	}
	limit := max(c.nb, c.refEnd())
	E := h.refblockEntries()
	var highest uint64
	var haveHighest bool
	needRebuild := false
	type fix struct {
		k, v uint64
		leak bool
	}
	var fixes []fix
	addFix := func(fx fix) error {
		if !c.charge(fixEntryBytes) {
			return c.memErr
		}
		fixes = append(fixes, fx)
		return nil
	}
	for k := uint64(0); k < limit; k++ {
		// Where no cluster is referenced and no refcount block exists,
		// every refcount and reference is 0: skip to the next chunk or
		// block boundary.
		if b := k / E; c.noRefs(k) && (b >= uint64(len(c.rt)) || c.rt[b]&rtOffsetMask == 0) {
			k = min((k>>refChunkBits+1)<<refChunkBits, (b+1)*E, limit) - 1
			continue
		}
		rc, err := c.refcount(k)
		if err != nil {
			c.res.CheckErrors++
			c.msg("Can't get refcount for cluster %d: %v", k, err)
			if repair == RepairAll {
				needRebuild = true
			}
			continue
		}
		r := c.ref(k)
		if rc > 0 || r > 0 {
			highest, haveHighest = k, true
		}
		if rc == r {
			continue
		}
		if rc > r {
			c.res.Leaks++
			c.msg("Leaked cluster %d refcount=%d reference=%d", k, rc, r)
			if repair >= RepairLeaks {
				if err := addFix(fix{k, r, true}); err != nil {
					return c.res, err
				}
			}
		} else {
			c.res.Corruptions++
			c.msg("ERROR cluster %d refcount=%d reference=%d", k, rc, r)
			// Metadata that something else references too stays
			// corrupt (checkOverlaps said so): a refcount of 2 would
			// only hide it.
			if repair == RepairAll && (r == 1 || c.meta[k]&singleMeta == 0) {
				if err := addFix(fix{k, r, false}); err != nil {
					return c.res, err
				}
			}
		}
	}
	if haveHighest {
		c.res.ImageEndOffset = int64((highest + 1) * c.cs)
	}
	if repair == RepairAll {
		for _, fx := range fixes {
			if r := fx.v; r > maxRC(h.refcountBits()) {
				return c.res, fmt.Errorf("cluster %d has %d references, more than refcount_bits %d can hold", fx.k, r, h.refcountBits())
			}
			if off, err := c.refblockOff(fx.k / h.refblockEntries()); err != nil || off == 0 {
				needRebuild = true
			}
		}
		if c.refStructBad {
			needRebuild = true
		}
	}
	if needRebuild {
		if err := c.rebuild(); err != nil {
			return c.res, fmt.Errorf("rebuild refcounts: %w", err)
		}
		for _, fx := range fixes {
			if fx.leak {
				c.res.LeaksFixed++
			} else {
				c.res.CorruptionsFixed++
			}
		}
		c.res.CorruptionsFixed += c.refStructErrs
		c.res.RefcountsRebuilt = true
		return c.res, nil
	}
	for _, fx := range fixes {
		if err := c.setRefcount(fx.k, fx.v); err != nil {
			return c.res, err
		}
		if fx.leak {
			c.res.LeaksFixed++
		} else {
			c.res.CorruptionsFixed++
		}
	}
	if err := c.flushRefblocks(); err != nil {
		return c.res, err
	}
	if err := c.checkCopied(repair == RepairAll); err != nil {
		return c.res, err
	}
	return c.res, nil
}

func (c *checker) setRefcount(k, v uint64) error {
	E := c.h.refblockEntries()
	off, err := c.refblockOff(k / E)
	if err != nil {
		return err
	}
	if off == 0 {
		return fmt.Errorf("no refcount block for cluster %d", k)
	}
	buf, err := c.refblock(off)
	if err != nil {
		return err
	}
	setRC(buf, c.h.refcountBits(), k%E, v)
	c.rbDirty[off] = true
	return nil
}

func (c *checker) flushRefblocks() error {
	offs := make([]uint64, 0, len(c.rbDirty))
	for off := range c.rbDirty {
		offs = append(offs, off)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	for _, off := range offs {
		if err := c.guard(off, c.cs, metaRefBlock); err != nil {
			return err
		}
		if err := c.undo.writeAt(c.f, c.rbCache[off], int64(off)); err != nil {
			return fmt.Errorf("write refcount block at %#x: %w", off, err)
		}
		delete(c.rbDirty, off)
	}
	if len(offs) > 0 {
		return fdatasync(c.f)
	}
	return nil
}

// checkCopied compares the copied flags of the active tables with the
// refcounts, fixing them if asked.
func (c *checker) checkCopied(fix bool) error {
	h := c.h
	l1, err := readTableAt(c.f, h.l1Off, uint64(h.l1Size))
	if err != nil {
		return fmt.Errorf("read L1 table: %w", err)
	}
	l1Changed := false
	buf := make([]byte, c.cs)
	step := h.l2EntrySize()
	walked := map[uint64]bool{} // duplicated L2 tables walked already
	for i, e := range l1 {
		off := e & l1OffsetMask
		if off == 0 || off%c.cs != 0 {
			continue
		}
		rc, err := c.refcount(off / c.cs)
		if err != nil {
			continue
		}
		if (rc == 1) != (e&flagCopied != 0) {
			c.corrupt("OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, rc)
			if fix {
				if rc == 1 {
					l1[i] = e | flagCopied
				} else {
					l1[i] = e &^ flagCopied
				}
				l1Changed = true
				c.res.CorruptionsFixed++
			}
		}
		if c.activeDups[off] > 0 {
			if walked[off] {
				continue // its entries were compared once already
			}
			walked[off] = true
		}
		if _, err := readFullAt(c.f, buf, int64(off)); err != nil {
			return fmt.Errorf("read L2 table at %#x: %w", off, err)
		}
		l2Changed := false
		for j := uint64(0); j < h.l2Entries(); j++ {
			le := be.Uint64(buf[j*step:])
			if le&flagCompressed != 0 {
				continue
			}
			doff := le & l2OffsetMask
			if doff == 0 && !(c.extData && le&flagCopied != 0) {
				continue
			}
			drc := uint64(1)
			if !c.extData {
				if drc, err = c.refcount(doff / c.cs); err != nil {
					continue
				}
			}
			if (drc == 1) != (le&flagCopied != 0) {
				c.corrupt("OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", le, drc)
				if fix {
					if drc == 1 {
						le |= flagCopied
					} else {
						le &^= flagCopied
					}
					be.PutUint64(buf[j*step:], le)
					l2Changed = true
					c.res.CorruptionsFixed++
				}
			}
		}
		if l2Changed {
			if err := c.guard(off, c.cs, metaL2|metaSnapL2); err != nil {
				return err
			}
			if err := c.undo.writeAt(c.f, buf, int64(off)); err != nil {
				return fmt.Errorf("write L2 table at %#x: %w", off, err)
			}
		}
	}
	if l1Changed {
		if err := fdatasync(c.f); err != nil {
			return err
		}
		b := make([]byte, len(l1)*8)
		for i, e := range l1 {
			be.PutUint64(b[i*8:], e)
		}
		if err := c.guard(h.l1Off, uint64(len(b)), metaL1); err != nil {
			return err
		}
		if err := c.undo.writeAt(c.f, b, int64(h.l1Off)); err != nil {
			return fmt.Errorf("write L1 table: %w", err)
		}
	}
	return nil
}

// rebuild writes a new refcount structure, computed from the references,
// past the end of everything in use, and points the header at it.
func (c *checker) rebuild() error {
	h := c.h
	// Recount without the old refcount structure: it becomes garbage.
	c2 := &checker{f: c.f, h: h, cs: c.cs, fileSize: c.fileSize, nb: c.nb, extData: c.extData,
		over: map[uint64]uint64{}, snaps: c.snaps, snapSize: c.snapSize, skipRefStructs: true, mult: 1,
		memLimit: c.memLimit - min(c.mem, c.memLimit)}
	if err := c2.count(); err != nil {
		return err
	}
	cs := c.cs
	E := h.refblockEntries()
	bits := h.refcountBits()
	end := max(c.nb, 1, c2.refEnd())
	// New structure at [end, end+rtc+nblk): reftable first, then blocks
	// for every block that has a nonzero refcount.
	var rtc, nblk uint64
	var blocks []uint64
	for {
		total := end + rtc + nblk
		nBlocksSpan := divRoundUp(total, E)
		blocks = blocks[:0]
		for b := uint64(0); b < nBlocksSpan; b++ {
			used := b*E < total && b*E+E > end // the new structure lives here
			if !used {
				used = c2.anyRef(b*E, b*E+E)
			}
			if used {
				blocks = append(blocks, b)
			}
		}
		newRtc := divRoundUp(nBlocksSpan*8, cs)
		if newRtc == rtc && uint64(len(blocks)) == nblk {
			break
		}
		rtc, nblk = newRtc, uint64(len(blocks))
	}
	if rtc*cs > maxRefTableBytes {
		return fmt.Errorf("refcount table would need %d bytes (limit %d)", rtc*cs, maxRefTableBytes)
	}
	c2.fileSize = (end + rtc + nblk) * cs
	for k := end; k < end+rtc+nblk; k++ {
		c2.inc(k*cs, cs)
	}
	if c2.memErr != nil {
		return c2.memErr
	}
	rt := make([]byte, rtc*cs)
	for i, b := range blocks {
		at := end + rtc + uint64(i)
		be.PutUint64(rt[b*8:], at*cs)
		buf := make([]byte, cs)
		for k := b * E; k < b*E+E; k++ {
			v := c2.ref(k)
			if v > maxRC(bits) {
				return fmt.Errorf("cluster %d has %d references, more than refcount_bits %d can hold", k, v, bits)
			}
			if v > 0 {
				setRC(buf, bits, k-b*E, v)
			}
		}
		if err := c.undo.writeAt(c.f, buf, int64(at*cs)); err != nil {
			return fmt.Errorf("write refcount block: %w", err)
		}
	}
	if err := c.undo.writeAt(c.f, rt, int64(end*cs)); err != nil {
		return fmt.Errorf("write refcount table: %w", err)
	}
	if err := fdatasync(c.f); err != nil {
		return err
	}
	var hdr [12]byte
	be.PutUint64(hdr[0:], end*cs)
	be.PutUint32(hdr[8:], uint32(rtc))
	if err := c.undo.writeAt(c.f, hdr[:], hdrRefTableOff); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := fdatasync(c.f); err != nil {
		return err
	}
	c.msg("Refcount structure rebuilt: table at %#x (%d clusters), %d blocks", end*cs, rtc, nblk)
	// Fix copied flags against the new refcounts.
	h.rtOff, h.rtClusters = end*cs, uint32(rtc)
	h.fileSize = int64((end + rtc + nblk) * cs)
	c.fileSize = uint64(h.fileSize)
	c.rt, c.rbCache, c.rbDirty = nil, map[uint64][]byte{}, map[uint64]bool{}
	// The old structure's clusters are free now (or, where they were
	// shared, only what else took them for): the repairs that follow
	// are guarded by the new map.
	c.meta = c2.meta
	c.mark(end*cs, rtc*cs, metaRefTable)
	c.mark((end+rtc)*cs, nblk*cs, metaRefBlock)
	var err error
	if c.rt, err = readTableAt(c.f, h.rtOff, rtc*cs/8); err != nil {
		return err
	}
	return c.checkCopied(true)
}

// bitmapEntry is one parsed bitmap directory entry.
type bitmapEntry struct {
	tableOff  uint64
	tableSize uint32
	flags     uint32
	// granularityBits: the bitmap's granularity is 1<<granularityBits
	// bytes.
	granularityBits uint8
	name            string
	pos             int // offset of the entry inside the directory
}

func parseBitmapDir(dir []byte, n uint32) ([]bitmapEntry, error) {
	var out []bitmapEntry
	pos := 0
	for i := uint32(0); i < n; i++ {
		if len(dir)-pos < 24 {
			return nil, fmt.Errorf("entry %d truncated", i)
		}
		d := dir[pos:]
		e := bitmapEntry{
			tableOff:  be.Uint64(d[0:]),
			tableSize: be.Uint32(d[8:]),
			flags:     be.Uint32(d[12:]),
			pos:       pos,
			// d[16] is the type (1: dirty tracking).
			granularityBits: d[17],
		}
		nameLen := int(be.Uint16(d[18:]))
		extra := int(be.Uint32(d[20:]))
		if extra > 1<<20 || nameLen == 0 {
			return nil, fmt.Errorf("entry %d: bad sizes", i)
		}
		size := 24 + extra + nameLen
		if size > len(d) {
			return nil, fmt.Errorf("entry %d truncated", i)
		}
		e.name = sanitize(string(d[24+extra : size]))
		size = (size + 7) &^ 7
		if size > len(d) {
			size = len(d)
		}
		pos += size
		out = append(out, e)
	}
	return out, nil
}
