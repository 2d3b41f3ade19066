package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/krun-core/krun-core/disk"
	"golang.org/x/sys/unix"
)

// Layer is one image the user declared as part of a backing chain (or as an
// external data file), opened by the launcher.
type Layer struct {
	File   *os.File
	Format disk.Format
	// Path is the absolute, cleaned host path the launcher opened. It is
	// compared with the name the image records.
	Path string
}

// Options configures Open.
type Options struct {
	ReadOnly bool
	// Path is the absolute host path of the image; relative backing and
	// data file names recorded in the image are resolved against its
	// directory.
	Path string
	// Backing is the chain the user declared, the image's backing file
	// first. nil means none was declared.
	Backing []Layer
	// DataFile is the declared external data file, if any.
	DataFile *Layer
	// MaxVirtualSize refuses images (and backing layers) with a larger
	// virtual size; 0 means no limit.
	MaxVirtualSize int64
	// CacheBytes bounds the L2 table cache (refcount blocks get a quarter
	// of it); 0 means 32 MiB.
	CacheBytes int64
	Logger     hclog.Logger
	// CallerReports says that the caller shows the user every error a
	// read or write returns (as img convert does): corruption found in a
	// read-only image or a backing file, which only fails the request,
	// is then logged at debug rather than warn, so that the user reads it
	// once. Where the error goes to a guest (serve --disk), the warning is
	// the user's only report of it: leave this unset.
	CallerReports bool

	// growTo, when set, is the virtual size the image is opened with in
	// place of its header's (Resize zeroes the area it is growing into
	// before the header says so). The L1 table must cover it.
	growTo int64
}

// Image is an open qcow2 image. It implements disk.Disk and is safe for
// concurrent use. It owns the files it was given: Close closes them.
type Image struct {
	// mu: readers and in-place writers hold it shared; anything that
	// changes metadata holds it exclusively.
	mu sync.RWMutex

	f        ioFile          // the qcow2 file
	data     ioFile          // where guest data lives: f, or the external data file
	synced   *disk.SyncLatch // the first failed sync of f or data (guarded)
	file     *os.File        // f's file, closed by Close
	dataFile *os.File        // the external data file, if any
	h        *header
	name     string
	ro       bool
	log      hclog.Logger
	// callerReports is Options.CallerReports.
	callerReports bool

	cs          uint64
	cb          uint
	l2Entries   uint64
	l2Bits      uint
	extL2       bool
	scBits      uint // log2 of the subcluster size (extended L2)
	size        int64
	extData     bool // external data file
	rawData     bool // external data file kept valid as raw
	compression uint8
	rcBits      uint64
	rbEntries   uint64

	backing     layer
	backingSize int64

	l1       []uint64
	l1Dirty  map[uint64]bool // 512-byte chunks of the L1 table
	l2c      *tableCache
	rbc      *tableCache
	rt       []uint64 // refcount table (in memory, possibly moved)
	rtOff    uint64
	rtDirty  map[uint64]bool // 512-byte chunks of the refcount table
	rtNew    []uint64        // refcount blocks named since the table was last written
	rtMoved  bool            // rt lives at rtOff now, the header does not say so yet
	oldRT    [2]uint64       // clusters of a table to free once the header moved (start, n)
	snaps    []snapshot
	snapSize uint64

	meta         *metaMap
	fileClusters uint64 // clusters the file has or that were allocated
	freeHint     uint64
	pendingFree  []uint64 // host clusters to decrement once the L2/L1 change is durable
	reserved     [][2]uint64
	// pool is a run of clusters (start, n) whose refcount 1 is on the
	// file already and that nothing references yet: data clusters and L2
	// tables come from it (see persist).
	pool [2]uint64
	// poolNext is how many clusters the next refill reserves (0: the
	// first pool's size; poolClusters).
	poolNext uint64
	// poolZeroFrom: pool clusters at or above it lay beyond the file's
	// end when the pool was reserved, so they read as zeros until a
	// write lands in them (each is handed out once).
	poolZeroFrom uint64
	metaChanged  bool // cached metadata changed since the last write-back
	refsUnsynced bool // refcount data written since the last sync
	l2Unsynced   bool // L2 tables written since the last sync
	// freshUnsynced: a new L2 table was written without being made
	// durable (evicted from the cache, or one of several new tables of
	// a request) since the last sync; no L1 entry is written before
	// that sync.
	freshUnsynced bool

	corruptMarked atomic.Bool
	// metaPending: a request that changed metadata failed before all of
	// it reached the file (a write of an L2 sector returned EIO or
	// ENOSPC), so the caches hold entries the file does not. Writes
	// then skip the in-place path, which writes data only, and take the
	// exclusive one, whose persist writes every dirty table before the
	// request completes: a retried write into the cluster the failed
	// request allocated is acknowledged only once the entry that maps
	// it is on the file (found in review, helper-101: it was
	// acknowledged in place and lost when the plugin was killed).
	metaPending atomic.Bool
	hdrMu       sync.Mutex

	dc      decompressCache
	zstdMu  sync.Mutex
	zstdDec []*zstdDecoder

	closed bool

	// pieceClusters bounds a piece of a DISCARD or WRITE_ZEROES range
	// (zeroOrDiscard): defaultPieceClusters; tests make it small.
	pieceClusters uint64
	// zeroWritten counts the zero bytes such requests wrote as data
	// (mu held exclusively), for the bound on a piece.
	zeroWritten uint64
	// pieceHook, when set (tests), runs between two pieces of a
	// DISCARD or WRITE_ZEROES range, mu released, with the offset where
	// the next piece starts.
	pieceHook func(next uint64)
}

