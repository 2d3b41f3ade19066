package tcpip

import (
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
// endpoint's parsers panic or read out of bounds.
func FuzzParseFrame(f *testing.F) {
	f.Add(synAck())
	f.Add([]byte{})
	dhcp := make([]byte, ethLen+ipv4Len+udpLen+bootpLen+8)
	putIPv4(dhcp[ethLen:], [4]byte{10, 0, 0, 1}, [4]byte{255, 255, 255, 255}, protoUDP, udpLen+bootpLen+8, 0)
	binary.BigEndian.PutUint16(dhcp[12:], etherIP4)
	f.Add(dhcp)
	f.Fuzz(func(t *testing.T, frame []byte) {
		if p, ok := parseIPv4(frame); ok {
			parseTCP(p.payload)
		}
		parseDHCPReply(frame, 0, [6]byte{})
		e := &Endpoint{link: nopLink{}, out: make([]byte, MaxFrame), addr: [4]byte{10, 0, 0, 2}}
		e.answerARP(frame)
	})
}

type nopLink struct{}

func (nopLink) WriteFrame([]byte) error       { return nil }
func (nopLink) Flush() error                  { return nil }
func (nopLink) ReadFrame([]byte) (int, error) { return 0, nil }
