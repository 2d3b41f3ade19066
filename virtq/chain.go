package virtq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/krun-core/krun-core/guestmem"
)

// Chain is one descriptor chain taken from a queue: device-readable buffers
// followed by device-writable ones, read and written through two cursors.
//
// Pop checks the whole chain once (every index, every buffer against guest
// memory, the order of readable and writable descriptors, at most the
// queue's chain bound of buffers (Config.MaxChain), one level of
// indirection) and records only its totals and where its writable part
// starts; it stores no buffer. The cursors then walk
// the descriptors lazily, as the device reads and writes, and check each
// descriptor again when they reach it: the guest may rewrite a chain it has
// made available, and what the device uses is always what it checked at
// that moment. A chain the guest changed under the device ends early (its
// cursor reports a malformed chain); it never reaches outside guest memory
// or beyond the totals Pop reported. So a Chain holds a fixed amount of
// memory whatever the guest writes, and is reused across Pop calls without
// allocating.
//
// Its buffers are valid until the chain is pushed and at most until the
// queue's memory changes.
type Chain struct {
	// Head is the index of the chain's first descriptor, the id of its used
	// element.
	Head uint16

	q *Queue // memory, descriptor table, the most buffers a chain has, features

	rdLen, wrLen uint64
	slots        uint16 // entries of the queue's descriptor table it occupies
	bufs         uint16 // buffers, an indirect table's entries included
	rd, wr       cursor
	read         uint64 // bytes consumed by the read cursor
	written      uint64 // bytes produced by the write cursor
}

// pos is a place in a chain: a descriptor in the queue's table or in an
// indirect table, and how many buffers came before it.
type pos struct {
	table []byte // descriptor table holding the descriptor
	idx   uint   // its index in table
	bufs  uint   // buffer descriptors visited before it
	ind   uint   // 1: table is an indirect table
	end   uint   // 1: no descriptor here, the chain is over
}

// cursor walks one direction of a chain.
type cursor struct {
	at   pos    // the descriptor after buf
	buf  []byte // what is left of the current buffer
	left uint64 // bytes the cursor may still yield (Pop's total less those consumed)
	err  error  // the chain turned out malformed while walking
}

// reset starts the chain at head; check then sets everything else.
func (c *Chain) reset(q *Queue, head uint16) {
	c.Head = head
	if c.q != q {
		c.q = q
	}
	c.rdLen, c.wrLen = 0, 0
	c.read, c.written = 0, 0
}

// ErrNoSpace is returned by Write when the device-writable buffers are full.
var ErrNoSpace = errors.New("descriptor chain has no more device-writable space")

// errChanged is reported by a cursor that found the chain different from
// what Pop checked (the guest rewrote descriptors it had made available).
var errChanged = fmt.Errorf("%w: chain changed after it was made available", ErrMalformedChain)

// descriptor is one decoded descriptor.
type descriptor struct {
	addr   uint64
	length uint32
	flags  uint16
	next   uint16
}

func loadDesc(table []byte, idx uint) descriptor {
	d := table[idx*descSize : idx*descSize+descSize]
	return descriptor{
		addr:   binary.LittleEndian.Uint64(d[0:]),
		length: binary.LittleEndian.Uint32(d[8:]),
		flags:  binary.LittleEndian.Uint16(d[12:]),
		next:   binary.LittleEndian.Uint16(d[14:]),
	}
}

