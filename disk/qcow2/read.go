package qcow2

import (
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/krun-core/krun-core/disk"
)

type ctype uint8

const (
	ctUnalloc ctype = iota
	ctZero
	ctNormal
	ctCompressed
)

const allSub = ^uint32(0)

// cinfo is a decoded L2 entry.
type cinfo struct {
	typ     ctype
	host    uint64 // cluster-aligned host offset (normal, or a preallocated zero cluster)
	hasHost bool   // host is meaningful (with an external data file it may be 0)
	copied  bool
	// Per-subcluster state. Without extended L2 entries a cluster is one
	// state repeated 32 times.
	alloc, zero uint32
	// Compressed clusters.
	coff, csize uint64
	raw         uint64
}

// state of subcluster s: 0 backing, 1 zero, 2 data.
func (ci *cinfo) state(s uint) int {
	switch {
	case ci.alloc&(1<<s) != 0:
		return 2
	case ci.zero&(1<<s) != 0:
		return 1
	}
	return 0
}

// classify decodes the L2 entry e (and its subcluster bitmap bm) of guest
// cluster gc.
func (im *Image) classify(e, bm, gc uint64) (cinfo, error) {
	if e&flagCompressed != 0 {
		if im.extData {
			return cinfo{}, corruptf("guest cluster %d: compressed cluster in an image with an external data file", gc)
		}
		if e&flagCopied != 0 {
			return cinfo{}, corruptf("guest cluster %d: compressed L2 entry %#x has the copied flag", gc, e)
		}
		if im.extL2 && bm != 0 {
			return cinfo{}, corruptf("guest cluster %d: compressed cluster with subcluster bitmap %#x", gc, bm)
		}
		x := 62 - (im.cb - 8)
		coff := e & (1<<x - 1)
		nsec := (e>>x)&(1<<(im.cb-8)-1) + 1
		if coff >= maxHostOffset {
			return cinfo{}, corruptf("guest cluster %d: compressed data offset %#x beyond 2^56", gc, coff)
		}
		if coff < im.cs {
			return cinfo{}, corruptf("guest cluster %d: compressed data at %#x overlaps the header", gc, coff)
		}
		return cinfo{typ: ctCompressed, coff: coff, csize: nsec*512 - coff&511, raw: e}, nil
	}
	if e&l2ReservedMask != 0 {
		return cinfo{}, corruptf("guest cluster %d: L2 entry %#x has reserved bits set", gc, e)
	}
	host := e & l2OffsetMask
	zeroFlag := e&flagZero != 0
	if zeroFlag && (im.h.version < 3 || im.extL2) {
		return cinfo{}, corruptf("guest cluster %d: zero flag in L2 entry %#x not allowed in this image", gc, e)
	}
	allocated := host != 0 || (im.extData && e&flagCopied != 0)
	if allocated {
		if host%im.cs != 0 {
			return cinfo{}, corruptf("guest cluster %d: host offset %#x is not aligned to a cluster", gc, host)
		}
		if im.extData && host != gc<<im.cb {
			return cinfo{}, corruptf("guest cluster %d: data file offset %#x differs from the guest offset", gc, host)
		}
		if !im.extData && host < im.cs {
			return cinfo{}, corruptf("guest cluster %d: host offset %#x overlaps the header", gc, host)
		}
	}
	ci := cinfo{host: host, hasHost: allocated, copied: e&flagCopied != 0, raw: e}
	if im.extL2 {
		ci.alloc, ci.zero = uint32(bm), uint32(bm>>32)
		if ci.alloc&ci.zero != 0 {
			return cinfo{}, corruptf("guest cluster %d: subcluster bitmap %#x marks subclusters both allocated and zero", gc, bm)
		}
		if !allocated && ci.alloc != 0 {
			return cinfo{}, corruptf("guest cluster %d: subclusters allocated without a host cluster (bitmap %#x)", gc, bm)
		}
		if allocated {
			ci.typ = ctNormal
		}
		return ci, nil
	}
	switch {
	case zeroFlag:
		ci.typ, ci.zero = ctZero, allSub
	case allocated:
		ci.typ, ci.alloc = ctNormal, allSub
	}
	return ci, nil
}

