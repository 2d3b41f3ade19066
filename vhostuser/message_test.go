package vhostuser

import (
	"bytes"
	"errors"
	"os"
	"testing"
)

func TestHeaderDecode(t *testing.T) {
	tests := []struct {
		name    string
		h       Header
		wantErr error
	}{
		{"ok", Header{GetFeatures, Version, 0}, nil},
		{"need reply", Header{SetFeatures, Version | FlagNeedReply, 8}, nil},
		{"reply", Header{GetFeatures, Version | FlagReply, 8}, nil},
		{"version 0", Header{GetFeatures, 0, 0}, ErrBadHeader},
		{"version 2", Header{GetFeatures, 2, 0}, ErrBadHeader},
		{"unknown flag", Header{GetFeatures, Version | 1<<4, 0}, ErrBadHeader},
		{"max payload", Header{SetMemTable, Version, MaxPayloadSize}, nil},
		{"payload too big", Header{SetMemTable, Version, MaxPayloadSize + 1}, ErrPayloadTooBig},
		{"huge payload", Header{SetMemTable, Version, 0xffffffff}, ErrPayloadTooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := make([]byte, HeaderSize)
			tt.h.Encode(b)
			got, err := DecodeHeader(b)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err == nil && got != tt.h {
				t.Fatalf("got %+v, want %+v", got, tt.h)
			}
		})
	}
	if _, err := DecodeHeader(make([]byte, 11)); !errors.Is(err, ErrBadHeader) {
		t.Fatalf("short header: err = %v", err)
	}
}

func TestPayloadRoundTrip(t *testing.T) {
	s := VringState{Index: 3, Num: 0xfffe}
	if got, err := DecodeVringState(s.Encode()); err != nil || got != s {
		t.Fatalf("vring state: %+v %v", got, err)
	}
	a := VringAddr{Index: 1, Flags: VringFlagLog, Desc: 0x7f0000001000, Used: 0x7f0000003000, Avail: 0x7f0000002000, Log: 9}
	if got, err := DecodeVringAddr(a.Encode()); err != nil || got != a {
		t.Fatalf("vring addr: %+v %v", got, err)
	}
	if v, err := DecodeU64(EncodeU64(0x0123456789abcdef)); err != nil || v != 0x0123456789abcdef {
		t.Fatalf("u64: %#x %v", v, err)
	}
	rs := []MemRegion{
		{GuestAddr: 0, Size: 0x100000, UserAddr: 0x7f0000000000, MmapOffset: 0},
		{GuestAddr: 0x100000, Size: 0x200000, UserAddr: 0x7f0000100000, MmapOffset: 0x100000},
	}
	got, err := DecodeMemTable(EncodeMemTable(rs))
	if err != nil || len(got) != 2 || got[0] != rs[0] || got[1] != rs[1] {
		t.Fatalf("mem table: %+v %v", got, err)
	}
	if r, err := DecodeSingleMemRegion(EncodeSingleMemRegion(rs[1])); err != nil || r != rs[1] {
		t.Fatalf("single region: %+v %v", r, err)
	}
	c := ConfigSpace{Offset: 4, Flags: ConfigFlagMigration, Data: []byte{1, 2, 3}}
	gc, err := DecodeConfigSpace(c.Encode())
	if err != nil || gc.Offset != 4 || gc.Flags != 1 || !bytes.Equal(gc.Data, c.Data) {
		t.Fatalf("config: %+v %v", gc, err)
	}
	idx, noFD, err := DecodeVringFD(EncodeVringFD(7, true))
	if err != nil || idx != 7 || !noFD {
		t.Fatalf("vring fd: %d %v %v", idx, noFD, err)
	}
}

