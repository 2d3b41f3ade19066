package tcpip

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"
)

// MaxFrame is the longest frame the endpoint receives: passt's largest MTU
// plus the Ethernet header and a VLAN tag.
const MaxFrame = 65520 + ethLen + 4

// Endpoint is one network interface on a Link.
type Endpoint struct {
	link Link
	mac  [6]byte

	// Set by DHCP.
	addr, gateway [4]byte
	gatewayMAC    [6]byte

	frames chan []byte // received frames, in order
	free   chan []byte // spare receive buffers
	readMu sync.Mutex
	rerr   error // why the reader stopped; valid once frames is closed
	ipID   uint16
	out    []byte // frame being built
}

// New starts an endpoint with hardware address mac on link. It reads the
// link until ReadFrame fails (close the link to stop it).
func New(link Link, mac [6]byte) *Endpoint {
	e := &Endpoint{
		link:   link,
		mac:    mac,
		frames: make(chan []byte, 1024),
		free:   make(chan []byte, 1024),
		out:    make([]byte, MaxFrame),
	}
	go e.read()
	return e
}

func (e *Endpoint) read() {
	defer close(e.frames)
	for {
		var b []byte
		select {
		case b = <-e.free:
		default:
			b = make([]byte, MaxFrame)
		}
		n, err := e.link.ReadFrame(b)
		if err != nil {
			e.readMu.Lock()
			e.rerr = err
			e.readMu.Unlock()
			return
		}
		e.frames <- b[:n]
	}
}

func (e *Endpoint) recycle(b []byte) {
	select {
	case e.free <- b[:cap(b)]:
	default:
	}
}

