package tcpip

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"
)

// EchoOptions configure Echo. Zero values pick defaults.
type EchoOptions struct {
	Bytes int64 // length of the stream sent and expected back (default 16 MiB)
	// MSS is the largest segment payload announced and sent (default
	// 1460, an Ethernet MTU; passt's own MTU allows up to 65480).
	MSS int
	// Window is the receive window announced and the cap on unacknowledged
	// bytes sent (default 1 MiB).
	Window int
	RTO    time.Duration // retransmission timeout (default 200 ms)
	// Stall fails the run when nothing is acknowledged or received for
	// this long (default 15 s).
	Stall time.Duration
}

func (o *EchoOptions) defaults() {
	if o.Bytes == 0 {
		o.Bytes = 16 << 20
	}
	if o.MSS == 0 {
		o.MSS = 1460
	}
	if o.Window == 0 {
		o.Window = 1 << 20
	}
	if o.RTO == 0 {
		o.RTO = 200 * time.Millisecond
	}
	if o.Stall == 0 {
		o.Stall = 15 * time.Second
	}
}

// EchoResult is what one Echo run measured. Frames are those of the
// connection after the handshake, in each direction.
type EchoResult struct {
	Bytes       int64         // bytes sent, echoed back and checked
	Elapsed     time.Duration // from the handshake to the last echoed byte
	TxFrames    uint64
	RxFrames    uint64
	TxSegments  uint64 // data segments sent, retransmissions included
	Retransmits uint64 // data segments sent again
	OutOfOrder  uint64 // received segments beyond the next expected byte (dropped)
	Duplicates  uint64 // received segments holding only bytes already received
}

// FramesPerSecond counts frames in both directions.
func (r EchoResult) FramesPerSecond() float64 {
	return float64(r.TxFrames+r.RxFrames) / r.Elapsed.Seconds()
}

// MiBPerSecond is the stream's rate in each direction.
func (r EchoResult) MiBPerSecond() float64 {
	return float64(r.Bytes) / (1 << 20) / r.Elapsed.Seconds()
}

const (
	patternPeriod = 65521 // prime: no segment size lines up with it
	ourWScale     = 7
	maxMSS        = 65480
)

// pattern is the stream's content: byte i is pattern[i%patternPeriod], and
// the table runs maxMSS bytes past the period so any segment is one slice.
type pattern []byte

func newPattern(seed uint64) pattern {
	p := make([]byte, patternPeriod+maxMSS)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(p[:patternPeriod])
	copy(p[patternPeriod:], p[:maxMSS])
	return p
}

// at returns the n stream bytes at offset off (n <= maxMSS).
func (p pattern) at(off int64, n int) []byte {
	i := int(off % patternPeriod)
	return p[i : i+n]
}

// check reports whether b is the stream at offset off.
func (p pattern) check(off int64, b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), maxMSS)
		if !bytes.Equal(b[:n], p.at(off, n)) {
			return false
		}
		off += int64(n)
		b = b[n:]
	}
	return true
}

// ServeEcho is the far end of Echo: it writes back whatever each connection
// accepted on l sends, until l is closed.
func ServeEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

// conn is the state of Echo's one connection.
type conn struct {
	e            *Endpoint
	o            EchoOptions
	dst          [4]byte
	sport, dport uint16
	iss, irs     uint32
	peerWScale   int
	peerMSS      int

	sent, maxSent, acked int64 // stream offsets: next to send, highest sent, acknowledged
	received             int64 // echoed bytes received in order
	peerWnd              int64 // the peer's window, scaled
	lastAckSent          int64 // received at the last ACK we sent
	res                  EchoResult
}

func (c *conn) sndSeq(off int64) uint32 { return c.iss + 1 + uint32(off) }
func (c *conn) rcvSeq(off int64) uint32 { return c.irs + 1 + uint32(off) }

// Echo opens a TCP connection to dst through the gateway (DHCP first),
// sends o.Bytes of a pseudo-random stream, and reads them back from an
// echo server at dst, checking every byte. It ends the connection with a
// reset, never a FIN: Debian 12's passt mishandles half-closed connections.
func (e *Endpoint) Echo(ctx context.Context, dst netip.AddrPort, o EchoOptions) (EchoResult, error) {
	o.defaults()
	if o.MSS < 64 || o.MSS > maxMSS {
		return EchoResult{}, fmt.Errorf("tcp: MSS %d outside [64, %d]", o.MSS, maxMSS)
	}
	if o.Window < o.MSS || o.Window > 65535<<ourWScale {
		return EchoResult{}, fmt.Errorf("tcp: window %d outside [MSS, %d]", o.Window, 65535<<ourWScale)
	}
	if e.addr == [4]byte{} {
		return EchoResult{}, errors.New("tcp: no address (run DHCP first)")
	}
	if !dst.Addr().Is4() {
		return EchoResult{}, fmt.Errorf("tcp: %s is not IPv4", dst)
	}
	c := &conn{e: e, o: o, dst: addr4(dst.Addr()), dport: dst.Port(),
		sport: uint16(49152 + rand.N(16384)), iss: rand.Uint32()}
	if err := c.handshake(ctx); err != nil {
		return c.res, err
	}
	err := c.transfer(ctx, newPattern(uint64(c.iss)))
	c.send(flagRST|flagACK, c.sent, nil)
	e.link.Flush()
	return c.res, err
}