// l1Entry validates and returns the L2 table offset for L1 index i (0 if
// none).
func (im *Image) l2Offset(i uint64) (uint64, error) {
	e := im.l1[i]
	if e&l1ReservedMask != 0 {
		return 0, corruptf("L1 entry %d (%#x) has reserved bits set", i, e)
	}
	off := e & l1OffsetMask
	if off == 0 {
		return 0, nil
	}
	if off%im.cs != 0 {
		return 0, corruptf("L1 entry %d: L2 table offset %#x is not aligned to a cluster", i, off)
	}
	if off/im.cs >= im.fileClusters {
		return 0, corruptf("L1 entry %d: L2 table at %#x lies past the end of the image", i, off)
	}
	return off, nil
}

// loadL2 returns the L2 table at off, from the cache or the file. A table
// that overlaps other metadata is refused when it is loaded.
func (im *Image) loadL2(off uint64) (*table, error) {
	if t := im.l2c.get(off); t != nil {
		return t, nil
	}
	if k := im.meta.at(off / im.cs); k&^(metaL2|metaSnapL2) != 0 {
		return nil, corruptf("L2 table at %#x overlaps the %s", off, k&^(metaL2|metaSnapL2))
	}
	buf := make([]byte, im.cs)
	if _, err := readFullAt(im.f, buf, int64(off)); err != nil {
		return nil, fmt.Errorf("read L2 table at %#x: %w", off, err)
	}
	return im.l2c.add(&table{off: off, buf: buf}), nil
}

// lookup returns the decoded L2 entry of guest cluster gc.
func (im *Image) lookup(gc uint64) (cinfo, error) {
	l2off, err := im.l2Offset(gc >> im.l2Bits)
	if err != nil || l2off == 0 {
		return cinfo{}, err
	}
	t, err := im.loadL2(l2off)
	if err != nil {
		return cinfo{}, err
	}
	e, bm := im.entry(t, gc&(im.l2Entries-1))
	return im.classify(e, bm, gc)
}

// entry returns L2 entry i of t and its subcluster bitmap.
func (im *Image) entry(t *table, i uint64) (uint64, uint64) {
	if im.extL2 {
		return be.Uint64(t.buf[i*16:]), be.Uint64(t.buf[i*16+8:])
	}
	return be.Uint64(t.buf[i*8:]), 0
}

func (im *Image) setEntry(t *table, i, e, bm uint64) {
	if im.extL2 {
		be.PutUint64(t.buf[i*16:], e)
		be.PutUint64(t.buf[i*16+8:], bm)
		t.touch(i*16, i*16+16)
	} else {
		be.PutUint64(t.buf[i*8:], e)
		t.touch(i*8, i*8+8)
	}
	im.metaChanged = true
}

func (im *Image) checkRange(off int64, n int) error {
	if off < 0 || n < 0 || off > im.size || int64(n) > im.size-off {
		return fmt.Errorf("qcow2 %s: offset %d length %d: %w", im.name, off, n, disk.ErrOutOfRange)
	}
	return nil
}

// ReadAt reads len(p) bytes of virtual content at off.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.checkRange(off, len(p)); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if im.closed {
		return 0, errClosed
	}
	if err := im.readLocked(p, uint64(off)); err != nil {
		return 0, im.markCorrupt(fmt.Errorf("qcow2 %s: read at %d: %w", im.name, off, err))
	}
	return len(p), nil
}

// readLocked reads guest range [pos, pos+len(p)); the caller holds mu
// (shared or exclusive). Runs of allocated clusters that are contiguous on
// the host are read with one call.
func (im *Image) readLocked(p []byte, pos uint64) error {
	var runHost uint64
	runStart, runLen := 0, 0
	flush := func() error {
		if runLen == 0 {
			return nil
		}
		_, err := readFullAt(im.data, p[runStart:runStart+runLen], int64(runHost))
		runLen = 0
		return err
	}
	for i := 0; i < len(p); {
		in := pos & (im.cs - 1)
		n := int(min(im.cs-in, uint64(len(p)-i)))
		ci, err := im.lookup(pos >> im.cb)
		if err != nil {
			return err
		}
		if ci.typ == ctNormal && ci.alloc == allSub {
			h := ci.host + in
			if runLen > 0 && runHost+uint64(runLen) == h {
				runLen += n
			} else {
				if err := flush(); err != nil {
					return err
				}
				runHost, runStart, runLen = h, i, n
			}
		} else {
			if err := flush(); err != nil {
				return err
			}
			if err := im.readCluster(p[i:i+n], pos, &ci); err != nil {
				return err
			}
		}
		i += n
		pos += uint64(n)
	}
	return flush()
}

