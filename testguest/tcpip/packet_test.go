package tcpip

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// A SYN-ACK as passt sends it: MSS 65480 and window scale 7.
func synAck() []byte {
	f := make([]byte, ethLen+ipv4Len+tcpLen+8)
	putEth(f, [6]byte{1}, [6]byte{2}, etherIP4)
	putIPv4(f[ethLen:], [4]byte{10, 0, 0, 1}, [4]byte{10, 0, 0, 2}, protoTCP, tcpLen+8, 1)
	t := f[ethLen+ipv4Len:]
	binary.BigEndian.PutUint16(t[0:], 80)
	binary.BigEndian.PutUint16(t[2:], 50000)
	binary.BigEndian.PutUint32(t[4:], 1000)
	binary.BigEndian.PutUint32(t[8:], 2000)
	t[12] = (tcpLen + 8) / 4 << 4
	t[13] = flagSYN | flagACK
	binary.BigEndian.PutUint16(t[14:], 65535)
	copy(t[20:], []byte{2, 4, 0xff, 0xc8, 1, 3, 3, 7})
	return f
}

func TestParseSegment(t *testing.T) {
	f := synAck()
	p, ok := parseIPv4(f)
	if !ok || p.proto != protoTCP || p.src != [4]byte{10, 0, 0, 1} {
		t.Fatalf("parseIPv4: %+v %v", p, ok)
	}
	s, ok := parseTCP(p.payload)
	if !ok || s.mss != 65480 || s.wscale != 7 || s.seq != 1000 || s.ack != 2000 || s.flags != flagSYN|flagACK || len(s.payload) != 0 {
		t.Fatalf("parseTCP: %+v %v", s, ok)
	}
	if sum := fold(checksum(0, f[ethLen:ethLen+ipv4Len])); sum != 0 {
		t.Errorf("IPv4 header checksum does not verify: %#x", sum)
	}
}

func TestParseMalformed(t *testing.T) {
	tests := []struct {
		name string
		mod  func(f []byte) []byte
	}{
		{"short frame", func(f []byte) []byte { return f[:ethLen+10] }},
		{"not IPv4", func(f []byte) []byte { f[12] = 0x86; f[13] = 0xdd; return f }},
		{"IPv6 version nibble", func(f []byte) []byte { f[ethLen] = 0x65; return f }},
		{"header length below 20", func(f []byte) []byte { f[ethLen] = 0x44; return f }},
		{"total length past the frame", func(f []byte) []byte { binary.BigEndian.PutUint16(f[ethLen+2:], 9000); return f }},
		{"fragment", func(f []byte) []byte { binary.BigEndian.PutUint16(f[ethLen+6:], 0x2000); return f }},
	}
	for _, tc := range tests {
		if _, ok := parseIPv4(tc.mod(synAck())); ok {
			t.Errorf("%s: parsed", tc.name)
		}
	}
	tcpTests := []struct {
		name string
		mod  func(t []byte) []byte
	}{
		{"data offset below 20", func(t []byte) []byte { t[12] = 4 << 4; return t }},
		{"data offset past the segment", func(t []byte) []byte { t[12] = 15 << 4; return t }},
		{"option length 0", func(t []byte) []byte { t[21] = 0; return t }},
		{"option past the header", func(t []byte) []byte { t[21] = 40; return t }},
	}
	for _, tc := range tcpTests {
		f := synAck()
		if _, ok := parseTCP(tc.mod(f[ethLen+ipv4Len:])); ok {
			t.Errorf("%s: parsed", tc.name)
		}
	}
}

// FuzzParseFrame: nothing passt (or anything on the link) sends makes the
// endpoint's parsers panic or read out of bounds, and what they accept they
// read right: each one's verdict agrees with a check of the frame's bytes
// written here, every field is the bytes at its offset, every slice they
// return is the span of the input its headers declare, a parsed TCP
// segment survives being written again and parsed, and an ARP reply
// answers the request it was sent for.
func FuzzParseFrame(f *testing.F) {
	f.Add(synAck())
	f.Add([]byte{})
	f.Add(dhcpReplyFrame(0x1234, [6]byte{2, 0, 0, 0, 0, 1}))
	f.Add(arpRequest([6]byte{2, 0, 0, 0, 0, 9}, [4]byte{10, 0, 0, 1}, [4]byte{10, 0, 0, 2}))
	seg := synAck()
	seg = append(seg, "some payload"...)
	binary.BigEndian.PutUint16(seg[ethLen+2:], uint16(len(seg)-ethLen))
	f.Add(seg)
	f.Fuzz(func(t *testing.T, frame []byte) {
		checkIPv4(t, frame)
		checkDHCPReply(t, frame)
		checkARP(t, frame)
	})
}

