// Package qcow2out writes a new qcow2 image (version 3) in one sequential
// pass: guest clusters arrive in increasing order, zero clusters are left
// unallocated, and clusters may be stored compressed (zlib or zstd). It is
// what `krun-core img convert -O qcow2` and `img import` write with.
//
// Every byte goes to the end of the file: data clusters, compressed data
// packed byte by byte, each L2 table once the writer has moved past its
// range, each refcount block once every cluster it covers has its final
// count. Finish appends the last tables, the L1 table and the refcount
// table, then writes the header with the virtual size, which therefore
// need not be known in advance (import). Memory stays bounded by one L2
// table, the open refcount blocks and the refcount table.
//
// The image is new and owned by the caller until Finish returns: nothing
// here is crash-safe, and a caller that fails part way removes the file.
//
// disk/qcow2 has no streaming or compressed writer; this package exists so
// that convert and import do not go through read-modify-write of a
// general-purpose image with per-table syncs.
package qcow2out

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Format constants (docs/interop/qcow2.txt).
const (
	magic         = 0x514649fb
	headerLen     = 112 // version 3 header with the compression type byte, padded to 8
	refcountOrder = 4   // 16-bit refcounts
	refcountMax   = 1<<16 - 1
	flagCopied    = uint64(1) << 63
	flagCompr     = uint64(1) << 62
	incompatCompr = uint64(1) << 3 // compression type field is not zlib

	// MaxL1Bytes is the largest L1 table this package writes (QEMU's and
	// disk/qcow2's limit).
	MaxL1Bytes = 32 << 20
	// MaxRefTableBytes is the largest refcount table disk/qcow2 reads.
	MaxRefTableBytes = 8 << 20

	// DefaultClusterSize is used when Options.ClusterSize is 0.
	DefaultClusterSize = 64 << 10
	minClusterBits     = 9
	maxClusterBits     = 21

	// zlibWindow is the deflate window QEMU inflates compressed clusters
	// with (windowBits -12); a longer back-reference would not decode.
	zlibWindow = 4096
	// flushBytes bounds the write-combining buffer.
	flushBytes = 1 << 20
)

// Compression types.
const (
	Zlib = "zlib"
	Zstd = "zstd"
)

// Options describes the image to write.
type Options struct {
	// ClusterSize is a power of two from 512 to 2 MiB; 0 means 64 KiB.
	ClusterSize int64
	// Compress stores each cluster compressed when that makes it smaller.
	Compress bool
	// CompressionType is "zlib" (default) or "zstd". It is recorded in the
	// header even without Compress, as `qemu-img create -o
	// compression_type=` does.
	CompressionType string
}

// ErrOrder is returned for a cluster written twice or out of order.
var ErrOrder = errors.New("qcow2out: clusters must be written once, in increasing order")

// Writer writes one image. It is not safe for concurrent use.
type Writer struct {
	w     io.WriterAt
	cs    uint64
	cb    uint
	zstd  bool
	compr bool

	// Host side: every cluster below next is allocated. Bytes below
	// flushed are in the file; buf holds [flushed, flushed+len(buf)).
	next    uint64
	flushed uint64
	buf     []byte
	// cpos is where the next compressed byte goes; valid only while it
	// lies inside the last allocated cluster (nothing allocated since).
	cpos uint64

	// Refcounts of clusters [rcBase, next); rcBase is a multiple of the
	// entries per refcount block. Blocks below rcBase are in the file.
	rcBase uint64
	rc     []uint16
	rt     []uint64 // refcount table entries (offsets of written blocks)

	// Guest side.
	l1      []uint64 // L1 entries of written L2 tables, by index
	l2Index uint64   // L1 index of l2
	l2      []uint64 // the open L2 table, nil if none
	last    uint64   // last guest cluster written + 1 (0: none)

	fw  *flate.Writer
	zw  *zstd.Encoder
	cb2 bytes.Buffer // compression output

	written uint64 // guest data bytes stored (before compression)
	err     error  // sticky
	done    bool
}