// readCluster reads q from guest offset pos, all inside one cluster
// described by ci.
func (im *Image) readCluster(q []byte, pos uint64, ci *cinfo) error {
	in := pos & (im.cs - 1)
	if ci.typ == ctCompressed {
		return im.readCompressed(q, in, ci)
	}
	base := pos - in
	end := in + uint64(len(q))
	sc := uint64(1) << im.scBits
	for a := in; a < end; {
		st := ci.state(uint(a >> im.scBits))
		b := (a>>im.scBits + 1) * sc
		for b < end && ci.state(uint(b>>im.scBits)) == st {
			b += sc
		}
		b = min(b, end)
		seg := q[a-in : b-in]
		switch st {
		case 2:
			if _, err := readFullAt(im.data, seg, int64(ci.host+a)); err != nil {
				return fmt.Errorf("read data cluster at %#x: %w", ci.host, err)
			}
		case 1:
			clear(seg)
		default:
			if err := im.readBacking(seg, base+a); err != nil {
				return err
			}
		}
		a = b
	}
	return nil
}

// backingError wraps a failure of a backing layer so that it is not taken
// for corruption of this image.
type backingError struct{ err error }

func (e *backingError) Error() string { return "backing: " + e.err.Error() }
func (e *backingError) Unwrap() error { return e.err }

// readBacking reads guest range [pos, pos+len(q)) from the backing chain;
// what lies past the backing's end reads as zeros.
func (im *Image) readBacking(q []byte, pos uint64) error {
	if im.backing == nil || pos >= uint64(im.backingSize) {
		clear(q)
		return nil
	}
	n := min(uint64(len(q)), uint64(im.backingSize)-pos)
	if _, err := im.backing.ReadAt(q[:n], int64(pos)); err != nil {
		return &backingError{err}
	}
	clear(q[n:])
	return nil
}

// decompressCache keeps the most recently decompressed cluster, so that
// small sequential reads of a compressed cluster decompress it once.
type decompressCache struct {
	mu  sync.Mutex
	key uint64
	buf []byte
}

func (im *Image) readCompressed(q []byte, in uint64, ci *cinfo) error {
	// The cached cluster is copied out with the lock released: q may be
	// guest memory, and a fault on it (a front-end that truncated its
	// memfd; the ring engine recovers it) must not leave the cache locked
	// for every later compressed read. A cached buffer is never modified,
	// only replaced.
	im.dc.mu.Lock()
	cached := im.dc.buf
	hit := cached != nil && im.dc.key == ci.raw
	im.dc.mu.Unlock()
	if hit {
		copy(q, cached[in:])
		return nil
	}
	buf := make([]byte, im.cs)
	if err := im.decompress(ci, buf); err != nil {
		return err
	}
	copy(q, buf[in:])
	im.dc.mu.Lock()
	im.dc.key, im.dc.buf = ci.raw, buf
	im.dc.mu.Unlock()
	return nil
}

func (im *Image) dropDecompressCache() {
	im.dc.mu.Lock()
	im.dc.buf = nil
	im.dc.mu.Unlock()
}

// decompress inflates the compressed cluster ci into dst (one cluster).
// The compressed bytes may run past the end of the file.
func (im *Image) decompress(ci *cinfo, dst []byte) error {
	src := make([]byte, ci.csize)
	n, err := im.f.ReadAt(src, int64(ci.coff))
	if n == 0 {
		if err == nil || errors.Is(err, io.EOF) {
			return corruptf("compressed cluster at %#x lies past the end of the file", ci.coff)
		}
		return fmt.Errorf("read compressed cluster at %#x: %w", ci.coff, err)
	}
	src = src[:n]
	switch im.compression {
	case compressionZlib:
		r := flate.NewReader(bytes.NewReader(src))
		_, err = io.ReadFull(r, dst)
		r.Close()
	case compressionZstd:
		var d *zstdDecoder
		if d, err = im.getZstd(); err == nil {
			err = d.decode(src, dst)
			im.putZstd(d)
		}
	default:
		err = fmt.Errorf("compression type %d", im.compression)
	}
	if err != nil {
		return corruptf("compressed cluster at %#x (%d bytes): %v", ci.coff, ci.csize, err)
	}
	return nil
}

type zstdDecoder struct{ d *zstd.Decoder }