// next waits for a frame until ctx is done or the timer t fires (nil: no
// timer). It returns nil on a timer tick.
func (e *Endpoint) next(ctx context.Context, t <-chan time.Time) ([]byte, error) {
	select {
	case b, ok := <-e.frames:
		if !ok {
			e.readMu.Lock()
			defer e.readMu.Unlock()
			return nil, fmt.Errorf("link: %w", e.rerr)
		}
		return b, nil
	case <-t:
		return nil, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// answerARP replies to an ARP request for the endpoint's address. It
// reports whether frame was ARP.
func (e *Endpoint) answerARP(frame []byte) (bool, error) {
	if len(frame) < ethLen+arpLen || binary.BigEndian.Uint16(frame[12:]) != etherARP {
		return false, nil
	}
	a := frame[ethLen:]
	if binary.BigEndian.Uint16(a[0:]) != 1 || binary.BigEndian.Uint16(a[2:]) != etherIP4 ||
		a[4] != 6 || a[5] != 4 || binary.BigEndian.Uint16(a[6:]) != 1 ||
		[4]byte(a[24:28]) != e.addr || e.addr == [4]byte{} {
		return true, nil
	}
	var sha [6]byte
	copy(sha[:], a[8:14])
	b := e.out[:ethLen+arpLen]
	putEth(b, sha, e.mac, etherARP)
	r := b[ethLen:]
	binary.BigEndian.PutUint16(r[0:], 1)
	binary.BigEndian.PutUint16(r[2:], etherIP4)
	r[4], r[5] = 6, 4
	binary.BigEndian.PutUint16(r[6:], 2) // reply
	copy(r[8:14], e.mac[:])
	copy(r[14:18], e.addr[:])
	copy(r[18:28], a[8:18]) // the asker's hardware and protocol address
	if err := e.link.WriteFrame(b); err != nil {
		return true, err
	}
	return true, e.link.Flush()
}

// Lease is what DHCP configured.
type Lease struct {
	Addr, Gateway netip.Addr
	Server        netip.Addr
	GatewayMAC    [6]byte
}

// DHCP configures the endpoint from a DHCP server on the link (passt's):
// DISCOVER, OFFER, REQUEST, ACK. The gateway's hardware address is the
// server's. Each step is retried once a second until ctx is done.
func (e *Endpoint) DHCP(ctx context.Context) (Lease, error) {
	xid := rand.Uint32()
	var l Lease
	var offered, server [4]byte
	for step := 0; step < 2; step++ {
		msgType := byte(1) // DISCOVER
		want := byte(2)    // OFFER
		if step == 1 {
			msgType, want = 3, 5 // REQUEST, ACK
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		sent := false
		for done := false; !done; {
			if !sent {
				if err := e.sendDHCP(xid, msgType, offered, server); err != nil {
					return l, fmt.Errorf("dhcp: %w", err)
				}
				sent = true
			}
			f, err := e.next(ctx, tick.C)
			if err != nil {
				return l, fmt.Errorf("dhcp: no answer: %w", err)
			}
			if f == nil {
				sent = false // resend
				continue
			}
			m, ok := parseDHCPReply(f, xid, e.mac)
			if ok && m.msgType == want {
				offered, server = m.yiaddr, m.server
				if step == 1 {
					e.addr, e.gateway = m.yiaddr, m.router
					copy(e.gatewayMAC[:], f[6:12])
					l = Lease{Addr: netip.AddrFrom4(m.yiaddr), Gateway: netip.AddrFrom4(m.router),
						Server: netip.AddrFrom4(m.server), GatewayMAC: e.gatewayMAC}
				}
				done = true
			} else if ok && m.msgType == 6 { // NAK
				return l, errors.New("dhcp: the server refused the request (NAK)")
			}
			e.recycle(f)
		}
	}
	if l.Gateway == netip.AddrFrom4([4]byte{}) {
		return l, errors.New("dhcp: the lease names no router")
	}
	return l, nil
}

const (
	bootpLen    = 236
	dhcpCookie  = 0x63825363
	dhcpMaxOpts = 64
)

func (e *Endpoint) sendDHCP(xid uint32, msgType byte, requested, server [4]byte) error {
	opts := []byte{53, 1, msgType}
	if msgType == 3 {
		opts = append(opts, 50, 4)
		opts = append(opts, requested[:]...)
		opts = append(opts, 54, 4)
		opts = append(opts, server[:]...)
	}
	opts = append(opts, 55, 3, 1, 3, 54, 255)
	n := udpLen + bootpLen + 4 + len(opts)
	b := e.out[:ethLen+ipv4Len+n]
	clear(b)
	putEth(b, broadcastMAC, e.mac, etherIP4)
	putIPv4(b[ethLen:], [4]byte{}, [4]byte{255, 255, 255, 255}, protoUDP, n, 0)
	u := b[ethLen+ipv4Len:]
	binary.BigEndian.PutUint16(u[0:], 68)
	binary.BigEndian.PutUint16(u[2:], 67)
	binary.BigEndian.PutUint16(u[4:], uint16(n))
	m := u[udpLen:]
	m[0], m[1], m[2] = 1, 1, 6 // BOOTREQUEST, Ethernet, 6-byte address
	binary.BigEndian.PutUint32(m[4:], xid)
	binary.BigEndian.PutUint16(m[10:], 0x8000) // broadcast the reply
	copy(m[28:34], e.mac[:])
	binary.BigEndian.PutUint32(m[bootpLen:], dhcpCookie)
	copy(m[bootpLen+4:], opts)
	if err := e.link.WriteFrame(b); err != nil {
		return err
	}
	return e.link.Flush()
}

type dhcpReply struct {
	msgType                byte
	yiaddr, server, router [4]byte
}

// parseDHCPReply parses a BOOTREPLY for xid and mac.
func parseDHCPReply(frame []byte, xid uint32, mac [6]byte) (dhcpReply, bool) {
	var r dhcpReply
	p, ok := parseIPv4(frame)
	if !ok || p.proto != protoUDP || len(p.payload) < udpLen+bootpLen+4 {
		return r, false
	}
	u := p.payload
	if binary.BigEndian.Uint16(u[0:]) != 67 || binary.BigEndian.Uint16(u[2:]) != 68 {
		return r, false
	}
	ulen := int(binary.BigEndian.Uint16(u[4:]))
	if ulen < udpLen+bootpLen+4 || ulen > len(u) {
		return r, false
	}
	m := u[udpLen:ulen]
	if m[0] != 2 || binary.BigEndian.Uint32(m[4:]) != xid || [6]byte(m[28:34]) != mac ||
		binary.BigEndian.Uint32(m[bootpLen:]) != dhcpCookie {
		return r, false
	}
	copy(r.yiaddr[:], m[16:20])
	opts := m[bootpLen+4:]
	for i := 0; len(opts) > 0 && i < dhcpMaxOpts; i++ {
		code := opts[0]
		if code == 255 {
			break
		}
		if code == 0 {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 || len(opts) < 2+int(opts[1]) {
			return r, false
		}
		v := opts[2 : 2+opts[1]]
		switch {
		case code == 53 && len(v) == 1:
			r.msgType = v[0]
		case code == 54 && len(v) == 4:
			copy(r.server[:], v)
		case code == 3 && len(v) >= 4:
			copy(r.router[:], v[:4])
		}
		opts = opts[2+len(v):]
	}
	return r, r.msgType != 0
}