// step reads the descriptor at p. An indirect descriptor is followed into
// its table (whose first entry is then read). It returns the buffer
// descriptor found, its memory, and moves p to the descriptor after it (or
// marks the end). Every check of the chain's shape happens here, so Pop and
// the cursors apply the same rules.
func (c *Chain) step(p *pos) (descriptor, []byte, error) {
	d := loadDesc(p.table, p.idx)
	if d.flags&DescFIndirect != 0 {
		switch {
		case !c.q.cfg.Indirect:
			return d, nil, ErrIndirectNotNeg
		case p.ind != 0:
			return d, nil, ErrNestedIndirect
		case d.flags&DescFNext != 0:
			return d, nil, ErrIndirectWithNext
		case d.length == 0 || d.length%descSize != 0:
			return d, nil, ErrIndirectLen
		case d.length/descSize > uint32(c.q.maxChain):
			return d, nil, fmt.Errorf("%w: %d entries, at most %d on a queue of %d", ErrIndirectTooLong, d.length/descSize, c.q.maxChain, c.q.cfg.Size)
		}
		t, err := c.q.mem.Slice(guestmem.Addr(d.addr), uint64(d.length))
		if err != nil {
			return d, nil, fmt.Errorf("%w: indirect table %#x+%#x", ErrDescOutOfMemory, d.addr, d.length)
		}
		*p = pos{table: t, idx: 0, bufs: p.bufs, ind: 1}
		d = loadDesc(p.table, 0)
		if d.flags&DescFIndirect != 0 {
			return d, nil, ErrNestedIndirect
		}
	}
	if p.bufs >= c.q.maxChain {
		return d, nil, ErrChainTooLong
	}
	buf, err := c.q.mem.Slice(guestmem.Addr(d.addr), uint64(d.length))
	if err != nil {
		return d, nil, fmt.Errorf("%w: descriptor %d buffer %#x+%#x", ErrDescOutOfMemory, p.idx, d.addr, d.length)
	}
	p.bufs++
	if d.flags&DescFNext == 0 {
		p.end = 1
		return d, buf, nil
	}
	tableLen := uint(len(p.table) / descSize)
	if uint(d.next) >= tableLen {
		return d, nil, fmt.Errorf("%w: next %d in a table of %d", ErrDescIndex, d.next, tableLen)
	}
	p.idx = uint(d.next)
	return d, buf, nil
}

// check walks the whole chain starting at head once: it validates it,
// records the readable and writable totals, and positions both cursors
// after the first buffer of their direction, which they keep (so the
// common short chain is not walked twice).
func (c *Chain) check(head uint16) error {
	p := pos{table: c.q.desc, idx: uint(head)}
	c.rd.left, c.wr.left = 0, 0
	c.rd.buf, c.wr.buf = nil, nil
	c.rd.err, c.wr.err = nil, nil
	c.wr.at.end = 1 // no writable part unless one is found
	seenRead, seenWrite := false, false
	c.slots = 0
	for p.end == 0 {
		if p.ind == 0 {
			c.slots++ // an indirect chain holds only its head in the table
		}
		d, buf, err := c.step(&p)
		if err != nil {
			return err
		}
		if d.flags&DescFWrite != 0 {
			if !seenWrite {
				seenWrite = true
				c.wr.at, c.wr.buf = p, buf
			}
			c.wrLen += uint64(d.length)
		} else {
			if seenWrite {
				return ErrReadAfterWrite
			}
			if !seenRead {
				seenRead = true
				c.rd.at, c.rd.buf = p, buf
			}
			c.rdLen += uint64(d.length)
		}
	}
	c.rd.left, c.wr.left = c.rdLen, c.wrLen
	c.bufs = uint16(p.bufs) // at most maxChain, which fits
	return nil
}

// advance makes cur.buf non-empty (loading the next buffer of the cursor's
// direction) unless the cursor is exhausted; it reports whether bytes are
// available. write selects the direction.
func (c *Chain) advance(cur *cursor, write bool) bool {
	for len(cur.buf) == 0 {
		if cur.left == 0 || cur.err != nil {
			return false
		}
		if cur.at.end != 0 {
			cur.err = errChanged
			return false
		}
		d, buf, err := c.step(&cur.at)
		if err != nil {
			cur.err = err
			return false
		}
		isWrite := d.flags&DescFWrite != 0
		if isWrite != write {
			if !write {
				// The readable part ended before the total Pop saw.
				cur.err = errChanged
			} else {
				cur.err = ErrReadAfterWrite
			}
			return false
		}
		if uint64(len(buf)) > cur.left {
			buf = buf[:cur.left]
		}
		cur.buf = buf
	}
	return true
}

// consume moves the cursor n bytes into its current buffer.
func (cur *cursor) consume(n int) {
	cur.buf = cur.buf[n:]
	cur.left -= uint64(n)
}

// Slots is how many entries of the queue's descriptor table the chain
// occupies (1 for an indirect chain): the driver cannot make more buffers
// available while chains the device holds occupy all of them.
func (c *Chain) Slots() int { return int(c.slots) }

// ReadableLen is the total length of the device-readable buffers.
func (c *Chain) ReadableLen() uint64 { return c.rdLen }

