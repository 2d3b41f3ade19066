package virtq

import (
	"errors"
	"io"
	"math"
)

// Chain is one descriptor chain taken from a queue: the device-readable
// buffers followed by the device-writable ones, as slices into guest memory.
// A Chain is reused across Pop calls without allocating once its slices have
// grown. Its buffers are valid until the chain is pushed and at most until
// the queue's memory changes.
type Chain struct {
	// Head is the index of the chain's first descriptor, the id of its used
	// element.
	Head uint16

	rd, wr       [][]byte
	rdLen, wrLen uint64

	rdSeg, rdOff int // read cursor
	wrSeg, wrOff int // write cursor
	read         uint64
	written      uint64
}

func (c *Chain) reset(head uint16) {
	c.Head = head
	c.rd = c.rd[:0]
	c.wr = c.wr[:0]
	c.rdLen, c.wrLen = 0, 0
	c.rdSeg, c.rdOff, c.wrSeg, c.wrOff = 0, 0, 0, 0
	c.read, c.written = 0, 0
}

// ErrNoSpace is returned by Write when the device-writable buffers are full.
var ErrNoSpace = errors.New("descriptor chain has no more device-writable space")

// ReadableLen is the total length of the device-readable buffers.
func (c *Chain) ReadableLen() uint64 { return c.rdLen }

// WritableLen is the total length of the device-writable buffers.
func (c *Chain) WritableLen() uint64 { return c.wrLen }

// RemainingRead is how many readable bytes the read cursor has not consumed.
func (c *Chain) RemainingRead() uint64 { return c.rdLen - c.read }

// RemainingWrite is how much writable space the write cursor has left.
func (c *Chain) RemainingWrite() uint64 { return c.wrLen - c.written }

// Written is the number of bytes written through the cursor so far, the
// value for the used element's length (clamped to 32 bits).
func (c *Chain) Written() uint32 {
	if c.written > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(c.written)
}

// ReadableSegments returns the device-readable buffers, for zero-copy I/O.
// The returned slice is owned by the chain.
func (c *Chain) ReadableSegments() [][]byte { return c.rd }

// WritableSegments returns the device-writable buffers, for zero-copy I/O.
// The returned slice is owned by the chain.
func (c *Chain) WritableSegments() [][]byte { return c.wr }

// Read copies readable bytes at the read cursor into p (io.Reader).
func (c *Chain) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.rdSeg < len(c.rd) {
		seg := c.rd[c.rdSeg][c.rdOff:]
		k := copy(p[n:], seg)
		n += k
		c.rdOff += k
		if c.rdOff == len(c.rd[c.rdSeg]) {
			c.rdSeg++
			c.rdOff = 0
		}
	}
	c.read += uint64(n)
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

// ReadFull fills p from the readable bytes or fails with io.ErrUnexpectedEOF
// (io.EOF when nothing was left).
func (c *Chain) ReadFull(p []byte) error {
	_, err := io.ReadFull(c, p)
	return err
}

// Write copies p into the writable buffers at the write cursor (io.Writer).
// When the buffers fill up it returns the count written and ErrNoSpace.
func (c *Chain) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.wrSeg < len(c.wr) {
		seg := c.wr[c.wrSeg][c.wrOff:]
		k := copy(seg, p[n:])
		n += k
		c.wrOff += k
		if c.wrOff == len(c.wr[c.wrSeg]) {
			c.wrSeg++
			c.wrOff = 0
		}
	}
	c.written += uint64(n)
	if n < len(p) {
		return n, ErrNoSpace
	}
	return n, nil
}

// SkipRead advances the read cursor by n bytes.
func (c *Chain) SkipRead(n uint64) error {
	if n > c.RemainingRead() {
		return io.ErrUnexpectedEOF
	}
	c.read += n
	for n > 0 {
		left := uint64(len(c.rd[c.rdSeg]) - c.rdOff)
		if n < left {
			c.rdOff += int(n)
			return nil
		}
		n -= left
		c.rdSeg++
		c.rdOff = 0
	}
	c.normalizeRead()
	return nil
}

// SkipWrite advances the write cursor by n bytes, counting them as written
// (for data the device placed directly into WritableSegments).
func (c *Chain) SkipWrite(n uint64) error {
	if n > c.RemainingWrite() {
		return ErrNoSpace
	}
	c.written += n
	for n > 0 {
		left := uint64(len(c.wr[c.wrSeg]) - c.wrOff)
		if n < left {
			c.wrOff += int(n)
			return nil
		}
		n -= left
		c.wrSeg++
		c.wrOff = 0
	}
	c.normalizeWrite()
	return nil
}

// normalize* move the cursor past empty segments so that the segment views
// below never start on an exhausted buffer.
func (c *Chain) normalizeRead() {
	for c.rdSeg < len(c.rd) && c.rdOff == len(c.rd[c.rdSeg]) {
		c.rdSeg++
		c.rdOff = 0
	}
}

func (c *Chain) normalizeWrite() {
	for c.wrSeg < len(c.wr) && c.wrOff == len(c.wr[c.wrSeg]) {
		c.wrSeg++
		c.wrOff = 0
	}
}

// PeekWritable returns up to max bytes of writable space at the write cursor
// as segments appended to dst, without moving the cursor (commit with
// SkipWrite). Used for zero-copy reads from a file into guest memory.
func (c *Chain) PeekWritable(dst [][]byte, max uint64) [][]byte {
	seg, off := c.wrSeg, c.wrOff
	for max > 0 && seg < len(c.wr) {
		b := c.wr[seg][off:]
		if uint64(len(b)) > max {
			b = b[:max]
		}
		if len(b) > 0 {
			dst = append(dst, b)
		}
		max -= uint64(len(b))
		seg++
		off = 0
	}
	return dst
}

// PeekReadable returns up to max readable bytes at the read cursor as
// segments appended to dst, without moving the cursor (commit with
// SkipRead). Used for zero-copy writes from guest memory to a file.
func (c *Chain) PeekReadable(dst [][]byte, max uint64) [][]byte {
	seg, off := c.rdSeg, c.rdOff
	for max > 0 && seg < len(c.rd) {
		b := c.rd[seg][off:]
		if uint64(len(b)) > max {
			b = b[:max]
		}
		if len(b) > 0 {
			dst = append(dst, b)
		}
		max -= uint64(len(b))
		seg++
		off = 0
	}
	return dst
}
