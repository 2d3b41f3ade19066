package blk

import (
	"encoding/binary"
	"errors"
	"math"

	"github.com/krun-core/krun-core/virtq"
)

// A request is a descriptor chain: device-readable bytes (the 16-byte header,
// then OUT data or discard/write-zeroes ranges) followed by device-writable
// bytes (IN or GET_ID data, then the status byte, always the last writable
// byte). Every length, sector and count in it is guest-controlled. The
// handler below works on the chain's segments directly: it never assumes how
// the guest split the request into descriptors, copies the header and the
// ranges out of guest memory once before validating them (no
// validate-then-use race), and moves bulk data between guest memory and the
// disk with no intermediate copy.

// Reasons a request fails; each has a counter in Stats.
var (
	errNoStatus       = errors.New("request has no device-writable status byte")
	errShortHeader    = errors.New("request header shorter than 16 bytes")
	errBadLength      = errors.New("data length is not a multiple of 512")
	errOutOfRange     = errors.New("sector range beyond capacity")
	errTooManySegs    = errors.New("more discard/write-zeroes ranges than the device allows")
	errBadFlags       = errors.New("unknown discard/write-zeroes flag, or unmap on discard")
	errTooManySectors = errors.New("discard/write-zeroes range longer than the device allows")
	errShortID        = errors.New("GET_ID buffer shorter than 20 bytes")
	errReadOnly       = errors.New("write to a read-only device")
	errUnsupported    = errors.New("unsupported request type")
	errTooLarge       = errors.New("request larger than 4 GiB")
)

// dwzRange is one decoded discard / write-zeroes range.
type dwzRange struct {
	sector  uint64
	sectors uint32
	flags   uint32
}

// worker handles the requests of one queue. It owns all scratch space a
// request needs, so a request allocates nothing. Not safe for concurrent use.
type worker struct {
	d      *Device
	hdr    [HeaderSize]byte
	seg    [SegmentSize]byte
	ranges []dwzRange // capacity: the larger of the two segment limits
	iov    [][]byte   // reused view list for vectored I/O
	rd, wr [][]byte   // the current chain's buffers (views into guest memory)
	bad    error      // why the current request is malformed, if it is
}

func (d *Device) newWorker() *worker {
	n := max(d.limits.maxDiscardSeg, d.limits.maxWriteZeroesSeg, 1)
	return &worker{d: d, ranges: make([]dwzRange, 0, n), iov: make([][]byte, 0, 16)}
}

// handle serves one request given as its device-readable segments rd and
// device-writable segments wr, and returns the used length. It always
// completes the request: a malformed or failed request gets an error status
// (if it has room for one) and bumps a counter. The error it returns names
// a malformed request (a guest driver bug or a hostile guest); disk errors,
// unsupported requests and writes to a read-only disk are not malformed.
func (w *worker) handle(rd, wr [][]byte) (uint32, error) {
	rdLen, wrLen := segLen(rd), segLen(wr)
	if wrLen == 0 {
		// Nowhere to put a status: the request is completed with nothing
		// written, and the guest learns nothing.
		w.d.count(errNoStatus)
		return 0, errNoStatus
	}
	w.bad = nil
	status := w.serve(rd, wr, rdLen, wrLen)
	putStatus(wr, status)
	if wrLen > math.MaxUint32 {
		return math.MaxUint32, w.bad
	}
	return uint32(wrLen), w.bad
}

// handleChain serves one descriptor chain: it collects views of the chain's
// buffers into the worker's scratch lists (at most the chain bound of them,
// seg_max+2)
// and hands them to handle. A chain that turns out malformed while it is
// walked (the guest rewrote it after making it available) is completed with
// nothing written.
func (w *worker) handleChain(c *virtq.Chain) (uint32, error) {
	w.rd = c.PeekReadable(w.rd[:0], c.ReadableLen())
	w.wr = c.PeekWritable(w.wr[:0], c.WritableLen())
	if err := c.Err(); err != nil {
		return 0, err
	}
	return w.handle(w.rd, w.wr)
}

// fail counts a failed request and returns its status. Malformed-request
// reasons are remembered for handle's error.
func (w *worker) fail(reason error, status byte) byte {
	w.d.count(reason)
	switch reason {
	case errReadOnly, errUnsupported:
	default:
		w.bad = reason
	}
	return status
}

