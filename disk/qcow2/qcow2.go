// Package qcow2 reads and writes qcow2 images (versions 2 and 3) as
// disk.Disk implementations.
//
// The package runs inside the sandboxed krun-plugin-blk-qcow2 process, so it
// never opens a path: the launcher opens the image, every backing layer and
// any external data file and hands the *os.File handles in. An image only
// names its backing file; the name must match the chain the user declared
// (Options.Backing), or Open refuses it.
//
// Image content is hostile. Every header field, table offset, table entry and
// compressed descriptor is bounds-checked before use; a malformed header is
// refused by Open, and corruption found while serving a request fails that
// request with an error wrapping ErrCorrupt (and sets the image's corrupt bit
// when it is open read-write) while other requests keep working.
//
// Metadata layout and crash safety: L2 tables and refcount blocks live in
// bounded write-back caches. Before a table that points at clusters (L2
// table, L1 table, refcount table) reaches the disk, every refcount increase
// it depends on is written and synced; a cluster whose last reference was
// dropped is only released once the dropping table is on disk. A crash can
// therefore leak clusters but never leave a reference to a cluster with a
// refcount that is too small. Flush (and Close) write everything back.
//
// Overlap check: every metadata write is first checked against a map of
// where metadata lives (overlap.go). Contiguous structures are ranges, each
// distinct range once, looked up by binary search; single-cluster tables are
// per-cluster entries. The L2 tables of internal snapshots are tracked
// within a budget of snapshot L1 entries read at open, each distinct table
// counted once, so that the work of Open does not grow with the number of
// snapshots sharing a table. Check bounds its own bookkeeping by
// CheckOptions.MemoryLimit and refuses an image that needs more.
//
// Concurrency: reads, and writes that land on clusters the active image
// owns alone, share a read lock; anything that changes metadata (allocation,
// copy-on-write, zeroing, discard, flush) takes the write lock.
//
// Not implemented: encryption (refused), writing compressed clusters,
// creating, deleting or reverting internal snapshots (the active image of a
// snapshotted image is served and copy-on-write keeps snapshots intact),
// updating persistent bitmaps (a read-write open marks them in use), and
// deferring refcount updates with lazy refcounts (refcounts are always kept
// exact, which the format allows; a dirty image is repaired when opened
// read-write).
package qcow2

import (
	"errors"
	"fmt"
)

// Errors callers can test for with errors.Is.
var (
	// ErrInvalid marks an image whose header or tables break the format's
	// rules; Open refuses it.
	ErrInvalid = errors.New("invalid qcow2 image")
	// ErrCorrupt marks corruption found while serving a request.
	ErrCorrupt = errors.New("qcow2 image is corrupt")
	// ErrUnsupported marks a valid image that uses a feature this package
	// does not implement (encryption, unknown incompatible features).
	ErrUnsupported = errors.New("unsupported qcow2 feature")
	// ErrBacking marks a backing chain or data file that does not match the
	// one the user declared.
	ErrBacking = errors.New("backing chain mismatch")
	// ErrDataFile marks an external data file that does not match the one
	// the user declared; it is also an ErrBacking (errors.Is), worded for
	// what it is.
	ErrDataFile error = dataFileMismatch{}
)

type dataFileMismatch struct{}

func (dataFileMismatch) Error() string        { return "data file mismatch" }
func (dataFileMismatch) Is(target error) bool { return target == ErrBacking }

// Format limits. Most are QEMU's implementation limits, so any image QEMU
// writes opens here and nothing much larger does.
const (
	magic = 0x514649fb // "QFI\xfb"

	minClusterBits = 9
	maxClusterBits = 21

	maxL1Bytes        = 32 << 20 // L1 table
	maxRefTableBytes  = 8 << 20  // refcount table
	maxSnapTableBytes = 64 << 20 // snapshot table
	maxSnapshots      = 65536
	maxSnapExtraData  = 1024
	maxBackingName    = 1023
	maxBackingFmt     = 15
	maxDataFileName   = 1023
	maxBitmaps        = 65535
	maxBitmapDirBytes = 65535 * 1024
	// MaxChainDepth is the longest backing chain Open accepts.
	MaxChainDepth = 16

	// Host offsets in tables are limited to 56 bits.
	maxHostOffset = uint64(1) << 56

	// Header field offsets used when updating the header in place.
	hdrIncompatOff  = 72
	hdrAutoclearOff = 88
	hdrRefTableOff  = 48

	v2HeaderLen = 72
	v3HeaderLen = 104
)

// Incompatible feature bits.
const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	compatLazyRefcounts = 1 << 0

	autoclearBitmaps     = 1 << 0
	autoclearDataFileRaw = 1 << 1
)

// Header extension types.
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureTable  = 0x6803f857
	extBitmaps       = 0x23852875
	extCrypto        = 0x0537be77
	extDataFile      = 0x44415441
)

// Table entry bits.
const (
	flagCopied     = uint64(1) << 63
	flagCompressed = uint64(1) << 62
	flagZero       = uint64(1) << 0
	// L1 entries: bits 9-55 offset, 63 copied, rest reserved.
	l1OffsetMask   = uint64(0x00fffffffffffe00)
	l1ReservedMask = uint64(0x7f000000000001ff)
	// Standard L2 descriptor: bits 9-55 offset, bit 0 zero, 1-8 and 56-61 reserved.
	l2OffsetMask   = uint64(0x00fffffffffffe00)
	l2ReservedMask = uint64(0x3f000000000001fe)
	// Refcount table entries: bits 9-63 offset, 0-8 reserved.
	rtOffsetMask   = ^uint64(0x1ff)
	rtReservedMask = uint64(0x1ff)
)

// Compression types.
const (
	compressionZlib = 0
	compressionZstd = 1
)

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

func unsupportedf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, args...))
}

// divRoundUp returns ceil(a/b) for b > 0 without overflowing.
func divRoundUp(a, b uint64) uint64 {
	q := a / b
	if a%b != 0 {
		q++
	}
	return q
}