// ioFile is what the image does with its files. Tests substitute it to
// record writes and syncs.
type ioFile interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes everything written so far durable (fdatasync).
	Sync() error
	// WriteDurable writes p at off and makes that write durable before
	// it returns, and nothing else: earlier writes elsewhere in the
	// file are as durable as they were.
	WriteDurable(p []byte, off int64) error
}

// guarded is an image file that refuses every write and sync once a sync
// of the image failed (disk.ErrSyncFailed): what it wrote since its last
// good sync may be lost, and metadata written now (an L1 table over L2
// tables the kernel dropped) would make that corruption.
type guarded struct {
	ioFile
	synced *disk.SyncLatch
}

// failed is the latch's error, saying what it means for the image.
func (g guarded) failed() error {
	if err := g.synced.Err(); err != nil {
		return fmt.Errorf("%w; the image takes no more writes until it is opened again", err)
	}
	return nil
}

func (g guarded) WriteAt(p []byte, off int64) (int, error) {
	if err := g.failed(); err != nil {
		return 0, err
	}
	return g.ioFile.WriteAt(p, off)
}

func (g guarded) Sync() error {
	if err := g.failed(); err != nil {
		return err
	}
	err := g.ioFile.Sync()
	if err != nil {
		g.synced.Fail(err)
	}
	return err
}

func (g guarded) WriteDurable(p []byte, off int64) error {
	if err := g.failed(); err != nil {
		return err
	}
	err := g.ioFile.WriteDurable(p, off)
	if err != nil {
		g.synced.Fail(err)
	}
	return err
}

type osFile struct{ *os.File }

func (o osFile) Sync() error { return fdatasync(o.File) }

func (o osFile) WriteDurable(p []byte, off int64) error { return writeDurable(o.File, p, off) }

// layer is a read-only backing image.
type layer interface {
	ReadAt(p []byte, off int64) (int, error)
	Close() error
}

// rawLayer reads a raw backing file; bytes past its end read as zeros.
type rawLayer struct{ f *os.File }

func (r rawLayer) ReadAt(p []byte, off int64) (int, error) { return readFullAt(r.f, p, off) }
func (r rawLayer) Close() error                            { return r.f.Close() }