// serve runs the request and returns its status byte.
func (w *worker) serve(rd, wr [][]byte, rdLen, wrLen uint64) byte {
	d := w.d
	if rdLen < HeaderSize {
		return w.fail(errShortHeader, StatusIOErr)
	}
	if rdLen > math.MaxUint32 || wrLen > math.MaxUint32 {
		return w.fail(errTooLarge, StatusIOErr)
	}
	gather(w.hdr[:], rd, 0)
	typ := binary.LittleEndian.Uint32(w.hdr[0:])
	sector := binary.LittleEndian.Uint64(w.hdr[8:])
	dataIn := wrLen - 1 // device-writable bytes before the status byte

	switch typ {
	case TypeIn:
		d.stats.reads.Add(1)
		off, err := d.dataRange(sector, dataIn)
		if err != nil {
			return w.fail(err, StatusIOErr)
		}
		if dataIn == 0 {
			return StatusOK
		}
		w.iov = window(w.iov[:0], wr, 0, dataIn)
		if err := d.readv(w.iov, off); err != nil {
			d.ioError("read", off, dataIn, err)
			return StatusIOErr
		}
		d.stats.bytesRead.Add(dataIn)
		return StatusOK

	case TypeOut:
		d.stats.writes.Add(1)
		if d.readOnly {
			return w.fail(errReadOnly, StatusIOErr)
		}
		dataOut := rdLen - HeaderSize
		off, err := d.dataRange(sector, dataOut)
		if err != nil {
			return w.fail(err, StatusIOErr)
		}
		if dataOut == 0 {
			return StatusOK
		}
		w.iov = window(w.iov[:0], rd, HeaderSize, dataOut)
		if err := d.writev(w.iov, off); err != nil {
			d.ioError("write", off, dataOut, err)
			return StatusIOErr
		}
		d.stats.bytesWritten.Add(dataOut)
		return d.writeThroughFlush()

	case TypeFlush:
		d.stats.flushes.Add(1)
		if err := d.disk.Flush(); err != nil {
			d.ioError("flush", 0, 0, err)
			return StatusIOErr
		}
		return StatusOK

	case TypeGetID:
		d.stats.getIDs.Add(1)
		if dataIn < IDBytes {
			return w.fail(errShortID, StatusIOErr)
		}
		scatter(wr, 0, d.id[:])
		return StatusOK

	case TypeDiscard, TypeWriteZeroes:
		return w.discardOrZero(typ, rd, rdLen)
	}
	return w.fail(errUnsupported, StatusUnsupp)
}

// discardOrZero serves DISCARD and WRITE_ZEROES: the readable bytes after
// the header are an array of 16-byte ranges.
func (w *worker) discardOrZero(typ uint32, rd [][]byte, rdLen uint64) byte {
	d := w.d
	discard := typ == TypeDiscard
	maxSeg, maxSectors := d.limits.maxWriteZeroesSeg, d.limits.maxWriteZeroesSectors
	feature := uint64(1) << FeatureWriteZeroes
	if discard {
		d.stats.discards.Add(1)
		maxSeg, maxSectors = d.limits.maxDiscardSeg, d.limits.maxDiscardSectors
		feature = 1 << FeatureDiscard
	} else {
		d.stats.writeZeroes.Add(1)
	}
	if d.readOnly {
		return w.fail(errReadOnly, StatusIOErr)
	}
	if d.negotiated.Load()&feature == 0 {
		return w.fail(errUnsupported, StatusUnsupp)
	}
	payload := rdLen - HeaderSize
	if payload == 0 || payload%SegmentSize != 0 {
		return w.fail(errBadLength, StatusIOErr)
	}
	if payload/SegmentSize > uint64(maxSeg) {
		return w.fail(errTooManySegs, StatusIOErr)
	}
	n := int(payload / SegmentSize)

	// Copy every range out of guest memory, then validate all of them
	// before touching the disk, so a bad range fails the request whole.
	w.ranges = w.ranges[:0]
	for i := 0; i < n; i++ {
		gather(w.seg[:], rd, HeaderSize+uint64(i)*SegmentSize)
		w.ranges = append(w.ranges, dwzRange{
			sector:  binary.LittleEndian.Uint64(w.seg[0:]),
			sectors: binary.LittleEndian.Uint32(w.seg[8:]),
			flags:   binary.LittleEndian.Uint32(w.seg[12:]),
		})
	}
	for _, r := range w.ranges {
		if r.flags&^FlagUnmap != 0 || (discard && r.flags&FlagUnmap != 0) {
			// Spec 5.2.6.2: unknown flags, and unmap on a discard,
			// are VIRTIO_BLK_S_UNSUPP, whatever else is wrong
			// with the request's other ranges.
			return w.fail(errBadFlags, StatusUnsupp)
		}
	}
	for _, r := range w.ranges {
		if r.sectors > maxSectors {
			return w.fail(errTooManySectors, StatusIOErr)
		}
		if _, err := d.sectorRange(r.sector, uint64(r.sectors)); err != nil {
			return w.fail(err, StatusIOErr)
		}
	}
	for _, r := range w.ranges {
		off := int64(r.sector << sectorShift)
		length := int64(r.sectors) << sectorShift
		var err error
		if discard {
			err = d.disk.Discard(off, length)
		} else {
			err = d.disk.WriteZeroes(off, length, r.flags&FlagUnmap != 0)
		}
		if err != nil {
			op := "write zeroes"
			if discard {
				op = "discard"
			}
			d.ioError(op, off, uint64(length), err)
			return StatusIOErr
		}
	}
	return d.writeThroughFlush()
}