// CheckClusterSize validates a cluster size (0 means the default) and
// returns its log2.
func CheckClusterSize(cs int64) (uint, error) {
	if cs == 0 {
		cs = DefaultClusterSize
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return 0, fmt.Errorf("cluster size %d: want a power of two from 512 to 2M", cs)
	}
	return uint(bits.TrailingZeros64(uint64(cs))), nil
}

// MaxVirtualSize is the largest virtual size an image with cluster size cs
// can have here: the L1 table is limited to MaxL1Bytes.
func MaxVirtualSize(cs int64) int64 {
	cb, err := CheckClusterSize(cs)
	if err != nil {
		return 0
	}
	l2Bits := cb - 3
	perL1 := uint(cb + l2Bits) // log2 of the bytes one L1 entry covers
	entries := uint64(MaxL1Bytes / 8)
	if perL1+uint(bits.Len64(entries)) >= 63 {
		return math.MaxInt64 &^ 511
	}
	return int64(entries << perL1)
}

// New starts an image in w, which must be empty (a new or truncated file).
func New(w io.WriterAt, o Options) (*Writer, error) {
	if w == nil {
		return nil, errors.New("qcow2out: nil output")
	}
	cs := o.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	cb, err := CheckClusterSize(cs)
	if err != nil {
		return nil, err
	}
	wr := &Writer{w: w, cs: uint64(cs), cb: cb, compr: o.Compress}
	switch o.CompressionType {
	case "", Zlib:
	case Zstd:
		wr.zstd = true
	default:
		return nil, fmt.Errorf("compression type %q: want zlib or zstd", o.CompressionType)
	}
	if o.Compress {
		if wr.zstd {
			if wr.zw, err = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true)); err != nil {
				return nil, fmt.Errorf("zstd encoder: %w", err)
			}
		} else if wr.fw, err = flate.NewWriterWindow(&wr.cb2, zlibWindow); err != nil {
			return nil, fmt.Errorf("deflate encoder: %w", err)
		}
	}
	// Cluster 0 is the header, written by Finish.
	wr.alloc(1)
	wr.buf = make([]byte, 0, flushBytes+2*wr.cs)
	wr.buf = append(wr.buf, make([]byte, wr.cs)...)
	return wr, nil
}

// ClusterSize is the image's cluster size.
func (w *Writer) ClusterSize() int64 { return int64(w.cs) }

// Written is the number of guest bytes stored so far (zero clusters are not
// stored).
func (w *Writer) Written() int64 { return int64(w.written) }

func (w *Writer) l2Entries() uint64 { return w.cs / 8 }

// alloc allocates n clusters at the end of the file with refcount 1 and
// returns the first.
func (w *Writer) alloc(n uint64) uint64 {
	c := w.next
	w.next += n
	for i := uint64(0); i < n; i++ {
		w.rc = append(w.rc, 1)
	}
	return c
}

// put places p at host offset off, which is at or after everything placed
// so far.
func (w *Writer) put(p []byte, off uint64) error {
	end := w.flushed + uint64(len(w.buf))
	if off < end {
		return fmt.Errorf("qcow2out: internal error: write at %#x behind %#x", off, end)
	}
	for gap := off - end; gap > 0; {
		n := min(gap, uint64(len(zeros)))
		w.buf = append(w.buf, zeros[:n]...)
		gap -= n
		if err := w.maybeFlush(); err != nil {
			return err
		}
	}
	w.buf = append(w.buf, p...)
	return w.maybeFlush()
}

var zeros = make([]byte, 64<<10)

func (w *Writer) maybeFlush() error {
	if len(w.buf) < flushBytes {
		return nil
	}
	return w.flush()
}