func TestPayloadDecodeErrors(t *testing.T) {
	tbl := func(n uint32, rs ...MemRegion) []byte {
		b := EncodeMemTable(rs)
		le.PutUint32(b, n)
		return b
	}
	region := MemRegion{GuestAddr: 0x1000, Size: 0x1000, UserAddr: 0x7f0000001000}
	cfg := func(off, size, flags uint32, n int) []byte {
		b := make([]byte, ConfigHeaderSize+n)
		le.PutUint32(b[0:], off)
		le.PutUint32(b[4:], size)
		le.PutUint32(b[8:], flags)
		return b
	}
	tests := []struct {
		name    string
		decode  func() error
		wantErr error
	}{
		{"u64 short", func() error { _, err := DecodeU64(make([]byte, 7)); return err }, ErrPayloadSize},
		{"u64 long", func() error { _, err := DecodeU64(make([]byte, 9)); return err }, ErrPayloadSize},
		{"state short", func() error { _, err := DecodeVringState(make([]byte, 4)); return err }, ErrPayloadSize},
		{"addr short", func() error { _, err := DecodeVringAddr(make([]byte, 39)); return err }, ErrPayloadSize},
		{"addr flags", func() error {
			_, err := DecodeVringAddr(VringAddr{Flags: 2}.Encode())
			return err
		}, ErrBadPayload},
		{"table empty", func() error { _, err := DecodeMemTable(tbl(0)); return err }, ErrBadPayload},
		{"table too many", func() error { _, err := DecodeMemTable(tbl(9, make([]MemRegion, 9)...)); return err }, ErrBadPayload},
		{"table count mismatch", func() error { _, err := DecodeMemTable(tbl(2, region)); return err }, ErrPayloadSize},
		{"table trailing", func() error { _, err := DecodeMemTable(append(tbl(1, region), 0)); return err }, ErrPayloadSize},
		{"table short", func() error { _, err := DecodeMemTable(make([]byte, 4)); return err }, ErrPayloadSize},
		{"table padding", func() error { b := tbl(1, region); b[4] = 1; _, err := DecodeMemTable(b); return err }, ErrBadPayload},
		{"region zero size", func() error {
			_, err := DecodeMemTable(tbl(1, MemRegion{GuestAddr: 0x1000}))
			return err
		}, ErrBadPayload},
		{"region guest overflow", func() error {
			_, err := DecodeMemTable(tbl(1, MemRegion{GuestAddr: ^uint64(0) - 0xfff, Size: 0x2000}))
			return err
		}, ErrBadPayload},
		{"region user overflow", func() error {
			_, err := DecodeMemTable(tbl(1, MemRegion{UserAddr: ^uint64(0), Size: 2}))
			return err
		}, ErrBadPayload},
		{"region offset overflow", func() error {
			_, err := DecodeMemTable(tbl(1, MemRegion{MmapOffset: 1<<63 + 1, Size: 1 << 63}))
			return err
		}, ErrBadPayload},
		{"regions overlap guest", func() error {
			_, err := DecodeMemTable(tbl(2, region, MemRegion{GuestAddr: 0x1fff, Size: 0x1000, UserAddr: 0x9000}))
			return err
		}, ErrBadPayload},
		{"regions overlap user", func() error {
			_, err := DecodeMemTable(tbl(2, region, MemRegion{GuestAddr: 0x9000, Size: 0x1000, UserAddr: 0x7f0000000001}))
			return err
		}, ErrBadPayload},
		{"single short", func() error { _, err := DecodeSingleMemRegion(make([]byte, 32)); return err }, ErrPayloadSize},
		{"single zero", func() error { _, err := DecodeSingleMemRegion(make([]byte, 40)); return err }, ErrBadPayload},
		{"config short", func() error { _, err := DecodeConfigSpace(make([]byte, 11)); return err }, ErrPayloadSize},
		{"config size mismatch", func() error { _, err := DecodeConfigSpace(cfg(0, 4, 0, 3)); return err }, ErrPayloadSize},
		{"config too big", func() error { _, err := DecodeConfigSpace(cfg(0, 257, 0, 257)); return err }, ErrBadPayload},
		{"config beyond", func() error { _, err := DecodeConfigSpace(cfg(250, 8, 0, 8)); return err }, ErrBadPayload},
		{"config offset overflow", func() error { _, err := DecodeConfigSpace(cfg(0xffffffff, 2, 0, 2)); return err }, ErrBadPayload},
		{"config flags", func() error { _, err := DecodeConfigSpace(cfg(0, 1, 2, 1)); return err }, ErrBadPayload},
		{"vring fd reserved", func() error { _, _, err := DecodeVringFD(EncodeU64(1 << 9)); return err }, ErrBadPayload},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.decode(); !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestParseRequest(t *testing.T) {
	files := func(n int) []*os.File { return make([]*os.File, n) }
	region := MemRegion{GuestAddr: 0, Size: 0x1000, UserAddr: 0x7f0000000000}
	tests := []struct {
		name    string
		m       Message
		want    any
		wantErr error
	}{
		{"get features", Message{Request: GetFeatures, Flags: Version}, nil, nil},
		{"get features payload", Message{Request: GetFeatures, Flags: Version, Payload: make([]byte, 8)}, nil, ErrPayloadSize},
		{"get features fd", Message{Request: GetFeatures, Flags: Version, Files: files(1)}, nil, ErrUnexpectedFD},
		{"set features", Message{Request: SetFeatures, Flags: Version, Payload: EncodeU64(5)}, uint64(5), nil},
		{"set features short", Message{Request: SetFeatures, Flags: Version, Payload: make([]byte, 4)}, nil, ErrPayloadSize},
		{"set owner", Message{Request: SetOwner, Flags: Version}, nil, nil},
		{"reply flag on request", Message{Request: SetOwner, Flags: Version | FlagReply}, nil, ErrBadHeader},
		{"vring num", Message{Request: SetVringNum, Flags: Version, Payload: VringState{1, 256}.Encode()}, VringState{1, 256}, nil},
		{"vring addr", Message{Request: SetVringAddr, Flags: Version, Payload: VringAddr{Desc: 1}.Encode()}, VringAddr{Desc: 1}, nil},
		{"vring addr short", Message{Request: SetVringAddr, Flags: Version, Payload: make([]byte, 8)}, nil, ErrPayloadSize},
		{"kick", Message{Request: SetVringKick, Flags: Version, Payload: EncodeVringFD(2, false), Files: files(1)}, VringFD{Index: 2}, nil},
		{"kick missing fd", Message{Request: SetVringKick, Flags: Version, Payload: EncodeVringFD(2, false)}, nil, ErrMissingFD},
		{"backend req fd", Message{Request: SetBackendReqFD, Flags: Version, Files: files(1)}, nil, nil},
		{"backend req no fd", Message{Request: SetBackendReqFD, Flags: Version}, nil, ErrMissingFD},
		{"backend req two fds", Message{Request: SetBackendReqFD, Flags: Version, Files: files(2)}, nil, ErrUnexpectedFD},
		{"backend req payload", Message{Request: SetBackendReqFD, Flags: Version, Payload: EncodeU64(1), Files: files(1)}, nil, ErrPayloadSize},
		{"kick polling", Message{Request: SetVringKick, Flags: Version, Payload: EncodeVringFD(2, true)}, VringFD{Index: 2, NoFD: true}, nil},
		{"kick polling with fd", Message{Request: SetVringKick, Flags: Version, Payload: EncodeVringFD(2, true), Files: files(1)}, nil, ErrUnexpectedFD},
		{"call two fds", Message{Request: SetVringCall, Flags: Version, Payload: EncodeVringFD(0, false), Files: files(2)}, nil, ErrUnexpectedFD},
		{"err", Message{Request: SetVringErr, Flags: Version, Payload: EncodeVringFD(0, false), Files: files(1)}, VringFD{}, nil},
		{"mem table", Message{Request: SetMemTable, Flags: Version, Payload: EncodeMemTable([]MemRegion{region}), Files: files(1)}, nil, nil},
		{"mem table missing fd", Message{Request: SetMemTable, Flags: Version, Payload: EncodeMemTable([]MemRegion{region})}, nil, ErrMissingFD},
		{"mem table extra fd", Message{Request: SetMemTable, Flags: Version, Payload: EncodeMemTable([]MemRegion{region}), Files: files(2)}, nil, ErrUnexpectedFD},
		{"too many fds", Message{Request: SetMemTable, Flags: Version, Payload: EncodeMemTable([]MemRegion{region}), Files: files(9)}, nil, ErrTooManyFDs},
		{"add mem reg", Message{Request: AddMemReg, Flags: Version, Payload: EncodeSingleMemRegion(region), Files: files(1)}, region, nil},
		{"add mem reg no fd", Message{Request: AddMemReg, Flags: Version, Payload: EncodeSingleMemRegion(region)}, nil, ErrMissingFD},
		{"rem mem reg", Message{Request: RemMemReg, Flags: Version, Payload: EncodeSingleMemRegion(region)}, region, nil},
		{"rem mem reg stray fd", Message{Request: RemMemReg, Flags: Version, Payload: EncodeSingleMemRegion(region), Files: files(1)}, region, nil},
		{"rem mem reg two fds", Message{Request: RemMemReg, Flags: Version, Payload: EncodeSingleMemRegion(region), Files: files(2)}, nil, ErrUnexpectedFD},
		{"get config", Message{Request: GetConfig, Flags: Version, Payload: ConfigSpace{Data: make([]byte, 8)}.Encode()}, nil, nil},
		{"unknown", Message{Request: 200, Flags: Version}, nil, ErrUnknownRequest},
		{"unsupported", Message{Request: SetLogBase, Flags: Version, Payload: EncodeU64(0)}, nil, ErrUnknownRequest},
		{"get inflight", Message{Request: GetInflightFD, Flags: Version, Payload: Inflight{NumQueues: 1, QueueSize: 128}.Encode()}, Inflight{NumQueues: 1, QueueSize: 128}, nil},
		{"get inflight empty", Message{Request: GetInflightFD, Flags: Version}, nil, ErrPayloadSize},
		{"get inflight fd", Message{Request: GetInflightFD, Flags: Version, Payload: Inflight{}.Encode(), Files: files(1)}, nil, ErrUnexpectedFD},
		{"get inflight packed size", Message{Request: GetInflightFD, Flags: Version, Payload: make([]byte, 20)}, nil, ErrPayloadSize},
		{"set inflight", Message{Request: SetInflightFD, Flags: Version, Payload: Inflight{MmapSize: 4096, NumQueues: 1, QueueSize: 128}.Encode(), Files: files(1)}, Inflight{MmapSize: 4096, NumQueues: 1, QueueSize: 128}, nil},
		{"set inflight no fd", Message{Request: SetInflightFD, Flags: Version, Payload: Inflight{MmapSize: 4096}.Encode()}, nil, ErrMissingFD},
		{"max slots", Message{Request: GetMaxMemSlots, Flags: Version}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRequest(&tt.m)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil || tt.want == nil {
				return
			}
			if got != tt.want {
				t.Fatalf("got %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestParseReply(t *testing.T) {
	tests := []struct {
		name    string
		req     Request
		ack     bool
		m       Message
		wantErr error
	}{
		{"features", GetFeatures, false, Message{Request: GetFeatures, Flags: Version | FlagReply, Payload: EncodeU64(1)}, nil},
		{"no reply flag", GetFeatures, false, Message{Request: GetFeatures, Flags: Version, Payload: EncodeU64(1)}, ErrBadHeader},
		{"wrong request", GetFeatures, false, Message{Request: GetQueueNum, Flags: Version | FlagReply, Payload: EncodeU64(1)}, ErrBadHeader},
		{"short", GetFeatures, false, Message{Request: GetFeatures, Flags: Version | FlagReply, Payload: make([]byte, 4)}, ErrPayloadSize},
		{"fd in reply", GetFeatures, false, Message{Request: GetFeatures, Flags: Version | FlagReply, Payload: EncodeU64(1), Files: make([]*os.File, 1)}, ErrUnexpectedFD},
		{"ack", SetOwner, true, Message{Request: SetOwner, Flags: Version | FlagReply, Payload: EncodeU64(0)}, nil},
		{"no reply expected", SetOwner, false, Message{Request: SetOwner, Flags: Version | FlagReply, Payload: EncodeU64(0)}, ErrUnknownRequest},
		{"vring base", GetVringBase, false, Message{Request: GetVringBase, Flags: Version | FlagReply, Payload: VringState{0, 4}.Encode()}, nil},
		{"config refused", GetConfig, false, Message{Request: GetConfig, Flags: Version | FlagReply}, ErrBadPayload},
		{"config", GetConfig, false, Message{Request: GetConfig, Flags: Version | FlagReply, Payload: ConfigSpace{Data: []byte{1}}.Encode()}, nil},
		{"inflight", GetInflightFD, false, Message{Request: GetInflightFD, Flags: Version | FlagReply, Payload: Inflight{MmapSize: 4096}.Encode(), Files: make([]*os.File, 1)}, nil},
		{"inflight no fd", GetInflightFD, false, Message{Request: GetInflightFD, Flags: Version | FlagReply, Payload: Inflight{MmapSize: 4096}.Encode()}, ErrMissingFD},
		{"inflight none", GetInflightFD, false, Message{Request: GetInflightFD, Flags: Version | FlagReply, Payload: Inflight{}.Encode()}, ErrBadPayload},
		{"inflight two fds", GetInflightFD, false, Message{Request: GetInflightFD, Flags: Version | FlagReply, Payload: Inflight{MmapSize: 4096}.Encode(), Files: make([]*os.File, 2)}, ErrUnexpectedFD},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseReply(tt.req, tt.ack, &tt.m); !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestRequestString(t *testing.T) {
	if s := GetVringBase.String(); s != "GET_VRING_BASE" {
		t.Fatalf("got %q", s)
	}
	if s := Request(99).String(); s != "REQUEST_99" {
		t.Fatalf("got %q", s)
	}
}
