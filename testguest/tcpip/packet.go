package tcpip

import (
	"encoding/binary"
	"net/netip"
)

// Header sizes and protocol numbers.
const (
	ethLen   = 14
	ipv4Len  = 20
	tcpLen   = 20
	udpLen   = 8
	arpLen   = 28
	etherIP4 = 0x0800
	etherARP = 0x0806
	protoTCP = 6
	protoUDP = 17
)

// TCP flags.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
)

var broadcastMAC = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// checksum is the Internet checksum (RFC 1071) of b, folded onto sum.
func checksum(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// putEth writes an Ethernet header.
func putEth(b []byte, dst, src [6]byte, typ uint16) {
	copy(b[0:6], dst[:])
	copy(b[6:12], src[:])
	binary.BigEndian.PutUint16(b[12:], typ)
}

// putIPv4 writes a 20-byte IPv4 header for a payload of n bytes.
func putIPv4(b []byte, src, dst [4]byte, proto byte, n int, id uint16) {
	b[0] = 0x45
	b[1] = 0
	binary.BigEndian.PutUint16(b[2:], uint16(ipv4Len+n))
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], 0x4000) // don't fragment
	b[8] = 64
	b[9] = proto
	b[10], b[11] = 0, 0
	copy(b[12:16], src[:])
	copy(b[16:20], dst[:])
	binary.BigEndian.PutUint16(b[10:], fold(checksum(0, b[:ipv4Len])))
}

// pseudoSum is the IPv4 pseudo-header's part of a TCP or UDP checksum.
func pseudoSum(src, dst [4]byte, proto byte, n int) uint32 {
	s := checksum(0, src[:])
	s = checksum(s, dst[:])
	return s + uint32(proto) + uint32(n)
}

// ipv4Packet is a parsed IPv4 packet inside an Ethernet frame.
type ipv4Packet struct {
	src, dst [4]byte
	proto    byte
	payload  []byte
}

// parseIPv4 checks an Ethernet frame carrying IPv4 and returns its packet.
// It reports false for anything malformed, fragmented or not IPv4.
func parseIPv4(frame []byte) (ipv4Packet, bool) {
	var p ipv4Packet
	if len(frame) < ethLen+ipv4Len || binary.BigEndian.Uint16(frame[12:]) != etherIP4 {
		return p, false
	}
	ip := frame[ethLen:]
	if ip[0]>>4 != 4 {
		return p, false
	}
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ihl < ipv4Len || total < ihl || total > len(ip) {
		return p, false
	}
	if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or an offset
		return p, false
	}
	copy(p.src[:], ip[12:16])
	copy(p.dst[:], ip[16:20])
	p.proto = ip[9]
	p.payload = ip[ihl:total]
	return p, true
}

// tcpSegment is a parsed TCP segment.
type tcpSegment struct {
	srcPort, dstPort uint16
	seq, ack         uint32
	flags            byte
	window           uint16
	mss              uint16 // from the options; 0 if absent
	wscale           int    // from the options; -1 if absent
	payload          []byte
}

// parseTCP parses b as a TCP segment, reporting false if it is malformed.
func parseTCP(b []byte) (tcpSegment, bool) {
	s := tcpSegment{wscale: -1}
	if len(b) < tcpLen {
		return s, false
	}
	off := int(b[12]>>4) * 4
	if off < tcpLen || off > len(b) {
		return s, false
	}
	s.srcPort = binary.BigEndian.Uint16(b[0:])
	s.dstPort = binary.BigEndian.Uint16(b[2:])
	s.seq = binary.BigEndian.Uint32(b[4:])
	s.ack = binary.BigEndian.Uint32(b[8:])
	s.flags = b[13]
	s.window = binary.BigEndian.Uint16(b[14:])
	opts := b[tcpLen:off]
	for len(opts) > 0 {
		kind := opts[0]
		if kind == 0 {
			break
		}
		if kind == 1 {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 || int(opts[1]) < 2 || int(opts[1]) > len(opts) {
			return s, false
		}
		o := opts[:opts[1]]
		switch {
		case kind == 2 && len(o) == 4:
			s.mss = binary.BigEndian.Uint16(o[2:])
		case kind == 3 && len(o) == 3:
			s.wscale = min(int(o[2]), 14)
		}
		opts = opts[len(o):]
	}
	s.payload = b[off:]
	return s, true
}

// addr4 converts a netip IPv4 address.
func addr4(a netip.Addr) [4]byte { return a.As4() }
