package main

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// DHCP (RFC 2131/2132) message types and option codes used here.
const (
	dhcpDiscover = 1
	dhcpOffer    = 2
	dhcpRequest  = 3
	dhcpAck      = 5
	dhcpNak      = 6

	optPad         = 0
	optSubnetMask  = 1
	optRouter      = 3
	optDNS         = 6
	optHostname    = 12
	optMTU         = 26
	optRequestedIP = 50
	optLeaseTime   = 51
	optMsgType     = 53
	optServerID    = 54
	optParamList   = 55
	optEnd         = 255

	dhcpFixedLen = 236 // op .. file
	dhcpMinLen   = dhcpFixedLen + 4
	dhcpMagic    = 0x63825363
	bootRequest  = 1
	bootReply    = 2
	clientPort   = 68
	serverPort   = 67
)

// dhcpMsg is a parsed DHCP reply.
type dhcpMsg struct {
	Op       uint8
	XID      uint32
	YourIP   netip.Addr
	Type     uint8
	Mask     netip.Addr // invalid if absent
	Routers  []netip.Addr
	DNS      []netip.Addr
	ServerID netip.Addr
	Lease    time.Duration
	MTU      int
}

var errNotForUs = errors.New("not a DHCP reply for this client")

// parseDHCP parses a BOOTP/DHCP message, checking every length against
// the buffer: the bytes come from the network.
func parseDHCP(b []byte) (*dhcpMsg, error) {
	if len(b) < dhcpMinLen {
		return nil, fmt.Errorf("dhcp: %d-byte message shorter than %d", len(b), dhcpMinLen)
	}
	if b[1] != 1 || b[2] != 6 {
		return nil, fmt.Errorf("dhcp: hardware type %d length %d, want Ethernet", b[1], b[2])
	}
	if binary.BigEndian.Uint32(b[dhcpFixedLen:]) != dhcpMagic {
		return nil, errors.New("dhcp: no magic cookie")
	}
	m := &dhcpMsg{Op: b[0], XID: binary.BigEndian.Uint32(b[4:])}
	m.YourIP = netip.AddrFrom4([4]byte(b[16:20]))
	opts := b[dhcpMinLen:]
	for i := 0; i < len(opts); {
		code := opts[i]
		if code == optPad {
			i++
			continue
		}
		if code == optEnd {
			break
		}
		if i+1 >= len(opts) {
			return nil, fmt.Errorf("dhcp: option %d without length", code)
		}
		l := int(opts[i+1])
		if i+2+l > len(opts) {
			return nil, fmt.Errorf("dhcp: option %d of %d bytes runs past the message", code, l)
		}
		v := opts[i+2 : i+2+l]
		i += 2 + l
		addrs := func() ([]netip.Addr, error) {
			if l == 0 || l%4 != 0 {
				return nil, fmt.Errorf("dhcp: option %d length %d is not a multiple of 4", code, l)
			}
			var out []netip.Addr
			for j := 0; j < l; j += 4 {
				out = append(out, netip.AddrFrom4([4]byte(v[j:j+4])))
			}
			return out, nil
		}
		var err error
		switch code {
		case optMsgType:
			if l != 1 {
				return nil, fmt.Errorf("dhcp: message type option of %d bytes", l)
			}
			m.Type = v[0]
		case optSubnetMask:
			if l != 4 {
				return nil, fmt.Errorf("dhcp: subnet mask option of %d bytes", l)
			}
			m.Mask = netip.AddrFrom4([4]byte(v))
		case optServerID:
			if l != 4 {
				return nil, fmt.Errorf("dhcp: server id option of %d bytes", l)
			}
			m.ServerID = netip.AddrFrom4([4]byte(v))
		case optRouter:
			m.Routers, err = addrs()
		case optDNS:
			m.DNS, err = addrs()
		case optLeaseTime:
			if l != 4 {
				return nil, fmt.Errorf("dhcp: lease time option of %d bytes", l)
			}
			m.Lease = time.Duration(binary.BigEndian.Uint32(v)) * time.Second
		case optMTU:
			if l != 2 {
				return nil, fmt.Errorf("dhcp: mtu option of %d bytes", l)
			}
			m.MTU = int(binary.BigEndian.Uint16(v))
		}
		if err != nil {
			return nil, err
		}
	}
	if m.Type == 0 {
		return nil, errors.New("dhcp: no message type (plain BOOTP)")
	}
	return m, nil
}

// prefix returns the leased address with the mask's length (/24 when the
// mask is absent or not contiguous).
func (m *dhcpMsg) prefix() netip.Prefix {
	bits := 24
	if m.Mask.IsValid() {
		mask := m.Mask.As4()
		ones, size := net.IPMask(mask[:]).Size()
		if size == 32 {
			bits = ones
		}
	}
	return netip.PrefixFrom(m.YourIP, bits)
}

// buildDHCP builds a client message.
func buildDHCP(typ uint8, xid uint32, mac net.HardwareAddr, requested, server netip.Addr) []byte {
	b := make([]byte, dhcpMinLen, 300)
	b[0], b[1], b[2] = bootRequest, 1, 6
	binary.BigEndian.PutUint32(b[4:], xid)
	binary.BigEndian.PutUint16(b[10:], 0x8000) // broadcast: we have no address yet
	copy(b[28:], mac)
	binary.BigEndian.PutUint32(b[dhcpFixedLen:], dhcpMagic)
	b = append(b, optMsgType, 1, typ)
	b = append(b, optParamList, 5, optSubnetMask, optRouter, optDNS, optLeaseTime, optMTU)
	if requested.IsValid() {
		a := requested.As4()
		b = append(b, optRequestedIP, 4)
		b = append(b, a[:]...)
	}
	if server.IsValid() {
		a := server.As4()
		b = append(b, optServerID, 4)
		b = append(b, a[:]...)
	}
	b = append(b, optEnd)
	for len(b) < 300 { // BOOTP minimum, some servers insist
		b = append(b, 0)
	}
	return b
}

