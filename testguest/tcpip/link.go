// Package tcpip is the test driver's network endpoint: just enough
// Ethernet, ARP, IPv4, DHCP and TCP to take an address from passt and run
// a TCP stream through it, over any frame link. The same load can go
// through a virtio-net device (testguest.Net, the tx and rx queues of a
// vhost-user back-end such as krun-plugin-net-passt) or straight to passt
// over its socket (PasstLink), so the two can be compared.
//
// It is a driver for tests and benchmarks, not a general stack: one
// connection at a time, in-order delivery only (out-of-order segments are
// dropped and acknowledged again), go-back-N retransmission, and no
// congestion control beyond a fixed window.
package tcpip

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
)

// Link carries Ethernet frames. WriteFrame may queue; Flush sends what is
// queued. ReadFrame blocks for the next frame. One goroutine may read
// while another writes.
type Link interface {
	WriteFrame(frame []byte) error
	Flush() error
	ReadFrame(buf []byte) (int, error)
}

// PasstLink is a Link over a stream connected to passt (passt --fd, or its
// unix socket), in passt's framing: a 32-bit big-endian length, then the
// frame.
//
// Frames are gathered and written whole, up to 256 KiB per write, as the
// virtio-net device writes them: a write never ends inside a frame.
type PasstLink struct {
	c  net.Conn
	w  []byte
	r  *bufio.Reader
	rh [4]byte
}

const passtWriteBatch = 256 << 10

// NewPasstLink frames over c.
func NewPasstLink(c net.Conn) *PasstLink {
	return &PasstLink{c: c, w: make([]byte, 0, passtWriteBatch+4+MaxFrame), r: bufio.NewReaderSize(c, 256<<10)}
}

// WriteFrame buffers one frame.
func (l *PasstLink) WriteFrame(frame []byte) error {
	if len(frame) > MaxFrame {
		return fmt.Errorf("%d-byte frame, longer than %d", len(frame), MaxFrame)
	}
	l.w = binary.BigEndian.AppendUint32(l.w, uint32(len(frame)))
	l.w = append(l.w, frame...)
	if len(l.w) >= passtWriteBatch {
		return l.Flush()
	}
	return nil
}

// Flush writes the buffered frames to passt.
func (l *PasstLink) Flush() error {
	if len(l.w) == 0 {
		return nil
	}
	_, err := l.c.Write(l.w)
	l.w = l.w[:0]
	return err
}

// ReadFrame reads one frame into buf.
func (l *PasstLink) ReadFrame(buf []byte) (int, error) {
	if _, err := io.ReadFull(l.r, l.rh[:]); err != nil {
		return 0, err
	}
	n := int(binary.BigEndian.Uint32(l.rh[:]))
	if n > len(buf) {
		// Skip it, keeping the stream in step, and report it.
		if _, err := l.r.Discard(n); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("passt sent a %d-byte frame, longer than %d", n, len(buf))
	}
	if _, err := io.ReadFull(l.r, buf[:n]); err != nil {
		return 0, err
	}
	return n, nil
}

// Close closes the connection.
func (l *PasstLink) Close() error { return l.c.Close() }