// decode inflates one cluster from src, which holds a zstd frame (skippable
// frames before it allowed) and whatever follows it up to the end of the
// compressed sectors. As in QEMU, the frame that fills the cluster must end
// there: a frame whose content runs past the cluster is an I/O error, not
// served cut.
func (z *zstdDecoder) decode(src, dst []byte) error {
	n, whole := zstdFrameLen(src)
	if whole {
		src = src[:n]
	}
	if err := z.d.Reset(bytes.NewReader(src)); err != nil {
		return err
	}
	if _, err := io.ReadFull(z.d, dst); err != nil {
		return err
	}
	if !whole {
		// The cluster came out, but the frame does not end within the
		// compressed sectors: QEMU's decompression returns EIO for
		// that too (found in review, helper-91).
		return errors.New("the zstd frame does not end within its compressed sectors")
	}
	var one [1]byte
	if m, err := z.d.Read(one[:]); m > 0 || !errors.Is(err, io.EOF) {
		return fmt.Errorf("the zstd frame holds more than one cluster (%v)", err)
	}
	return nil
}

// zstdFrameLen returns the length of the first zstd frame in src, any
// skippable frames before it included (RFC 8878, 3.1), and whether src
// holds all of it.
func zstdFrameLen(src []byte) (int, bool) {
	p := 0
	need := func(n int) bool { return n >= 0 && len(src)-p >= n }
	for {
		if !need(4) {
			return 0, false
		}
		magic := uint32(src[p]) | uint32(src[p+1])<<8 | uint32(src[p+2])<<16 | uint32(src[p+3])<<24
		p += 4
		if magic&^0xf == 0x184D2A50 {
			if !need(4) {
				return 0, false
			}
			size := int64(uint32(src[p]) | uint32(src[p+1])<<8 | uint32(src[p+2])<<16 | uint32(src[p+3])<<24)
			p += 4
			if int64(len(src)-p) < size {
				return 0, false
			}
			p += int(size)
			continue
		}
		if magic != 0xFD2FB528 || !need(1) {
			return 0, false
		}
		fhd := src[p]
		p++
		single := fhd&0x20 != 0
		hdr := [4]int{0, 1, 2, 4}[fhd&3] // dictionary ID
		if !single {
			hdr++ // window descriptor
		}
		switch fcs := fhd >> 6; {
		case fcs == 0 && single:
			hdr++
		case fcs > 0:
			hdr += 1 << fcs
		}
		if !need(hdr) {
			return 0, false
		}
		p += hdr
		for {
			if !need(3) {
				return 0, false
			}
			bh := int(src[p]) | int(src[p+1])<<8 | int(src[p+2])<<16
			p += 3
			size := bh >> 3
			switch bh >> 1 & 3 {
			case 1: // RLE: one byte repeated size times
				size = 1
			case 3:
				return 0, false
			}
			if !need(size) {
				return 0, false
			}
			p += size
			if bh&1 != 0 {
				break
			}
		}
		if fhd&4 != 0 {
			if !need(4) {
				return 0, false
			}
			p += 4
		}
		return p, true
	}
}

// maxZstdWindow is the largest zstd window a compressed cluster may
// declare when its cluster is smaller (with 64 workers of a plugin
// decoding at once, 64 MiB of its data limit at most).
const maxZstdWindow = 1 << 20

func (im *Image) getZstd() (*zstdDecoder, error) {
	im.zstdMu.Lock()
	if n := len(im.zstdDec); n > 0 {
		d := im.zstdDec[n-1]
		im.zstdDec = im.zstdDec[:n-1]
		im.zstdMu.Unlock()
		return d, nil
	}
	im.zstdMu.Unlock()
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderLowmem(true),
		// A cluster's frame needs no window beyond the cluster (qemu-img
		// and krun-core write single-segment frames of one cluster); an
		// image declaring more makes every decoder in use hold it.
		zstd.WithDecoderMaxWindow(max(im.cs, maxZstdWindow)),
		zstd.WithDecoderMaxMemory(64<<20))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	return &zstdDecoder{d}, nil
}

func (im *Image) putZstd(d *zstdDecoder) {
	im.zstdMu.Lock()
	defer im.zstdMu.Unlock()
	if len(im.zstdDec) < 4 {
		im.zstdDec = append(im.zstdDec, d)
		return
	}
	d.d.Close()
}