// checkIPv4 checks parseIPv4 and, on its payload, parseTCP.
func checkIPv4(t *testing.T, frame []byte) {
	p, ok := parseIPv4(frame)
	var ihl, total int
	want := len(frame) >= ethLen+ipv4Len && frame[12] == 0x08 && frame[13] == 0x00 && frame[ethLen]&0xf0 == 0x40
	if want {
		ip := frame[ethLen:]
		ihl, total = int(ip[0]&0xf)<<2, int(ip[2])<<8|int(ip[3])
		want = ihl >= ipv4Len && ihl <= total && total <= len(ip) && ip[6]&0x3f == 0 && ip[7] == 0
	}
	if ok != want {
		t.Fatalf("parseIPv4 says %v, the header says %v: % x", ok, want, frame[:min(len(frame), ethLen+ipv4Len)])
	}
	if !ok {
		return
	}
	ip := frame[ethLen:]
	if p.src != [4]byte(ip[12:16]) || p.dst != [4]byte(ip[16:20]) || p.proto != ip[9] {
		t.Fatalf("parseIPv4: %v > %v proto %d, header % x", p.src, p.dst, p.proto, ip[:20])
	}
	if !sameSpan(p.payload, frame, ethLen+ihl, ethLen+total) {
		t.Fatalf("parseIPv4: payload of %d bytes is not the frame's [%d, %d)", len(p.payload), ethLen+ihl, ethLen+total)
	}
	checkTCP(t, p.payload)
}

// checkTCP checks parseTCP on b, and that what it parsed survives being
// written out again and parsed.
func checkTCP(t *testing.T, b []byte) {
	s, ok := parseTCP(b)
	off := 0
	want := len(b) >= tcpLen
	mss, wscale := uint16(0), -1
	if want {
		off = int(b[12]&0xf0) >> 2
		want = off >= tcpLen && off <= len(b)
	}
	// The options, walked by index: end (0), no-op (1), or kind, length
	// (at least 2, inside the header), value.
	for i := tcpLen; want && i < off && b[i] != 0; {
		if b[i] == 1 {
			i++
			continue
		}
		if i+1 >= off || b[i+1] < 2 || i+int(b[i+1]) > off {
			want = false
			break
		}
		switch n := int(b[i+1]); {
		case b[i] == 2 && n == 4:
			mss = uint16(b[i+2])<<8 | uint16(b[i+3])
		case b[i] == 3 && n == 3:
			wscale = min(int(b[i+2]), 14)
		}
		i += int(b[i+1])
	}
	if ok != want {
		t.Fatalf("parseTCP says %v, the header says %v: % x", ok, want, b[:min(len(b), 60)])
	}
	if !ok {
		return
	}
	if s.srcPort != binary.BigEndian.Uint16(b[0:]) || s.dstPort != binary.BigEndian.Uint16(b[2:]) ||
		s.seq != binary.BigEndian.Uint32(b[4:]) || s.ack != binary.BigEndian.Uint32(b[8:]) ||
		s.flags != b[13] || s.window != binary.BigEndian.Uint16(b[14:]) {
		t.Fatalf("parseTCP: %+v, header % x", s, b[:tcpLen])
	}
	if s.mss != mss || s.wscale != wscale {
		t.Fatalf("parseTCP: MSS %d window scale %d, the options say %d and %d: % x", s.mss, s.wscale, mss, wscale, b[tcpLen:off])
	}
	if !sameSpan(s.payload, b, off, len(b)) {
		t.Fatalf("parseTCP: payload of %d bytes is not the segment's [%d, %d)", len(s.payload), off, len(b))
	}
	// Written again with only the options it understood, it parses the same.
	w := make([]byte, tcpLen, tcpLen+8+len(s.payload))
	binary.BigEndian.PutUint16(w[0:], s.srcPort)
	binary.BigEndian.PutUint16(w[2:], s.dstPort)
	binary.BigEndian.PutUint32(w[4:], s.seq)
	binary.BigEndian.PutUint32(w[8:], s.ack)
	w[13] = s.flags
	binary.BigEndian.PutUint16(w[14:], s.window)
	if s.mss != 0 {
		w = binary.BigEndian.AppendUint16(append(w, 2, 4), s.mss)
	}
	if s.wscale >= 0 {
		w = append(w, 1, 3, 3, byte(s.wscale))
	}
	w[12] = byte(len(w)/4) << 4
	w = append(w, s.payload...)
	s2, ok := parseTCP(w)
	if !ok || s2.srcPort != s.srcPort || s2.dstPort != s.dstPort || s2.seq != s.seq || s2.ack != s.ack ||
		s2.flags != s.flags || s2.window != s.window || s2.mss != s.mss || s2.wscale != s.wscale ||
		!bytes.Equal(s2.payload, s.payload) {
		t.Fatalf("parseTCP of its own segment written again: %+v %v, was %+v", s2, ok, s)
	}
}