func (w *Writer) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	if _, err := w.w.WriteAt(w.buf, int64(w.flushed)); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	w.flushed += uint64(len(w.buf))
	w.buf = w.buf[:0]
	return nil
}

// WriteCluster stores guest cluster idx. p is the cluster's content: at
// most one cluster, shorter only for the image's last cluster (the rest
// reads as zeroes). An all-zero p is not stored. Clusters must come in
// increasing order.
func (w *Writer) WriteCluster(idx uint64, p []byte) error {
	if w.err != nil {
		return w.err
	}
	if w.done {
		return errors.New("qcow2out: WriteCluster after Finish")
	}
	if uint64(len(p)) > w.cs {
		return fmt.Errorf("qcow2out: %d bytes for one %d-byte cluster", len(p), w.cs)
	}
	if idx < w.last {
		return ErrOrder
	}
	if idx > (uint64(math.MaxInt64)>>w.cb)-1 {
		return fmt.Errorf("qcow2out: cluster %d beyond the largest virtual size", idx)
	}
	if isZero(p) {
		return nil
	}
	w.last = idx + 1
	if err := w.writeCluster(idx, p); err != nil {
		w.err = err
		return err
	}
	return nil
}

func (w *Writer) writeCluster(idx uint64, p []byte) error {
	l1i := idx / w.l2Entries()
	if w.l2 == nil || l1i != w.l2Index {
		if err := w.closeL2(); err != nil {
			return err
		}
		if l1i >= MaxL1Bytes/8 {
			return fmt.Errorf("qcow2out: guest offset %#x needs an L1 table larger than %d bytes", idx*w.cs, MaxL1Bytes)
		}
		w.l2Index = l1i
		w.l2 = make([]uint64, w.l2Entries())
	}
	entry, err := w.store(p)
	if err != nil {
		return err
	}
	w.l2[idx%w.l2Entries()] = entry
	w.written += uint64(len(p))
	return w.flushRefblocks()
}

// store writes one cluster's data and returns its L2 entry.
func (w *Writer) store(p []byte) (uint64, error) {
	if w.compr {
		c, err := w.compress(p)
		if err != nil {
			return 0, err
		}
		if c != nil {
			return w.storeCompressed(c)
		}
	}
	c := w.alloc(1)
	off := c << w.cb
	if err := w.put(p, off); err != nil {
		return 0, err
	}
	if pad := w.cs - uint64(len(p)); pad > 0 {
		if err := w.put(zeros[:0], off+w.cs); err != nil { // pads the gap
			return 0, err
		}
	}
	return off | flagCopied, nil
}

// compress returns p compressed, or nil when that does not save space
// (QEMU stores a cluster compressed only if it shrinks below one cluster).
func (w *Writer) compress(p []byte) ([]byte, error) {
	full := p
	if uint64(len(p)) < w.cs { // the short last cluster: compress a whole one
		full = make([]byte, w.cs)
		copy(full, p)
	}
	w.cb2.Reset()
	if w.zstd {
		out := w.zw.EncodeAll(full, w.cb2.Bytes()[:0])
		if uint64(len(out)) >= w.cs {
			return nil, nil
		}
		return out, nil
	}
	w.fw.Reset(&w.cb2)
	if _, err := w.fw.Write(full); err != nil {
		return nil, fmt.Errorf("deflate: %w", err)
	}
	if err := w.fw.Close(); err != nil {
		return nil, fmt.Errorf("deflate: %w", err)
	}
	if uint64(w.cb2.Len()) >= w.cs {
		return nil, nil
	}
	return w.cb2.Bytes(), nil
}