// handshake sends SYN until a SYN-ACK arrives (one try a second), then ACK.
func (c *conn) handshake(ctx context.Context) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if err := c.sendSYN(); err != nil {
			return err
		}
		for {
			f, err := c.e.next(ctx, tick.C)
			if err != nil {
				return fmt.Errorf("tcp: connect to %v:%d: %w", c.dst, c.dport, err)
			}
			if f == nil {
				break // resend SYN
			}
			s, ok := c.segment(f)
			if !ok {
				c.e.recycle(f)
				continue
			}
			c.e.recycle(f)
			if s.flags&flagRST != 0 {
				return fmt.Errorf("tcp: connection to %v:%d refused", c.dst, c.dport)
			}
			if s.flags&(flagSYN|flagACK) != flagSYN|flagACK || s.ack != c.iss+1 {
				continue
			}
			c.irs = s.seq
			c.peerMSS = c.o.MSS
			if s.mss != 0 {
				c.peerMSS = min(c.peerMSS, int(s.mss))
			}
			if s.wscale >= 0 {
				c.peerWScale = s.wscale
			}
			c.peerWnd = int64(s.window) // not scaled in a SYN
			if err := c.send(flagACK, 0, nil); err != nil {
				return err
			}
			return c.e.link.Flush()
		}
	}
}

// segment parses f as a TCP segment of this connection, answering ARP on
// the way. It reports false for any other frame.
func (c *conn) segment(f []byte) (tcpSegment, bool) {
	if arp, err := c.e.answerARP(f); arp || err != nil {
		return tcpSegment{}, false
	}
	p, ok := parseIPv4(f)
	if !ok || p.proto != protoTCP || p.src != c.dst || p.dst != c.e.addr {
		return tcpSegment{}, false
	}
	s, ok := parseTCP(p.payload)
	if !ok || s.srcPort != c.dport || s.dstPort != c.sport {
		return tcpSegment{}, false
	}
	return s, true
}

// transfer runs the stream until every byte is acknowledged and echoed.
func (c *conn) transfer(ctx context.Context, pat pattern) error {
	start := time.Now()
	lastProgress := start
	rto := time.NewTicker(c.o.RTO / 4)
	defer rto.Stop()
	lastAckAt := start
	for c.acked < c.o.Bytes || c.received < c.o.Bytes {
		// Wait for a frame or a tick, then take what else is queued.
		f, err := c.e.next(ctx, rto.C)
		if err != nil {
			return c.fail(err)
		}
		progress := false
		for f != nil {
			p, err := c.handle(f, pat)
			c.e.recycle(f)
			if err != nil {
				return c.fail(err)
			}
			progress = progress || p
			f = nil
			select {
			case b, ok := <-c.e.frames:
				if ok {
					f = b
				}
			default:
			}
		}
		now := time.Now()
		if progress {
			lastProgress, lastAckAt = now, now
		} else if c.sent > c.acked && now.Sub(lastAckAt) >= c.o.RTO {
			// Go back N: resend everything not yet acknowledged.
			c.res.Retransmits += uint64((c.sent - c.acked + int64(c.peerMSS) - 1) / int64(c.peerMSS))
			c.sent = c.acked
			lastAckAt = now
		}
		if now.Sub(lastProgress) > c.o.Stall {
			return c.fail(fmt.Errorf("stalled for %v", c.o.Stall))
		}
		if err := c.push(pat); err != nil {
			return c.fail(err)
		}
	}
	c.res.Bytes = c.o.Bytes
	c.res.Elapsed = time.Since(start)
	return nil
}

func (c *conn) fail(err error) error {
	return fmt.Errorf("tcp: sent %d, acknowledged %d, echoed %d of %d bytes: %w", c.maxSent, c.acked, c.received, c.o.Bytes, err)
}

