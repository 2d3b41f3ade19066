package fuseclient

import (
	"errors"
	"io"
)

// MemChain is an in-memory descriptor chain with the cursor methods of
// virtq.Chain, for driving a server without guest memory.
type MemChain struct {
	rd, wr       [][]byte
	rdSeg, rdOff int
	wrSeg, wrOff int
	read, wrote  uint64
	rdLen, wrLen uint64
}

// NewMemChain builds a chain over the given readable and writable buffers.
func NewMemChain(rd, wr [][]byte) *MemChain {
	c := &MemChain{rd: rd, wr: wr}
	for _, b := range rd {
		c.rdLen += uint64(len(b))
	}
	for _, b := range wr {
		c.wrLen += uint64(len(b))
	}
	return c
}

var errNoSpace = errors.New("memchain: no writable space")

// Read implements io.Reader over the readable buffers.
func (c *MemChain) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.rdSeg < len(c.rd) {
		k := copy(p[n:], c.rd[c.rdSeg][c.rdOff:])
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

// Write implements io.Writer over the writable buffers.
func (c *MemChain) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) && c.wrSeg < len(c.wr) {
		k := copy(c.wr[c.wrSeg][c.wrOff:], p[n:])
		n += k
		c.wrOff += k
		if c.wrOff == len(c.wr[c.wrSeg]) {
			c.wrSeg++
			c.wrOff = 0
		}
	}
	c.wrote += uint64(n)
	if n < len(p) {
		return n, errNoSpace
	}
	return n, nil
}

// RemainingRead is the unread readable byte count.
func (c *MemChain) RemainingRead() uint64 { return c.rdLen - c.read }

// RemainingWrite is the unwritten writable byte count.
func (c *MemChain) RemainingWrite() uint64 { return c.wrLen - c.wrote }

// Written is the byte count written so far.
func (c *MemChain) Written() uint32 { return uint32(c.wrote) }

func peek(bufs [][]byte, seg, off int, max uint64, dst [][]byte) [][]byte {
	for max > 0 && seg < len(bufs) {
		b := bufs[seg][off:]
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

// PeekReadable returns up to max readable bytes without consuming them.
func (c *MemChain) PeekReadable(dst [][]byte, max uint64) [][]byte {
	return peek(c.rd, c.rdSeg, c.rdOff, max, dst)
}

// PeekWritable returns up to max writable bytes without consuming them.
func (c *MemChain) PeekWritable(dst [][]byte, max uint64) [][]byte {
	return peek(c.wr, c.wrSeg, c.wrOff, max, dst)
}

func skip(bufs [][]byte, seg, off *int, n uint64) {
	for n > 0 && *seg < len(bufs) {
		left := uint64(len(bufs[*seg]) - *off)
		if n < left {
			*off += int(n)
			return
		}
		n -= left
		*seg++
		*off = 0
	}
}

// SkipRead consumes n readable bytes.
func (c *MemChain) SkipRead(n uint64) error {
	if n > c.RemainingRead() {
		return io.ErrUnexpectedEOF
	}
	skip(c.rd, &c.rdSeg, &c.rdOff, n)
	c.read += n
	return nil
}

// SkipWrite marks n writable bytes as written.
func (c *MemChain) SkipWrite(n uint64) error {
	if n > c.RemainingWrite() {
		return errNoSpace
	}
	skip(c.wr, &c.wrSeg, &c.wrOff, n)
	c.wrote += n
	return nil
}

// Local is a Transport that hands each request to Handle as a MemChain.
// Split > 0 cuts every buffer, readable and writable, into pieces of at
// most Split bytes, as a guest with scattered pages would.
type Local struct {
	Handle func(*MemChain) uint32
	Split  int
}

func split(bufs [][]byte, n int) [][]byte {
	if n <= 0 {
		return bufs
	}
	var out [][]byte
	for _, b := range bufs {
		for len(b) > n {
			out = append(out, b[:n:n])
			b = b[n:]
		}
		if len(b) > 0 {
			out = append(out, b)
		}
	}
	return out
}

// RoundTrip implements Transport.
func (l *Local) RoundTrip(req [][]byte, replyCap int) ([]byte, error) {
	reply := make([]byte, replyCap)
	var wr [][]byte
	if replyCap > 0 {
		wr = split([][]byte{reply}, l.Split)
	}
	c := NewMemChain(split(req, l.Split), wr)
	n := l.Handle(c)
	if int(n) > replyCap {
		return nil, errors.New("memchain: server reports more bytes than the buffer holds")
	}
	return reply[:n], nil
}