// storeCompressed packs c after the previous compressed cluster when that
// one ended inside the last allocated cluster, else at a new cluster; the
// data may run into the next cluster, which is then allocated.
func (w *Writer) storeCompressed(c []byte) (uint64, error) {
	n := uint64(len(c))
	lastC := w.next - 1
	off := w.cpos
	if off == 0 || off>>w.cb != lastC || w.rc[lastC-w.rcBase] >= refcountMax-1 {
		off = w.alloc(1) << w.cb
		w.rc[off>>w.cb-w.rcBase] = 0
	}
	end := off + n // exclusive
	first, lastNeeded := off>>w.cb, (end-1)>>w.cb
	for c := w.next; c <= lastNeeded; c++ {
		w.alloc(1)
		w.rc[c-w.rcBase] = 0
	}
	for c := first; c <= lastNeeded; c++ {
		w.rc[c-w.rcBase]++
	}
	if err := w.put(c, off); err != nil {
		return 0, err
	}
	w.cpos = end
	if end&(w.cs-1) == 0 {
		w.cpos = 0 // ended on a boundary: the next one starts fresh
	}
	x := 62 - (w.cb - 8)
	if off >= 1<<x {
		return 0, fmt.Errorf("qcow2out: compressed cluster at %#x beyond the descriptor's offset bits", off)
	}
	sectors := (end-1)>>9 - off>>9 // additional 512-byte sectors
	if sectors >= 1<<(w.cb-8) {
		return 0, fmt.Errorf("qcow2out: internal error: %d compressed bytes do not fit a descriptor", n)
	}
	return flagCompr | sectors<<x | off, nil
}

// closeL2 writes the open L2 table and records it in the L1 table.
func (w *Writer) closeL2() error {
	if w.l2 == nil {
		return nil
	}
	c := w.alloc(1)
	b := make([]byte, w.cs)
	for i, e := range w.l2 {
		binary.BigEndian.PutUint64(b[i*8:], e)
	}
	if err := w.put(b, c<<w.cb); err != nil {
		return err
	}
	for uint64(len(w.l1)) <= w.l2Index {
		w.l1 = append(w.l1, 0)
	}
	w.l1[w.l2Index] = c<<w.cb | flagCopied
	w.l2 = nil
	w.cpos = 0
	return w.flushRefblocks()
}

// rbEntries is the number of refcounts per refcount block.
func (w *Writer) rbEntries() uint64 { return w.cs * 8 / 16 }

// flushRefblocks writes every refcount block whose clusters all have their
// final counts: those entirely below the last allocated cluster (only that
// one can still take compressed data).
func (w *Writer) flushRefblocks() error {
	E := w.rbEntries()
	for w.rcBase+E <= w.next-1 {
		if err := w.writeRefblock(w.rc[:E]); err != nil {
			return err
		}
		w.rc = w.rc[E:]
		w.rcBase += E
		// Keep the backing array from growing without bound.
		if cap(w.rc) > int(4*E) && len(w.rc) < int(E) {
			w.rc = append(make([]uint16, 0, 2*E), w.rc...)
		}
	}
	return nil
}

// writeRefblock allocates a cluster for one block of counts and writes it.
func (w *Writer) writeRefblock(counts []uint16) error {
	c := w.alloc(1)
	b := make([]byte, w.cs)
	for i, v := range counts {
		binary.BigEndian.PutUint16(b[i*2:], v)
	}
	if err := w.put(b, c<<w.cb); err != nil {
		return err
	}
	w.rt = append(w.rt, c<<w.cb)
	w.cpos = 0
	if uint64(len(w.rt))*8 > MaxRefTableBytes {
		return fmt.Errorf("qcow2out: image needs a refcount table larger than %d bytes", MaxRefTableBytes)
	}
	return nil
}

// Finish completes the image with virtual size size (rounded up to 512
// bytes; it must cover every cluster written) and returns once the data is
// written. It does not sync: the caller does, and closes the file.
func (w *Writer) Finish(size int64) error {
	if w.err != nil {
		return w.err
	}
	if w.done {
		return errors.New("qcow2out: Finish called twice")
	}
	w.done = true
	w.err = w.finish(size)
	return w.err
}