// readFullAt reads len(p) bytes at off, filling what lies past the end of
// the file with zeros.
func readFullAt(f io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := f.ReadAt(p, off)
	if n < len(p) {
		if err != nil && !errors.Is(err, io.EOF) {
			return n, err
		}
		clear(p[n:])
	}
	return len(p), nil
}

var _ disk.Disk = (*Image)(nil)

// chainState tracks the layers opened so far to refuse loops.
type chainState struct {
	depth int
	seen  map[fileID]string
	paths map[string]bool
}

type fileID struct{ dev, ino uint64 }

func identify(f *os.File) (fileID, int64, error) {
	st, err := f.Stat()
	if err != nil {
		return fileID{}, 0, err
	}
	var id fileID
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		id = fileID{uint64(s.Dev), uint64(s.Ino)}
	}
	size := st.Size()
	if st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
		// A block device's size is where its end is (Stat says 0).
		// Its offset is unused: every access is pread or pwrite.
		if size, err = f.Seek(0, io.SeekEnd); err != nil {
			return fileID{}, 0, fmt.Errorf("size of block device: %w", err)
		}
	}
	return id, size, nil
}

// refuseAppend fails for a file whose fd is open with O_APPEND (an
// inherited fd may be): Linux puts every pwrite on it at the end of the
// file whatever its offset, so metadata and guest data would land past
// the end instead of where the tables say.
func refuseAppend(f *os.File) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("query fd flags: %w", err)
	}
	if fl&unix.O_APPEND != 0 {
		return errors.New("the fd is opened O_APPEND, which places every write at the end of the file; open it without O_APPEND or read-only")
	}
	return nil
}

// Open opens the qcow2 image in f. The image's backing file and data file
// must be the ones declared in opts. On success the Image owns f and every
// file in opts.
func Open(f *os.File, opts Options) (*Image, error) {
	if f == nil {
		return nil, errors.New("qcow2: nil image file")
	}
	cs := &chainState{seen: map[fileID]string{}, paths: map[string]bool{}}
	return open(f, opts, cs)
}

func displayName(p string) string {
	if p == "" {
		return "(unnamed)"
	}
	return p
}