// checkDHCPReply checks parseDHCPReply for the transaction and address the
// frame names (so the fuzzer reaches the options), and for others.
func checkDHCPReply(t *testing.T, frame []byte) {
	xid, mac := uint32(0), [6]byte{}
	var m []byte // the BOOTP message, as the UDP header bounds it
	if p, ok := parseIPv4(frame); ok && len(p.payload) >= udpLen+bootpLen+4 {
		u := p.payload
		if n := int(binary.BigEndian.Uint16(u[4:])); n >= udpLen+bootpLen+4 && n <= len(u) {
			m = u[udpLen:n]
		}
		xid, mac = binary.BigEndian.Uint32(u[udpLen+4:]), [6]byte(u[udpLen+28:])
	}
	r, ok := parseDHCPReply(frame, xid, mac)
	if _, other := parseDHCPReply(frame, xid+1, mac); other {
		t.Fatalf("parseDHCPReply: took a reply to transaction %#x for %#x", xid, xid+1)
	}
	if _, other := parseDHCPReply(frame, xid, [6]byte{mac[0] ^ 1}); other {
		t.Fatalf("parseDHCPReply: took a reply to %x for another address", mac)
	}
	if !ok {
		return
	}
	p, _ := parseIPv4(frame)
	u := p.payload
	if p.proto != protoUDP || m == nil || binary.BigEndian.Uint16(u[0:]) != 67 || binary.BigEndian.Uint16(u[2:]) != 68 ||
		m[0] != 2 || binary.BigEndian.Uint32(m[bootpLen:]) != dhcpCookie {
		t.Fatalf("parseDHCPReply: took a frame that is no BOOTREPLY from port 67 to 68: % x", frame)
	}
	if r.yiaddr != [4]byte(m[16:20]) {
		t.Fatalf("parseDHCPReply: yiaddr %v, the message says % x", r.yiaddr, m[16:20])
	}
	opts := m[bootpLen+4:]
	if r.msgType == 0 || !bytes.Contains(opts, []byte{53, 1, r.msgType}) {
		t.Fatalf("parseDHCPReply: message type %d is not in the options % x", r.msgType, opts)
	}
	// The server and router are an option 54 of 4 bytes and the first
	// address of an option 3.
	if r.server != [4]byte{} && !bytes.Contains(opts, append([]byte{54, 4}, r.server[:]...)) {
		t.Fatalf("parseDHCPReply: server %v is not an option 54 in % x", r.server, opts)
	}
	if r.router != [4]byte{} && !hasRouter(opts, r.router) {
		t.Fatalf("parseDHCPReply: router %v is not an option 3 in % x", r.router, opts)
	}
}

// hasRouter reports whether opts holds 3, n >= 4, a.
func hasRouter(opts []byte, a [4]byte) bool {
	for i := 0; i+6 <= len(opts); i++ {
		if opts[i] == 3 && opts[i+1] >= 4 && [4]byte(opts[i+2:]) == a {
			return true
		}
	}
	return false
}

// checkARP checks answerARP, as the address the frame asks for and as
// another.
func checkARP(t *testing.T, frame []byte) {
	isARP := len(frame) >= ethLen+arpLen && frame[12] == 0x08 && frame[13] == 0x06
	addrs := [][4]byte{{10, 0, 0, 2}}
	if isARP {
		addrs = append(addrs, [4]byte(frame[ethLen+24:]))
	}
	for _, addr := range addrs {
		l := &captureLink{}
		e := &Endpoint{link: l, mac: [6]byte{2, 0, 0, 0, 0, 2}, out: make([]byte, MaxFrame), addr: addr}
		got, err := e.answerARP(frame)
		if got != isARP || err != nil {
			t.Fatalf("answerARP: %v, %v; the frame is ARP: %v", got, err, isARP)
		}
		a := frame[min(len(frame), ethLen):]
		request := isARP && bytes.Equal(a[:8], []byte{0, 1, 8, 0, 6, 4, 0, 1}) &&
			[4]byte(a[24:28]) == addr && addr != [4]byte{}
		if !request {
			if len(l.frames) != 0 {
				t.Fatalf("answerARP: answered % x as %v", frame, addr)
			}
			continue
		}
		if len(l.frames) != 1 {
			t.Fatalf("answerARP: %d frames for a request for %v", len(l.frames), addr)
		}
		r := l.frames[0]
		wantR := append(append(append(append(append(append([]byte{},
			a[8:14]...), e.mac[:]...), 8, 6), // to the asker, from us
			0, 1, 8, 0, 6, 4, 0, 2), // a reply
			e.mac[:]...), addr[:]...)
		wantR = append(wantR, a[8:18]...) // to the asker's addresses
		if !bytes.Equal(r, wantR) {
			t.Fatalf("answerARP: replied\n% x\nto\n% x\nwant\n% x", r, frame, wantR)
		}
	}
}