// ipChecksum is the Internet checksum of b.
func ipChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// buildUDP wraps payload in UDP and IPv4 headers, 0.0.0.0:68 to
// 255.255.255.255:67 (the UDP checksum is optional over IPv4 and left 0).
func buildUDP(payload []byte) []byte {
	total := 20 + 8 + len(payload)
	p := make([]byte, 28, total)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(total))
	p[8] = 64 // TTL
	p[9] = unix.IPPROTO_UDP
	copy(p[16:20], []byte{255, 255, 255, 255})
	binary.BigEndian.PutUint16(p[10:], ipChecksum(p[:20]))
	binary.BigEndian.PutUint16(p[20:], clientPort)
	binary.BigEndian.PutUint16(p[22:], serverPort)
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	return append(p, payload...)
}

// parseUDP returns the UDP payload of an IPv4 packet addressed to dstPort,
// or errNotForUs. Every header length is checked against the packet.
func parseUDP(p []byte, dstPort uint16) ([]byte, error) {
	if len(p) < 20 || p[0]>>4 != 4 {
		return nil, errNotForUs
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:]))
	if ihl < 20 || total < ihl || total > len(p) {
		return nil, fmt.Errorf("ipv4: header length %d, total %d, packet %d", ihl, total, len(p))
	}
	if p[9] != unix.IPPROTO_UDP {
		return nil, errNotForUs
	}
	if frag := binary.BigEndian.Uint16(p[6:]); frag&0x3fff != 0 {
		return nil, errNotForUs // a fragment: DHCP replies fit one packet
	}
	u := p[ihl:total]
	if len(u) < 8 {
		return nil, fmt.Errorf("udp: %d-byte datagram", len(u))
	}
	if binary.BigEndian.Uint16(u[2:]) != dstPort {
		return nil, errNotForUs
	}
	ul := int(binary.BigEndian.Uint16(u[4:]))
	if ul < 8 || ul > len(u) {
		return nil, fmt.Errorf("udp: length field %d, datagram %d", ul, len(u))
	}
	return u[8:ul], nil
}

// dhcpLease runs DISCOVER/OFFER/REQUEST/ACK on the interface over a packet
// socket: the interface has no address yet, and the server (passt) may
// address its replies to the offered address, which a UDP socket would not
// receive.
func dhcpLease(log *logger, ifindex int, mac net.HardwareAddr, timeout time.Duration) (*dhcpMsg, error) {
	proto := htons(unix.ETH_P_IP)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifindex}); err != nil {
		return nil, fmt.Errorf("bind packet socket: %w", err)
	}
	dst := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	var xb [4]byte
	if _, err := rand.Read(xb[:]); err != nil {
		return nil, err
	}
	xid := binary.BigEndian.Uint32(xb[:])
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 2048)

	// exchange sends msg (again every retry interval) until a reply of
	// one of the wanted types arrives.
	exchange := func(msg []byte, want ...uint8) (*dhcpMsg, error) {
		pkt := buildUDP(msg)
		retry := 500 * time.Millisecond
		for time.Now().Before(deadline) {
			if err := unix.Sendto(fd, pkt, 0, dst); err != nil {
				return nil, fmt.Errorf("send: %w", err)
			}
			until := time.Now().Add(retry)
			if until.After(deadline) {
				until = deadline
			}
			for {
				left := time.Until(until)
				if left <= 0 {
					break
				}
				tv := unix.NsecToTimeval(left.Nanoseconds())
				if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
					return nil, err
				}
				n, _, err := unix.Recvfrom(fd, buf, 0)
				if err == unix.EAGAIN || err == unix.EINTR {
					continue
				}
				if err != nil {
					return nil, fmt.Errorf("receive: %w", err)
				}
				payload, err := parseUDP(buf[:n], clientPort)
				if err != nil {
					if err != errNotForUs {
						log.Printf("dhcp: dropped packet: %v", err)
					}
					continue
				}
				m, err := parseDHCP(payload)
				if err != nil {
					log.Printf("dhcp: dropped reply: %v", err)
					continue
				}
				if m.Op != bootReply || m.XID != xid {
					continue
				}
				for _, w := range want {
					if m.Type == w {
						return m, nil
					}
				}
			}
			retry = min(retry*2, 4*time.Second)
		}
		return nil, fmt.Errorf("no DHCP answer within %v", timeout)
	}

	for time.Now().Before(deadline) {
		offer, err := exchange(buildDHCP(dhcpDiscover, xid, mac, netip.Addr{}, netip.Addr{}), dhcpOffer)
		if err != nil {
			return nil, fmt.Errorf("dhcp discover: %w", err)
		}
		if !offer.YourIP.Is4() || offer.YourIP.IsUnspecified() {
			log.Printf("dhcp: offer without an address")
			continue
		}
		ack, err := exchange(buildDHCP(dhcpRequest, xid, mac, offer.YourIP, offer.ServerID), dhcpAck, dhcpNak)
		if err != nil {
			return nil, fmt.Errorf("dhcp request: %w", err)
		}
		if ack.Type == dhcpNak {
			log.Printf("dhcp: server refused %v, starting over", offer.YourIP)
			continue
		}
		if !ack.YourIP.IsValid() || ack.YourIP.IsUnspecified() {
			ack.YourIP = offer.YourIP
		}
		return ack, nil
	}
	return nil, fmt.Errorf("dhcp: no lease within %v", timeout)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