// WritableLen is the total length of the device-writable buffers.
func (c *Chain) WritableLen() uint64 { return c.wrLen }

// Buffers is how many buffers the last Pop without error found in the
// chain, an indirect table's entries included (at most the queue's chain
// bound).
func (c *Chain) Buffers() int { return int(c.bufs) }

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

// Err reports why a cursor stopped early: the chain turned out malformed
// (an error wrapping ErrMalformedChain) while the device walked it. It is
// nil while the chain is as Pop checked it.
func (c *Chain) Err() error {
	if c.rd.err != nil {
		return c.rd.err
	}
	return c.wr.err
}

// Read copies readable bytes at the read cursor into p (io.Reader). At the
// end of the readable bytes it returns io.EOF; if the chain turned out
// malformed, the error says so.
func (c *Chain) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.advance(&c.rd, false) {
		k := copy(p[n:], c.rd.buf)
		c.rd.consume(k)
		n += k
	}
	c.read += uint64(n)
	if n < len(p) && c.rd.err != nil {
		return n, c.rd.err
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

// ReadFull fills p from the readable bytes or fails with io.ErrUnexpectedEOF
// (io.EOF when nothing was left, or the malformed-chain error).
func (c *Chain) ReadFull(p []byte) error {
	_, err := io.ReadFull(c, p)
	return err
}

// Write copies p into the writable buffers at the write cursor (io.Writer).
// When the buffers fill up it returns the count written and ErrNoSpace (or
// the malformed-chain error, if that is why).
func (c *Chain) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.advance(&c.wr, true) {
		k := copy(c.wr.buf, p[n:])
		c.wr.consume(k)
		n += k
	}
	c.written += uint64(n)
	if n < len(p) {
		if c.wr.err != nil {
			return n, c.wr.err
		}
		return n, ErrNoSpace
	}
	return n, nil
}

// skip moves cur n bytes on; it reports how many it could.
func (c *Chain) skip(cur *cursor, write bool, n uint64) uint64 {
	done := uint64(0)
	for done < n && c.advance(cur, write) {
		k := min(uint64(len(cur.buf)), n-done)
		cur.consume(int(k))
		done += k
	}
	return done
}

// SkipRead advances the read cursor by n bytes.
func (c *Chain) SkipRead(n uint64) error {
	if n > c.RemainingRead() {
		return io.ErrUnexpectedEOF
	}
	done := c.skip(&c.rd, false, n)
	c.read += done
	if done < n {
		return c.rd.err
	}
	return nil
}

// SkipWrite advances the write cursor by n bytes, counting them as written
// (for data the device placed directly into buffers from PeekWritable).
func (c *Chain) SkipWrite(n uint64) error {
	if n > c.RemainingWrite() {
		return ErrNoSpace
	}
	done := c.skip(&c.wr, true, n)
	c.written += done
	if done < n {
		return c.wr.err
	}
	return nil
}

// peek appends views of up to max bytes at cur to dst without moving cur.
// A chain found malformed on the way stays so: the error is kept on cur,
// for Err and for every later use of the cursor.
func (c *Chain) peek(cur *cursor, write bool, dst [][]byte, max uint64) [][]byte {
	look := *cur
	for max > 0 && c.advance(&look, write) {
		b := look.buf
		if uint64(len(b)) > max {
			b = b[:max]
		}
		dst = append(dst, b)
		look.consume(len(b))
		max -= uint64(len(b))
	}
	if look.err != nil && cur.err == nil {
		cur.err = look.err
	}
	return dst
}

// PeekWritable returns up to max bytes of writable space at the write cursor
// as segments appended to dst, without moving the cursor (commit with
// SkipWrite). Used for zero-copy reads from a file into guest memory. It
// returns fewer bytes than asked when the chain has fewer (or turned out
// malformed: see Err); it never returns empty segments.
func (c *Chain) PeekWritable(dst [][]byte, max uint64) [][]byte {
	return c.peek(&c.wr, true, dst, max)
}

// PeekReadable returns up to max readable bytes at the read cursor as
// segments appended to dst, without moving the cursor (commit with
// SkipRead). Used for zero-copy writes from guest memory to a file.
func (c *Chain) PeekReadable(dst [][]byte, max uint64) [][]byte {
	return c.peek(&c.rd, false, dst, max)
}