func (w *Writer) finish(size int64) error {
	if size < 0 || size > math.MaxInt64-511 {
		return fmt.Errorf("qcow2out: virtual size %d out of range", size)
	}
	vsize := (uint64(size) + 511) &^ 511
	if w.last > 0 && (w.last-1)<<w.cb >= vsize {
		return fmt.Errorf("qcow2out: virtual size %d does not cover cluster %d, which was written", size, w.last-1)
	}
	if err := w.closeL2(); err != nil {
		return err
	}
	perL1 := w.cs * w.l2Entries()
	l1Size := max((vsize+perL1-1)/perL1, 1)
	if l1Size*8 > MaxL1Bytes {
		return fmt.Errorf("qcow2out: virtual size %d needs an L1 table larger than %d bytes (use a larger cluster size)", vsize, MaxL1Bytes)
	}
	l1Clusters := (l1Size*8 + w.cs - 1) / w.cs
	l1c := w.alloc(l1Clusters)
	l1b := make([]byte, l1Clusters*w.cs)
	for i, e := range w.l1 {
		binary.BigEndian.PutUint64(l1b[i*8:], e)
	}
	if err := w.put(l1b, l1c<<w.cb); err != nil {
		return err
	}

	// Place the last refcount blocks and the refcount table so that the
	// blocks cover themselves and the table.
	E := w.rbEntries()
	var nRB, nRT uint64
	for {
		total := w.next + nRB + nRT
		blocks := (total + E - 1) / E // blocks the whole file needs
		wantRB := blocks - w.rcBase/E
		wantRT := (blocks*8 + w.cs - 1) / w.cs
		if wantRB == nRB && wantRT == nRT {
			break
		}
		nRB, nRT = wantRB, wantRT
	}
	if nRT*w.cs > MaxRefTableBytes {
		return fmt.Errorf("qcow2out: image needs a refcount table larger than %d bytes", MaxRefTableBytes)
	}
	rbFirst := w.alloc(nRB)
	rtFirst := w.alloc(nRT)
	// Every count is final now.
	rb := make([]byte, w.cs)
	for i := uint64(0); i < nRB; i++ {
		clear(rb)
		lo := i * E
		for j := lo; j < min(lo+E, uint64(len(w.rc))); j++ {
			binary.BigEndian.PutUint16(rb[(j-lo)*2:], w.rc[j])
		}
		off := (rbFirst + i) << w.cb
		if err := w.put(rb, off); err != nil {
			return err
		}
		w.rt = append(w.rt, off)
	}
	rtb := make([]byte, nRT*w.cs)
	for i, e := range w.rt {
		binary.BigEndian.PutUint64(rtb[i*8:], e)
	}
	if err := w.put(rtb, rtFirst<<w.cb); err != nil {
		return err
	}
	if err := w.flush(); err != nil {
		return err
	}

	h := make([]byte, w.cs)
	be := binary.BigEndian
	be.PutUint32(h[0:], magic)
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], uint32(w.cb))
	be.PutUint64(h[24:], vsize)
	be.PutUint32(h[36:], uint32(l1Size))
	be.PutUint64(h[40:], l1c<<w.cb)
	be.PutUint64(h[48:], rtFirst<<w.cb)
	be.PutUint32(h[56:], uint32(nRT))
	var incompat uint64
	if w.zstd {
		incompat |= incompatCompr
		h[104] = 1
	}
	be.PutUint64(h[72:], incompat)
	be.PutUint32(h[96:], refcountOrder)
	be.PutUint32(h[100:], headerLen)
	// The header extension area holds only the end marker (zero type and
	// length) at headerLen.
	if _, err := w.w.WriteAt(h, 0); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	return nil
}

// Size is the file size the image has after Finish.
func (w *Writer) Size() int64 { return int64(w.next << w.cb) }

func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// IsZero reports whether p holds only zero bytes.
func IsZero(p []byte) bool { return isZero(p) }