// dataRange checks an IN/OUT transfer of n bytes at sector and returns its
// byte offset.
func (d *Device) dataRange(sector, n uint64) (int64, error) {
	if n%SectorSize != 0 {
		return 0, errBadLength
	}
	return d.sectorRange(sector, n>>sectorShift)
}

// sectorRange checks [sector, sector+count) against the capacity without
// overflowing and returns the byte offset of sector.
func (d *Device) sectorRange(sector, count uint64) (int64, error) {
	if sector > d.capacity || count > d.capacity-sector {
		return 0, errOutOfRange
	}
	// capacity*512 <= disk size <= MaxInt64, so this cannot overflow.
	return int64(sector << sectorShift), nil
}

// writeThroughFlush makes a completed write durable when the driver did not
// negotiate VIRTIO_BLK_F_FLUSH: without it the device must behave as a
// write-through cache, since the driver will never send a flush.
func (d *Device) writeThroughFlush() byte {
	if d.negotiated.Load()&(1<<FeatureFlush) != 0 {
		return StatusOK
	}
	if err := d.disk.Flush(); err != nil {
		d.ioError("write-through flush", 0, 0, err)
		return StatusIOErr
	}
	return StatusOK
}

func (d *Device) readv(bufs [][]byte, off int64) error {
	if d.vec != nil {
		_, err := d.vec.ReadvAt(bufs, off)
		return err
	}
	for _, b := range bufs {
		if _, err := d.disk.ReadAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (d *Device) writev(bufs [][]byte, off int64) error {
	if d.serialW {
		d.wmu.Lock()
		defer d.wmu.Unlock()
	}
	if d.vec != nil {
		_, err := d.vec.WritevAt(bufs, off)
		return err
	}
	for _, b := range bufs {
		if _, err := d.disk.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

// segLen is the total length of segs.
func segLen(segs [][]byte) uint64 {
	var n uint64
	for _, s := range segs {
		n += uint64(len(s))
	}
	return n
}

// gather copies len(dst) bytes starting skip bytes into segs into dst. The
// caller has checked that segs holds skip+len(dst) bytes.
func gather(dst []byte, segs [][]byte, skip uint64) {
	for _, s := range segs {
		if len(dst) == 0 {
			return
		}
		if skip >= uint64(len(s)) {
			skip -= uint64(len(s))
			continue
		}
		k := copy(dst, s[skip:])
		dst = dst[k:]
		skip = 0
	}
}

// scatter copies src into segs starting skip bytes in. The caller has
// checked that segs holds skip+len(src) bytes.
func scatter(segs [][]byte, skip uint64, src []byte) {
	for _, s := range segs {
		if len(src) == 0 {
			return
		}
		if skip >= uint64(len(s)) {
			skip -= uint64(len(s))
			continue
		}
		k := copy(s[skip:], src)
		src = src[k:]
		skip = 0
	}
}

// window appends to dst views of the n bytes that start skip bytes into
// segs, leaving out empty pieces. The caller has checked the lengths.
func window(dst [][]byte, segs [][]byte, skip, n uint64) [][]byte {
	for _, s := range segs {
		if n == 0 {
			break
		}
		if skip >= uint64(len(s)) {
			skip -= uint64(len(s))
			continue
		}
		v := s[skip:]
		skip = 0
		if uint64(len(v)) > n {
			v = v[:n]
		}
		if len(v) > 0 {
			dst = append(dst, v)
		}
		n -= uint64(len(v))
	}
	return dst
}

// putStatus stores the status in the last device-writable byte.
func putStatus(wr [][]byte, status byte) {
	for i := len(wr) - 1; i >= 0; i-- {
		if n := len(wr[i]); n > 0 {
			wr[i][n-1] = status
			return
		}
	}
}