func open(f *os.File, opts Options, st *chainState) (*Image, error) {
	name := displayName(opts.Path)
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	id, fileSize, err := identify(f)
	if err != nil {
		return nil, fmt.Errorf("image %s: stat: %w", name, err)
	}
	if !opts.ReadOnly {
		if err := refuseAppend(f); err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
	}
	if prev, ok := st.seen[id]; ok && id != (fileID{}) {
		return nil, fmt.Errorf("%w: backing chain loops: image %s is the same file as %s", ErrBacking, name, prev)
	}
	st.seen[id] = name
	if opts.Path != "" {
		p := filepath.Clean(opts.Path)
		if st.paths[p] {
			return nil, fmt.Errorf("%w: backing chain loops: %s appears twice", ErrBacking, p)
		}
		st.paths[p] = true
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	if h.cryptMethod != 0 {
		return nil, fmt.Errorf("image %s: %w", name, unsupportedf("encrypted images (crypt_method %d)", h.cryptMethod))
	}
	if opts.MaxVirtualSize > 0 && h.size > uint64(opts.MaxVirtualSize) {
		return nil, fmt.Errorf("image %s: virtual size %d exceeds the limit of %d bytes", name, h.size, opts.MaxVirtualSize)
	}
	if opts.growTo != 0 && (opts.growTo < int64(h.size) || divRoundUp(uint64(opts.growTo), h.clusterSize()*h.l2Entries()) > uint64(h.l1Size)) {
		return nil, fmt.Errorf("image %s: cannot open at virtual size %d (header: %d, L1 entries %d)", name, opts.growTo, h.size, h.l1Size)
	}
	if h.incompat&incompatCorrupt != 0 && !opts.ReadOnly {
		return nil, fmt.Errorf("image %s: %w: the image is marked corrupt; open it read-only or repair it (qemu-img check -r all)", name, ErrCorrupt)
	}
	synced := &disk.SyncLatch{}
	im := &Image{
		f:             guarded{osFile{f}, synced},
		synced:        synced,
		file:          f,
		h:             h,
		name:          name,
		ro:            opts.ReadOnly,
		log:           log.Named("qcow2"),
		callerReports: opts.CallerReports,
		cs:            h.clusterSize(),
		cb:            uint(h.clusterBits),
		l2Entries:     h.l2Entries(),
		extL2:         h.extendedL2(),
		size:          int64(h.size &^ 511), // as QEMU: whole sectors (total_sectors)
		extData:       h.incompat&incompatDataFile != 0,
		rawData:       h.autoclear&autoclearDataFileRaw != 0,
		compression:   h.compressionType,
		rcBits:        h.refcountBits(),
		rbEntries:     h.refblockEntries(),
		l1Dirty:       map[uint64]bool{},
		rtDirty:       map[uint64]bool{},
		rtOff:         h.rtOff,
		pieceClusters: defaultPieceClusters,
	}
	if opts.growTo != 0 {
		im.size = opts.growTo
	}
	for 1<<im.l2Bits < im.l2Entries {
		im.l2Bits++
	}
	im.scBits = im.cb - 5
	cacheBytes := opts.CacheBytes
	if cacheBytes <= 0 {
		cacheBytes = 32 << 20
	}
	im.l2c = newTableCache(int(cacheBytes / int64(im.cs)))
	im.rbc = newTableCache(int(cacheBytes / 4 / int64(im.cs)))
	im.fileClusters = divRoundUp(uint64(fileSize), im.cs)

	im.data = im.f
	if im.snaps, im.snapSize, err = readSnapshots(f, h); err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	if im.extData && len(im.snaps) > 0 {
		return nil, fmt.Errorf("image %s: %w", name, invalidf("internal snapshots with an external data file"))
	}
	if err := im.openDataFile(opts, st); err != nil {
		return nil, err
	}
	if err := im.openBacking(opts, st); err != nil {
		return nil, err
	}
	if h.incompat&incompatDirty != 0 && !opts.ReadOnly {
		// Only now, with the files the image names checked against the
		// declared ones, and the L1 table against aliased L2 tables
		// (which the repair accepts): an open refused for them must not
		// have written the image.
		l1, err := im.readTable(h.l1Off, uint64(h.l1Size))
		if err != nil {
			return nil, fmt.Errorf("image %s: read L1 table: %w", name, err)
		}
		if err := sharedL2(l1, im.cs); err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
		if err := im.repairDirty(); err != nil {
			return nil, err
		}
	}
	if err := im.loadTables(); err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	if !im.ro {
		if err := im.prepareWritable(); err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
	}
	return im, nil
}

// repairDirty rebuilds the refcounts of an image that was not closed
// cleanly (lazy refcounts leave them stale), clears its dirty bit and
// reloads what the repair may have moved: the header's refcount table, the
// snapshot table's place, the file's size.
func (im *Image) repairDirty() error {
	f := im.file
	im.log.Info("image was not closed cleanly; repairing refcounts", "image", im.name)
	res, err := Check(f, RepairAll)
	if err != nil {
		return fmt.Errorf("image %s: repair after unclean shutdown: %w", im.name, err)
	}
	if !res.Clean() {
		return fmt.Errorf("image %s: %w: %d errors remain after repairing refcounts", im.name, ErrCorrupt, res.Corruptions+res.CheckErrors)
	}
	_, fileSize, err := identify(f)
	if err != nil {
		return fmt.Errorf("image %s: stat: %w", im.name, err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return fmt.Errorf("image %s: %w", im.name, err)
	}
	if h.incompat&incompatDirty != 0 {
		if err := writeIncompat(f, h.incompat&^incompatDirty); err != nil {
			return fmt.Errorf("image %s: %w", im.name, err)
		}
		h.incompat &^= incompatDirty
	}
	if h.clusterBits != im.h.clusterBits || h.size != im.h.size || h.incompat != im.h.incompat&^incompatDirty {
		return fmt.Errorf("image %s: %w: the header changed its layout during the refcount repair", im.name, ErrCorrupt)
	}
	im.h = h
	im.rtOff = h.rtOff
	im.fileClusters = divRoundUp(uint64(fileSize), im.cs)
	if im.snaps, im.snapSize, err = readSnapshots(f, h); err != nil {
		return fmt.Errorf("image %s: %w", im.name, err)
	}
	return nil
}

// resolveName resolves a file name recorded in an image the way QEMU does:
// relative names are relative to the image's directory.
func resolveName(recorded, imagePath string) (string, error) {
	if filepath.IsAbs(recorded) {
		return filepath.Clean(recorded), nil
	}
	if imagePath == "" || !filepath.IsAbs(imagePath) {
		return "", fmt.Errorf("cannot resolve relative name %q without the image's absolute path", sanitize(recorded))
	}
	return filepath.Clean(filepath.Join(filepath.Dir(imagePath), recorded)), nil
}

func (im *Image) openDataFile(opts Options, st *chainState) error {
	if !im.extData {
		if opts.DataFile != nil {
			return fmt.Errorf("%w: image %s has no external data file, but data-file=%s was declared", ErrDataFile, im.name, opts.DataFile.Path)
		}
		return nil
	}
	if st.depth > 0 {
		// Only the top image's data file can be declared (data-file=,
		// --data-file); hinting at it here sent the user to declare this
		// one there, which then failed differently.
		return fmt.Errorf("%w: backing file %s keeps its data in an external data file, which cannot be declared for a backing file (convert the backing file into an image without one)", ErrUnsupported, im.name)
	}
	if opts.DataFile == nil || opts.DataFile.File == nil {
		if im.h.hasDataFileName {
			return fmt.Errorf("%w: image %s names external data file %q, which was not declared (add data-file=...)", ErrDataFile, im.name, sanitize(im.h.dataFileName))
		}
		return fmt.Errorf("%w: image %s uses an external data file, which was not declared (add data-file=...)", ErrDataFile, im.name)
	}
	if opts.DataFile.Format != "" && opts.DataFile.Format != disk.Raw {
		return fmt.Errorf("%w: external data file %s must be raw, not %s", ErrDataFile, opts.DataFile.Path, opts.DataFile.Format)
	}
	if im.h.hasDataFileName {
		want, err := resolveName(im.h.dataFileName, opts.Path)
		if err != nil {
			return fmt.Errorf("%w: image %s: data file: %v", ErrDataFile, im.name, err)
		}
		if want != filepath.Clean(opts.DataFile.Path) {
			return fmt.Errorf("%w: image %s names external data file %q (%s), but %s was declared", ErrDataFile, im.name, sanitize(im.h.dataFileName), sanitize(want), opts.DataFile.Path)
		}
	}
	id, _, err := identify(opts.DataFile.File)
	if err != nil {
		return fmt.Errorf("data file %s: stat: %w", opts.DataFile.Path, err)
	}
	if !im.ro {
		if err := refuseAppend(opts.DataFile.File); err != nil {
			return fmt.Errorf("data file %s: %w", opts.DataFile.Path, err)
		}
	}
	if prev, ok := st.seen[id]; ok && id != (fileID{}) {
		return fmt.Errorf("%w: data file %s is the same file as %s", ErrDataFile, opts.DataFile.Path, prev)
	}
	st.seen[id] = opts.DataFile.Path
	im.data = guarded{osFile{opts.DataFile.File}, im.synced}
	im.dataFile = opts.DataFile.File
	return nil
}

func (im *Image) openBacking(opts Options, st *chainState) error {
	h := im.h
	if h.backingName == "" {
		if len(opts.Backing) > 0 {
			return fmt.Errorf("%w: image %s has no backing file, but backing=%s was declared", ErrBacking, im.name, opts.Backing[0].Path)
		}
		return nil
	}
	if len(opts.Backing) == 0 {
		return fmt.Errorf("%w: image %s names backing file %q, which was not declared (add backing=...)", ErrBacking, im.name, sanitize(h.backingName))
	}
	decl := opts.Backing[0]
	want, err := resolveName(h.backingName, opts.Path)
	if err != nil {
		return fmt.Errorf("%w: image %s: backing file: %v", ErrBacking, im.name, err)
	}
	if want != filepath.Clean(decl.Path) {
		return fmt.Errorf("%w: image %s names backing file %q (%s), but the declared backing is %s", ErrBacking, im.name, sanitize(h.backingName), sanitize(want), decl.Path)
	}
	if h.hasBackingFormat && disk.Format(h.backingFormat) != decl.Format {
		return fmt.Errorf("%w: image %s records backing format %q, but %s was declared as %q", ErrBacking, im.name, sanitize(h.backingFormat), decl.Path, decl.Format)
	}
	if decl.File == nil {
		return fmt.Errorf("%w: backing %s has no open file", ErrBacking, decl.Path)
	}
	st.depth++
	if st.depth > MaxChainDepth {
		return fmt.Errorf("%w: backing chain deeper than %d images", ErrBacking, MaxChainDepth)
	}
	switch decl.Format {
	case disk.Raw:
		if len(opts.Backing) > 1 {
			return fmt.Errorf("%w: raw backing %s cannot have a backing file, but %s was declared after it", ErrBacking, decl.Path, opts.Backing[1].Path)
		}
		id, size, err := identify(decl.File)
		if err != nil {
			return fmt.Errorf("backing %s: stat: %w", decl.Path, err)
		}
		if prev, ok := st.seen[id]; ok && id != (fileID{}) {
			return fmt.Errorf("%w: backing chain loops: %s is the same file as %s", ErrBacking, decl.Path, prev)
		}
		im.backing = rawLayer{decl.File}
		im.backingSize = size
	case disk.QCOW2:
		sub, err := open(decl.File, Options{
			ReadOnly:       true,
			Path:           decl.Path,
			Backing:        opts.Backing[1:],
			MaxVirtualSize: opts.MaxVirtualSize,
			CacheBytes:     opts.CacheBytes,
			Logger:         opts.Logger,
			CallerReports:  opts.CallerReports,
		}, st)
		if err != nil {
			return err
		}
		im.backing = sub
		im.backingSize = sub.size
	default:
		return fmt.Errorf("%w: backing %s: unsupported format %q", ErrBacking, decl.Path, decl.Format)
	}
	return nil
}

// loadTables reads the L1 and refcount tables and records where metadata
// lives.
func (im *Image) loadTables() error {
	h := im.h
	var err error
	if im.l1, err = im.readTable(h.l1Off, uint64(h.l1Size)); err != nil {
		return fmt.Errorf("read L1 table: %w", err)
	}
	if im.rt, err = im.readTable(h.rtOff, h.refTableBytes()/8); err != nil {
		return fmt.Errorf("read refcount table: %w", err)
	}
	mm := newMetaMap()
	cs := im.cs
	mm.put(0, 1, metaHeader)
	mm.put(h.l1Off/cs, divRoundUp(uint64(h.l1Size)*8, cs), metaL1)
	mm.put(h.rtOff/cs, uint64(h.rtClusters), metaRefTable)
	if h.nbSnapshots > 0 {
		mm.put(h.snapOff/cs, divRoundUp(im.snapSize, cs), metaSnapTable)
	}
	if h.bitmaps != nil {
		mm.put(h.bitmaps.dirOff/cs, divRoundUp(h.bitmaps.dirSize, cs), metaBitmapDir)
	}
	if h.crypto != nil && h.crypto.len > 0 {
		mm.put(h.crypto.off/cs, divRoundUp(h.crypto.len, cs), metaCrypto)
	}
	seenRB := make(map[uint64]int, len(im.rt))
	for i, e := range im.rt {
		if off := e & rtOffsetMask; off != 0 && e&rtReservedMask == 0 && off%cs == 0 {
			if j, dup := seenRB[off]; dup && !im.ro {
				return corruptf("refcount table entries %d and %d both point at %#x; repair the image (qemu-img check -r all)", j, i, off)
			}
			seenRB[off] = i
			mm.add(off/cs, metaRefBlock)
		}
	}
	l2, dup := activeL2(im.l1, cs)
	if dup && !im.ro {
		if err := sharedL2(im.l1, cs); err != nil {
			return err
		}
	}
	mm.setL2(l2)
	if err := im.trackSnapshots(mm); err != nil {
		return err
	}
	mm.build()
	im.meta = mm
	return nil
}

// activeL2 returns the clusters of the L2 tables l1 names, sorted and
// without duplicates, and whether two entries named the same one.
func activeL2(l1 []uint64, cs uint64) ([]uint64, bool) {
	n := 0
	for _, e := range l1 {
		if off := e & l1OffsetMask; off != 0 && off%cs == 0 {
			n++
		}
	}
	l2 := make([]uint64, 0, n)
	for _, e := range l1 {
		if off := e & l1OffsetMask; off != 0 && off%cs == 0 {
			l2 = append(l2, off/cs)
		}
	}
	slices.Sort(l2)
	l2 = slices.Compact(l2)
	return l2, len(l2) != n
}

// sharedL2 refuses an active L1 table in which two entries name the same
// L2 table. QEMU never writes one; in a hostile image it aliases two
// virtual ranges, and writes to them, serialized by virtual cluster, would
// race on the entries they share (two replacements of one old cluster
// free it twice). Sorting keeps the check at 16 bytes per allocated entry.
func sharedL2(l1 []uint64, cs uint64) error {
	type ref struct {
		off uint64
		i   int
	}
	refs := make([]ref, 0, len(l1))
	for i, e := range l1 {
		if off := e & l1OffsetMask; off != 0 && off%cs == 0 {
			refs = append(refs, ref{off, i})
		}
	}
	sort.Slice(refs, func(a, b int) bool {
		if refs[a].off != refs[b].off {
			return refs[a].off < refs[b].off
		}
		return refs[a].i < refs[b].i
	})
	for k := 1; k < len(refs); k++ {
		if refs[k].off == refs[k-1].off {
			return corruptf("L1 table entries %d and %d both point at L2 table %#x; repair the image (qemu-img check -r all)", refs[k-1].i, refs[k].i, refs[k].off)
		}
	}
	return nil
}

// snapshotL1Budget bounds the snapshot L1 entries Open reads to track the
// L2 tables they reference: 16 MiB of tables, about half a second of work
// and 100 MB of map at most. Each distinct table counts once, however many
// snapshots share it. (QEMU's default overlap check does not track
// inactive L2 tables at all.)
const snapshotL1Budget = 2 << 20

// trackSnapshots records the snapshot L1 tables, one range per distinct
// table, and the L2 tables they reference within snapshotL1Budget. Past
// the budget a table's L2 tables are not tracked (they keep their nonzero
// refcounts, which also keep allocations off them): a hostile snapshot
// table can make Open neither read gigabytes nor spend its time on the map.
func (im *Image) trackSnapshots(mm *metaMap) error {
	cs := im.cs
	type table struct {
		off  uint64
		size uint32
	}
	seen := make(map[table]bool)
	budget := uint64(snapshotL1Budget)
	untracked := 0
	for i, s := range im.snaps {
		t := table{s.l1Off, s.l1Size}
		if seen[t] {
			continue
		}
		seen[t] = true
		n := uint64(s.l1Size)
		mm.put(s.l1Off/cs, divRoundUp(n*8, cs), metaSnapL1)
		if n > budget {
			untracked++
			continue
		}
		budget -= n
		mm.work += n
		l1, err := im.readTable(s.l1Off, n)
		if err != nil {
			return fmt.Errorf("read snapshot %d L1 table: %w", i, err)
		}
		for _, e := range l1 {
			if off := e & l1OffsetMask; off != 0 && off%cs == 0 {
				mm.add(off/cs, metaSnapL2)
			}
		}
	}
	if untracked > 0 {
		im.log.Debug("snapshot L1 tables exceed the overlap-check budget; their L2 tables are not tracked",
			"tables", untracked, "budget_entries", snapshotL1Budget)
	}
	return nil
}

// readTable reads n big-endian uint64 entries at off.
func (im *Image) readTable(off, n uint64) ([]uint64, error) {
	if n == 0 {
		return nil, nil
	}
	buf := make([]byte, n*8)
	if _, err := readFullAt(im.f, buf, int64(off)); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = be.Uint64(buf[i*8:])
	}
	return t, nil
}

// Size returns the virtual size in bytes.
func (im *Image) Size() int64 { return im.size }

// ReadOnly reports whether the image was opened read-only.
func (im *Image) ReadOnly() bool { return im.ro }

// Close writes back cached metadata (with the syncs its ordering needs, but
// without a final sync of guest data) and closes the image, its backing
// chain and its data file.
func (im *Image) Close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	var errs []error
	if !im.ro && !im.corruptMarked.Load() {
		if err := im.releasePool(); err != nil {
			errs = append(errs, fmt.Errorf("release reserved clusters: %w", err))
		}
		if err := im.writeback(); err != nil {
			errs = append(errs, fmt.Errorf("write back metadata: %w", err))
		}
	}
	if im.backing != nil {
		if err := im.backing.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if im.dataFile != nil {
		if err := im.dataFile.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := im.file.Close(); err != nil {
		errs = append(errs, err)
	}
	im.l2c.clear()
	im.rbc.clear()
	im.zstdMu.Lock()
	for _, d := range im.zstdDec {
		d.d.Close()
	}
	im.zstdDec = nil
	im.zstdMu.Unlock()
	return errors.Join(errs...)
}

var errClosed = errors.New("qcow2: image is closed")

// reportCorrupt logs corruption that only fails the request: at warn,
// or at debug when the caller reports the error itself.
func (im *Image) reportCorrupt(msg string, err error) {
	if im.callerReports {
		im.log.Debug(msg, "image", im.name, "error", err)
		return
	}
	im.log.Warn(msg, "image", im.name, "error", err)
}

// markCorrupt reports corruption found at run time: it logs it, sets the
// image's corrupt bit once if the image is writable, and returns err. A
// backing layer's corruption (backingError) is logged, never marked here.
func (im *Image) markCorrupt(err error) error {
	if !errors.Is(err, ErrCorrupt) {
		return err
	}
	if be := (*backingError)(nil); errors.As(err, &be) {
		// A backing layer's corruption is not this image's: the
		// request fails, the image stays writable (a shared base
		// image must not take every overlay with it).
		im.reportCorrupt("corruption found in a backing file", err)
		return err
	}
	if im.ro {
		im.reportCorrupt("corruption found", err)
		return err
	}
	if im.corruptMarked.Swap(true) {
		return err
	}
	if im.h.version < 3 {
		im.log.Error("corruption found; further writes are refused (version 2 images have no corrupt bit)", "image", im.name, "error", err)
		return err
	}
	im.log.Error("marking image corrupt; further writes are refused", "image", im.name, "error", err)
	im.hdrMu.Lock()
	defer im.hdrMu.Unlock()
	var b [8]byte
	be.PutUint64(b[:], im.h.incompat|incompatCorrupt)
	if _, werr := im.f.WriteAt(b[:], hdrIncompatOff); werr == nil {
		im.h.incompat |= incompatCorrupt
		_ = im.f.Sync()
	}
	return err
}