// handle processes one frame; it reports whether the connection advanced.
func (c *conn) handle(f []byte, pat pattern) (bool, error) {
	s, ok := c.segment(f)
	if !ok {
		return false, nil
	}
	c.res.RxFrames++
	if s.flags&flagRST != 0 {
		return false, errors.New("connection reset by the peer")
	}
	if s.flags&flagSYN != 0 {
		return false, nil // a repeated SYN-ACK: our ACK answers it below
	}
	progress := false
	if s.flags&flagACK != 0 {
		d := int64(int32(s.ack - c.sndSeq(c.acked)))
		if d > 0 && c.acked+d <= c.maxSent {
			c.acked += d
			progress = true
			if c.sent < c.acked {
				c.sent = c.acked
			}
		}
		c.peerWnd = int64(s.window) << c.peerWScale
	}
	if n := len(s.payload); n > 0 {
		d := int64(int32(s.seq - c.rcvSeq(c.received)))
		switch {
		case d <= 0 && d+int64(n) > 0:
			data := s.payload[-d:]
			if c.received+int64(len(data)) > c.o.Bytes {
				return false, fmt.Errorf("the peer sent %d bytes past the stream's end", c.received+int64(len(data))-c.o.Bytes)
			}
			if !pat.check(c.received, data) {
				return false, fmt.Errorf("echoed bytes at offset %d differ from what was sent", c.received)
			}
			c.received += int64(len(data))
			progress = true
		case d > 0:
			c.res.OutOfOrder++
			c.lastAckSent = -1 // acknowledge again
		default:
			c.res.Duplicates++
			c.lastAckSent = -1
		}
	}
	if s.flags&flagFIN != 0 && c.received < c.o.Bytes {
		return false, fmt.Errorf("the peer closed after %d echoed bytes", c.received)
	}
	return progress, nil
}

// push sends what the windows allow, then an ACK if data arrived and no
// data segment carried it, then flushes the link.
func (c *conn) push(pat pattern) error {
	limit := c.acked + min(c.peerWnd, int64(c.o.Window))
	limit = min(limit, c.o.Bytes)
	sentData := false
	for c.sent < limit {
		n := int(min(int64(c.peerMSS), limit-c.sent))
		if err := c.send(flagACK|flagPSH, c.sent, pat.at(c.sent, n)); err != nil {
			return err
		}
		c.res.TxSegments++
		c.sent += int64(n)
		c.maxSent = max(c.maxSent, c.sent)
		sentData = true
	}
	if !sentData && c.lastAckSent != c.received {
		if err := c.send(flagACK, c.sent, nil); err != nil {
			return err
		}
	}
	return c.e.link.Flush()
}

// send writes one segment at stream offset off carrying payload.
func (c *conn) send(flags byte, off int64, payload []byte) error {
	b := c.e.out[:ethLen+ipv4Len+tcpLen+len(payload)]
	putEth(b, c.e.gatewayMAC, c.e.mac, etherIP4)
	c.e.ipID++
	putIPv4(b[ethLen:], c.e.addr, c.dst, protoTCP, tcpLen+len(payload), c.e.ipID)
	t := b[ethLen+ipv4Len:]
	binary.BigEndian.PutUint16(t[0:], c.sport)
	binary.BigEndian.PutUint16(t[2:], c.dport)
	binary.BigEndian.PutUint32(t[4:], c.sndSeq(off))
	binary.BigEndian.PutUint32(t[8:], c.rcvSeq(c.received))
	t[12] = tcpLen / 4 << 4
	t[13] = flags
	binary.BigEndian.PutUint16(t[14:], uint16(min(c.o.Window>>ourWScale, 65535)))
	t[16], t[17], t[18], t[19] = 0, 0, 0, 0
	copy(t[tcpLen:], payload)
	sum := pseudoSum(c.e.addr, c.dst, protoTCP, len(t))
	binary.BigEndian.PutUint16(t[16:], fold(checksum(sum, t)))
	c.lastAckSent = c.received
	c.res.TxFrames++
	return c.e.link.WriteFrame(b)
}

// sendSYN sends the SYN with MSS and window scale options.
func (c *conn) sendSYN() error {
	const hl = tcpLen + 8
	b := c.e.out[:ethLen+ipv4Len+hl]
	putEth(b, c.e.gatewayMAC, c.e.mac, etherIP4)
	c.e.ipID++
	putIPv4(b[ethLen:], c.e.addr, c.dst, protoTCP, hl, c.e.ipID)
	t := b[ethLen+ipv4Len:]
	clear(t)
	binary.BigEndian.PutUint16(t[0:], c.sport)
	binary.BigEndian.PutUint16(t[2:], c.dport)
	binary.BigEndian.PutUint32(t[4:], c.iss)
	t[12] = hl / 4 << 4
	t[13] = flagSYN
	binary.BigEndian.PutUint16(t[14:], 65535)
	t[20], t[21] = 2, 4
	binary.BigEndian.PutUint16(t[22:], uint16(c.o.MSS))
	t[24], t[25], t[26], t[27] = 1, 3, 3, ourWScale
	sum := pseudoSum(c.e.addr, c.dst, protoTCP, hl)
	binary.BigEndian.PutUint16(t[16:], fold(checksum(sum, t)))
	if err := c.e.link.WriteFrame(b); err != nil {
		return err
	}
	return c.e.link.Flush()
}
