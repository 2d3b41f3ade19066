package vhostuser

import (
	"bytes"
	"errors"
	"io"
	"os"
	"testing"
)

// seedMessages are well-formed requests used to seed the fuzzer (the
// committed corpus under testdata/fuzz holds more, including hostile ones).
func seedMessages() [][]byte {
	msg := func(req Request, flags uint32, payload []byte) []byte {
		b := header(req, flags, uint32(len(payload)))
		return append(b, payload...)
	}
	region := MemRegion{GuestAddr: 0, Size: 0x100000, UserAddr: 0x7f0000000000}
	return [][]byte{
		msg(GetFeatures, Version, nil),
		msg(SetFeatures, Version|FlagNeedReply, EncodeU64(1<<32|1<<30)),
		msg(SetMemTable, Version, EncodeMemTable([]MemRegion{region, {GuestAddr: 0x100000, Size: 0x1000, UserAddr: 0x7f0000100000, MmapOffset: 0x100000}})),
		msg(SetVringAddr, Version, VringAddr{Desc: 0x7f0000001000, Used: 0x7f0000002000, Avail: 0x7f0000003000}.Encode()),
		msg(SetVringKick, Version, EncodeVringFD(1, true)),
		msg(GetConfig, Version, ConfigSpace{Data: make([]byte, 60)}.Encode()),
		msg(AddMemReg, Version, EncodeSingleMemRegion(region)),
		msg(GetInflightFD, Version, Inflight{NumQueues: 2, QueueSize: 256}.Encode()),
		append(msg(SetOwner, Version, nil), msg(GetVringBase, Version, VringState{0, 0}.Encode())...),
	}
}

// FuzzParseMessage feeds arbitrary bytes, as a stream of messages, through
// header decoding, request and reply validation, and Conn.Recv over a real
// socket. Nothing may panic or hang; every accepted payload must re-encode
// to the bytes it was decoded from.
func FuzzParseMessage(f *testing.F) {
	for i, s := range seedMessages() {
		f.Add(s, uint8(i%3))
	}
	f.Fuzz(func(t *testing.T, data []byte, nfds uint8) {
		files := make([]*os.File, int(nfds)%(MaxFDs+3))
		rest := data
		for len(rest) >= HeaderSize {
			h, err := DecodeHeader(rest)
			if err != nil {
				break
			}
			if uint64(len(rest)-HeaderSize) < uint64(h.Size) {
				break
			}
			m := &Message{Request: h.Request, Flags: h.Flags, Payload: rest[HeaderSize : HeaderSize+int(h.Size)], Files: files}
			rest = rest[HeaderSize+int(h.Size):]
			checkParsed(t, m)
			for _, ack := range []bool{false, true} {
				m.Flags |= FlagReply
				if v, err := ParseReply(m.Request, ack, m); err == nil {
					checkRoundTrip(t, m, v)
				}
			}
		}
		recvAll(t, data)
	})
}

func checkParsed(t *testing.T, m *Message) {
	v, err := ParseRequest(m)
	if err != nil {
		return
	}
	if !Supported(m.Request) {
		t.Fatalf("unsupported %v accepted", m.Request)
	}
	checkRoundTrip(t, m, v)
}

func checkRoundTrip(t *testing.T, m *Message, v any) {
	var enc []byte
	p := m.Payload
	switch x := v.(type) {
	case nil:
		enc = []byte{}
	case uint64:
		enc = EncodeU64(x)
	case VringState:
		enc = x.Encode()
	case VringAddr:
		enc = x.Encode()
	case VringFD:
		enc = EncodeVringFD(x.Index, x.NoFD)
	case []MemRegion:
		if len(m.Files) != len(x) {
			t.Fatalf("%v: %d regions with %d fds accepted", m.Request, len(x), len(m.Files))
		}
		if CheckMemRegions(x) != nil {
			t.Fatalf("%v: bad regions accepted: %+v", m.Request, x)
		}
		enc = EncodeMemTable(x)
	case MemRegion:
		if x.Check() != nil {
			t.Fatalf("%v: bad region accepted: %+v", m.Request, x)
		}
		enc, p = EncodeSingleMemRegion(x)[8:], p[8:]
	case Inflight:
		// The padding after the four fields is not checked.
		enc, p = x.Encode()[:20], p[:20]
	case ConfigSpace:
		if len(x.Data) > MaxConfigSize || uint64(x.Offset)+uint64(len(x.Data)) > MaxConfigSize {
			t.Fatalf("%v: config access %d+%d accepted", m.Request, x.Offset, len(x.Data))
		}
		enc = x.Encode()
	default:
		t.Fatalf("%v: unexpected payload type %T", m.Request, v)
	}
	if !bytes.Equal(enc, p) {
		t.Fatalf("%v: payload %x re-encodes as %x", m.Request, p, enc)
	}
}

// recvAll writes data into a socket and reads messages with Conn.Recv
// until it fails; it must end with io.EOF or a typed error, never hang.
func recvAll(t *testing.T, data []byte) {
	a, b, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	go func() {
		a.UnixConn().Write(data)
		a.Close()
	}()
	for range len(data)/HeaderSize + 1 {
		m, err := b.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) &&
				!errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrPayloadTooBig) {
				t.Fatalf("unexpected Recv error: %v", err)
			}
			return
		}
		if len(m.Payload) > MaxPayloadSize {
			t.Fatalf("payload of %d bytes accepted", len(m.Payload))
		}
		checkParsed(t, m)
	}
	if m, err := b.Recv(); err == nil {
		t.Fatalf("more messages than bytes allow: %+v", m)
	}
}