// sameSpan reports whether sub is b[lo:hi], the same memory, not a copy.
func sameSpan(sub, b []byte, lo, hi int) bool {
	if len(sub) != hi-lo {
		return false
	}
	if len(sub) == 0 {
		return true
	}
	return &sub[0] == &b[lo]
}

// dhcpReplyFrame is an ACK from passt for xid and mac: 10.0.0.2 by server
// and router 10.0.0.1.
func dhcpReplyFrame(xid uint32, mac [6]byte) []byte {
	opts := []byte{53, 1, 5, 54, 4, 10, 0, 0, 1, 3, 4, 10, 0, 0, 1, 1, 4, 255, 255, 255, 0, 255}
	n := udpLen + bootpLen + 4 + len(opts)
	f := make([]byte, ethLen+ipv4Len+n)
	putEth(f, mac, [6]byte{2, 0, 0, 0, 0, 1}, etherIP4)
	putIPv4(f[ethLen:], [4]byte{10, 0, 0, 1}, [4]byte{255, 255, 255, 255}, protoUDP, n, 0)
	u := f[ethLen+ipv4Len:]
	binary.BigEndian.PutUint16(u[0:], 67)
	binary.BigEndian.PutUint16(u[2:], 68)
	binary.BigEndian.PutUint16(u[4:], uint16(n))
	m := u[udpLen:]
	m[0], m[1], m[2] = 2, 1, 6
	binary.BigEndian.PutUint32(m[4:], xid)
	copy(m[16:20], []byte{10, 0, 0, 2})
	copy(m[28:34], mac[:])
	binary.BigEndian.PutUint32(m[bootpLen:], dhcpCookie)
	copy(m[bootpLen+4:], opts)
	return f
}

// arpRequest asks who has tpa, from sha at spa.
func arpRequest(sha [6]byte, spa, tpa [4]byte) []byte {
	f := make([]byte, ethLen+arpLen)
	putEth(f, broadcastMAC, sha, etherARP)
	a := f[ethLen:]
	copy(a, []byte{0, 1, 8, 0, 6, 4, 0, 1})
	copy(a[8:], sha[:])
	copy(a[14:], spa[:])
	copy(a[24:], tpa[:])
	return f
}

// captureLink keeps copies of the frames written to it.
type captureLink struct{ frames [][]byte }

func (l *captureLink) WriteFrame(b []byte) error {
	l.frames = append(l.frames, bytes.Clone(b))
	return nil
}
func (*captureLink) Flush() error                  { return nil }
func (*captureLink) ReadFrame([]byte) (int, error) { return 0, nil }

// The fuzz seeds reach past the parsers' first checks: a reply for our
// transaction parses, and a request for our address is answered.
func TestParseDHCPReplyAndARP(t *testing.T) {
	mac := [6]byte{2, 0, 0, 0, 0, 1}
	r, ok := parseDHCPReply(dhcpReplyFrame(0x1234, mac), 0x1234, mac)
	want := dhcpReply{msgType: 5, yiaddr: [4]byte{10, 0, 0, 2}, server: [4]byte{10, 0, 0, 1}, router: [4]byte{10, 0, 0, 1}}
	if !ok || r != want {
		t.Errorf("parseDHCPReply: %+v %v, want %+v", r, ok, want)
	}
	l := &captureLink{}
	e := &Endpoint{link: l, mac: [6]byte{2, 0, 0, 0, 0, 2}, out: make([]byte, MaxFrame), addr: [4]byte{10, 0, 0, 2}}
	if isARP, err := e.answerARP(arpRequest([6]byte{2, 0, 0, 0, 0, 9}, [4]byte{10, 0, 0, 1}, [4]byte{10, 0, 0, 2})); !isARP || err != nil || len(l.frames) != 1 {
		t.Errorf("answerARP: %v, %v, %d frames", isARP, err, len(l.frames))
	}
}
