package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
)

// Errors returned by decoding and validation. They are wrapped with the
// request and the details.
var (
	ErrPayloadSize    = errors.New("wrong payload size")
	ErrPayloadTooBig  = errors.New("payload too large")
	ErrTooManyFDs     = errors.New("too many file descriptors")
	ErrMissingFD      = errors.New("file descriptor missing")
	ErrUnexpectedFD   = errors.New("unexpected file descriptor")
	ErrUnknownRequest = errors.New("unknown request")
	ErrBadHeader      = errors.New("bad message header")
	ErrBadPayload     = errors.New("bad payload value")
)

// le is the byte order: vhost-user uses native byte order; krun-core only
// runs on little-endian hosts (amd64, arm64).
var le = binary.LittleEndian

// Header is the fixed 12-byte message header.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

// Encode writes the header into b, which must be at least HeaderSize long.
func (h Header) Encode(b []byte) {
	le.PutUint32(b[0:], uint32(h.Request))
	le.PutUint32(b[4:], h.Flags)
	le.PutUint32(b[8:], h.Size)
}

// DecodeHeader parses a header and checks the version, the flag bits and
// the payload bound.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: %d bytes", ErrBadHeader, len(b))
	}
	h := Header{Request: Request(le.Uint32(b[0:])), Flags: le.Uint32(b[4:]), Size: le.Uint32(b[8:])}
	if h.Flags&VersionMask != Version {
		return h, fmt.Errorf("%w: %v: version %d", ErrBadHeader, h.Request, h.Flags&VersionMask)
	}
	if h.Flags&^knownFlags != 0 {
		return h, fmt.Errorf("%w: %v: unknown flags %#x", ErrBadHeader, h.Request, h.Flags)
	}
	if h.Size > MaxPayloadSize {
		return h, fmt.Errorf("%w: %v: %d bytes, at most %d", ErrPayloadTooBig, h.Request, h.Size, MaxPayloadSize)
	}
	return h, nil
}

// Message is one message with its payload and the file descriptors that came
// with it. Whoever holds a received Message owns Files and must close them
// (CloseFiles) or take them over.
type Message struct {
	Request Request
	Flags   uint32
	Payload []byte
	Files   []*os.File
}

// NeedReply reports whether the sender set the need_reply flag.
func (m *Message) NeedReply() bool { return m.Flags&FlagNeedReply != 0 }

// IsReply reports whether the reply flag is set.
func (m *Message) IsReply() bool { return m.Flags&FlagReply != 0 }

// CloseFiles closes every file still attached to the message and forgets
// them.
func (m *Message) CloseFiles() {
	for _, f := range m.Files {
		if f != nil {
			f.Close()
		}
	}
	m.Files = nil
}

// TakeFile removes file i from the message and returns it (nil if absent),
// so that CloseFiles no longer closes it.
func (m *Message) TakeFile(i int) *os.File {
	if i < 0 || i >= len(m.Files) {
		return nil
	}
	f := m.Files[i]
	m.Files[i] = nil
	return f
}

// ---- payloads ----

// U64 payload size.
const u64Size = 8

// EncodeU64 encodes a single u64 payload.
func EncodeU64(v uint64) []byte {
	b := make([]byte, u64Size)
	le.PutUint64(b, v)
	return b
}

// DecodeU64 decodes a single u64 payload of exactly 8 bytes.
func DecodeU64(p []byte) (uint64, error) {
	if len(p) != u64Size {
		return 0, fmt.Errorf("%w: u64 payload is %d bytes, want %d", ErrPayloadSize, len(p), u64Size)
	}
	return le.Uint64(p), nil
}

// VringState is the vring state description (index, num).
type VringState struct {
	Index uint32
	Num   uint32
}

// VringStateSize is the encoded size of a VringState.
const VringStateSize = 8

// Encode returns the wire form.
func (s VringState) Encode() []byte {
	b := make([]byte, VringStateSize)
	le.PutUint32(b[0:], s.Index)
	le.PutUint32(b[4:], s.Num)
	return b
}

// DecodeVringState decodes an exactly-sized vring state.
func DecodeVringState(p []byte) (VringState, error) {
	if len(p) != VringStateSize {
		return VringState{}, fmt.Errorf("%w: vring state is %d bytes, want %d", ErrPayloadSize, len(p), VringStateSize)
	}
	return VringState{Index: le.Uint32(p[0:]), Num: le.Uint32(p[4:])}, nil
}

// VringAddr is the vring address description. Desc, Used and Avail are
// front-end virtual addresses (the user addresses of the memory table).
type VringAddr struct {
	Index uint32
	Flags uint32
	Desc  uint64
	Used  uint64
	Avail uint64
	Log   uint64
}

// VringAddrSize is the encoded size of a VringAddr.
const VringAddrSize = 40

// Encode returns the wire form.
func (a VringAddr) Encode() []byte {
	b := make([]byte, VringAddrSize)
	le.PutUint32(b[0:], a.Index)
	le.PutUint32(b[4:], a.Flags)
	le.PutUint64(b[8:], a.Desc)
	le.PutUint64(b[16:], a.Used)
	le.PutUint64(b[24:], a.Avail)
	le.PutUint64(b[32:], a.Log)
	return b
}

// DecodeVringAddr decodes an exactly-sized vring address description and
// refuses unknown flags.
func DecodeVringAddr(p []byte) (VringAddr, error) {
	if len(p) != VringAddrSize {
		return VringAddr{}, fmt.Errorf("%w: vring address is %d bytes, want %d", ErrPayloadSize, len(p), VringAddrSize)
	}
	a := VringAddr{
		Index: le.Uint32(p[0:]),
		Flags: le.Uint32(p[4:]),
		Desc:  le.Uint64(p[8:]),
		Used:  le.Uint64(p[16:]),
		Avail: le.Uint64(p[24:]),
		Log:   le.Uint64(p[32:]),
	}
	if a.Flags&^VringFlagLog != 0 {
		return a, fmt.Errorf("%w: vring address flags %#x", ErrBadPayload, a.Flags)
	}
	return a, nil
}

// MemRegion is one memory region description.
type MemRegion struct {
	GuestAddr  uint64
	Size       uint64
	UserAddr   uint64
	MmapOffset uint64
}

// MemRegionSize is the encoded size of one region.
const MemRegionSize = 32

func (r MemRegion) put(b []byte) {
	le.PutUint64(b[0:], r.GuestAddr)
	le.PutUint64(b[8:], r.Size)
	le.PutUint64(b[16:], r.UserAddr)
	le.PutUint64(b[24:], r.MmapOffset)
}

func getMemRegion(b []byte) MemRegion {
	return MemRegion{
		GuestAddr:  le.Uint64(b[0:]),
		Size:       le.Uint64(b[8:]),
		UserAddr:   le.Uint64(b[16:]),
		MmapOffset: le.Uint64(b[24:]),
	}
}

// Check verifies that the region is non-empty and that none of its guest,
// user or file ranges overflows 64 bits.
func (r MemRegion) Check() error {
	switch {
	case r.Size == 0:
		return fmt.Errorf("%w: empty memory region at guest %#x", ErrBadPayload, r.GuestAddr)
	case r.GuestAddr+(r.Size-1) < r.GuestAddr:
		return fmt.Errorf("%w: memory region guest range %#x+%#x overflows", ErrBadPayload, r.GuestAddr, r.Size)
	case r.UserAddr+(r.Size-1) < r.UserAddr:
		return fmt.Errorf("%w: memory region user range %#x+%#x overflows", ErrBadPayload, r.UserAddr, r.Size)
	case r.MmapOffset+(r.Size-1) < r.MmapOffset:
		return fmt.Errorf("%w: memory region file range %#x+%#x overflows", ErrBadPayload, r.MmapOffset, r.Size)
	}
	return nil
}

// Overlaps reports whether two (checked) regions share guest or user
// addresses.
func (r MemRegion) Overlaps(o MemRegion) bool {
	return rangesOverlap(r.GuestAddr, r.Size, o.GuestAddr, o.Size) ||
		rangesOverlap(r.UserAddr, r.Size, o.UserAddr, o.Size)
}

func rangesOverlap(a, n, b, m uint64) bool {
	return a <= b+(m-1) && b <= a+(n-1)
}

// CheckMemRegions checks every region (Check) and that no two overlap.
func CheckMemRegions(rs []MemRegion) error {
	for i, r := range rs {
		if err := r.Check(); err != nil {
			return fmt.Errorf("region %d: %w", i, err)
		}
		for j := 0; j < i; j++ {
			if r.Overlaps(rs[j]) {
				return fmt.Errorf("%w: memory regions %d and %d overlap", ErrBadPayload, j, i)
			}
		}
	}
	return nil
}

// EncodeMemTable encodes a SET_MEM_TABLE payload.
func EncodeMemTable(rs []MemRegion) []byte {
	b := make([]byte, 8+MemRegionSize*len(rs))
	le.PutUint32(b[0:], uint32(len(rs)))
	for i, r := range rs {
		r.put(b[8+MemRegionSize*i:])
	}
	return b
}

// DecodeMemTable decodes a SET_MEM_TABLE payload: 1 to MaxMemTableRegions
// regions, exact size, zero padding, each region checked (CheckMemRegions).
func DecodeMemTable(p []byte) ([]MemRegion, error) {
	if len(p) < 8 {
		return nil, fmt.Errorf("%w: memory table is %d bytes", ErrPayloadSize, len(p))
	}
	n := le.Uint32(p[0:])
	if n == 0 || n > MaxMemTableRegions {
		return nil, fmt.Errorf("%w: memory table has %d regions, want 1..%d", ErrBadPayload, n, MaxMemTableRegions)
	}
	if want := 8 + MemRegionSize*int(n); len(p) != want {
		return nil, fmt.Errorf("%w: memory table with %d regions is %d bytes, want %d", ErrPayloadSize, n, len(p), want)
	}
	if pad := le.Uint32(p[4:]); pad != 0 {
		return nil, fmt.Errorf("%w: memory table padding %#x", ErrBadPayload, pad)
	}
	rs := make([]MemRegion, n)
	for i := range rs {
		rs[i] = getMemRegion(p[8+MemRegionSize*i:])
	}
	if err := CheckMemRegions(rs); err != nil {
		return nil, err
	}
	return rs, nil
}

// SingleMemRegionSize is the encoded size of an ADD_MEM_REG/REM_MEM_REG
// payload (8 bytes padding + one region).
const SingleMemRegionSize = 8 + MemRegionSize

// EncodeSingleMemRegion encodes an ADD_MEM_REG/REM_MEM_REG payload.
func EncodeSingleMemRegion(r MemRegion) []byte {
	b := make([]byte, SingleMemRegionSize)
	r.put(b[8:])
	return b
}

// DecodeSingleMemRegion decodes an ADD_MEM_REG/REM_MEM_REG payload and
// checks the region. The padding is ignored, as QEMU does not clear it.
func DecodeSingleMemRegion(p []byte) (MemRegion, error) {
	if len(p) != SingleMemRegionSize {
		return MemRegion{}, fmt.Errorf("%w: memory region is %d bytes, want %d", ErrPayloadSize, len(p), SingleMemRegionSize)
	}
	r := getMemRegion(p[8:])
	if err := r.Check(); err != nil {
		return r, err
	}
	return r, nil
}

// ConfigSpace is the GET_CONFIG/SET_CONFIG payload.
type ConfigSpace struct {
	Offset uint32
	Flags  uint32
	Data   []byte // len(Data) is the size field
}

// ConfigHeaderSize is the size of offset, size and flags.
const ConfigHeaderSize = 12

// Encode returns the wire form.
func (c ConfigSpace) Encode() []byte {
	b := make([]byte, ConfigHeaderSize+len(c.Data))
	le.PutUint32(b[0:], c.Offset)
	le.PutUint32(b[4:], uint32(len(c.Data)))
	le.PutUint32(b[8:], c.Flags)
	copy(b[ConfigHeaderSize:], c.Data)
	return b
}

// DecodeConfigSpace decodes a config payload: size at most MaxConfigSize,
// payload exactly 12+size bytes, flags 0 or 1, offset+size not overflowing
// MaxConfigSize. Data aliases p.
func DecodeConfigSpace(p []byte) (ConfigSpace, error) {
	if len(p) < ConfigHeaderSize {
		return ConfigSpace{}, fmt.Errorf("%w: config payload is %d bytes", ErrPayloadSize, len(p))
	}
	c := ConfigSpace{Offset: le.Uint32(p[0:]), Flags: le.Uint32(p[8:])}
	size := le.Uint32(p[4:])
	if size > MaxConfigSize {
		return c, fmt.Errorf("%w: config access of %d bytes, at most %d", ErrBadPayload, size, MaxConfigSize)
	}
	if uint64(len(p)) != ConfigHeaderSize+uint64(size) {
		return c, fmt.Errorf("%w: config payload is %d bytes for size %d", ErrPayloadSize, len(p), size)
	}
	if c.Offset > MaxConfigSize || MaxConfigSize-c.Offset < size {
		return c, fmt.Errorf("%w: config access %#x+%d beyond %d bytes", ErrBadPayload, c.Offset, size, MaxConfigSize)
	}
	if c.Flags != ConfigFlagWritable && c.Flags != ConfigFlagMigration {
		return c, fmt.Errorf("%w: config flags %#x", ErrBadPayload, c.Flags)
	}
	c.Data = p[ConfigHeaderSize:]
	return c, nil
}

// DecodeVringFD decodes the u64 payload of SET_VRING_KICK/CALL/ERR: the ring
// index in bits 0-7 and the no-fd (polling) flag in bit 8; other bits must be
// clear.
func DecodeVringFD(p []byte) (index uint32, noFD bool, err error) {
	v, err := DecodeU64(p)
	if err != nil {
		return 0, false, err
	}
	if v&^(VringIdxMask|VringNoFDFlag) != 0 {
		return 0, false, fmt.Errorf("%w: vring fd payload %#x has reserved bits set", ErrBadPayload, v)
	}
	return uint32(v & VringIdxMask), v&VringNoFDFlag != 0, nil
}

// EncodeVringFD encodes the u64 payload of SET_VRING_KICK/CALL/ERR.
func EncodeVringFD(index uint32, noFD bool) []byte {
	v := uint64(index) & VringIdxMask
	if noFD {
		v |= VringNoFDFlag
	}
	return EncodeU64(v)
}

// Inflight is the inflight description of GET_INFLIGHT_FD and
// SET_INFLIGHT_FD (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): where in the
// accompanying file the shared inflight region lies, and the queue count
// and queue size it was laid out for.
type Inflight struct {
	MmapSize   uint64
	MmapOffset uint64
	NumQueues  uint16
	QueueSize  uint16
}

// QueueBytes is the size of one queue's part of a split-ring inflight
// region laid out for i.QueueSize descriptors, in the layout of QEMU's
// libvhost-user and of this module's back-end framework: a 16-byte header
// and 16 bytes a descriptor, rounded up to 64 bytes. Queue n's part starts
// n*QueueBytes into the region.
func (i Inflight) QueueBytes() uint64 {
	return (16 + 16*uint64(i.QueueSize) + 63) &^ 63
}

// InflightStateBytes is the part of an inflight region after the queues'
// parts (QueueBytes each) that this module's back-ends keep for the
// device's own flags (backend.DeviceState): they describe the device's
// backing store, not the virtio device, so a front-end keeps them across
// a device reset, which zeroes the queues' parts.
const InflightStateBytes = 64

// InflightSize is the encoded size of an Inflight: the spec's four fields
// (20 bytes) padded to the 8-byte alignment of the C structure, which is
// what QEMU, libvhost-user and DPDK send and expect.
const InflightSize = 24

// Encode returns the wire form (padding zero).
func (i Inflight) Encode() []byte {
	b := make([]byte, InflightSize)
	le.PutUint64(b[0:], i.MmapSize)
	le.PutUint64(b[8:], i.MmapOffset)
	le.PutUint16(b[16:], i.NumQueues)
	le.PutUint16(b[18:], i.QueueSize)
	return b
}

// DecodeInflight decodes an exactly-sized inflight description. The
// padding is ignored; the values are checked by whoever uses them.
func DecodeInflight(p []byte) (Inflight, error) {
	if len(p) != InflightSize {
		return Inflight{}, fmt.Errorf("%w: inflight description is %d bytes, want %d", ErrPayloadSize, len(p), InflightSize)
	}
	return Inflight{
		MmapSize:   le.Uint64(p[0:]),
		MmapOffset: le.Uint64(p[8:]),
		NumQueues:  le.Uint16(p[16:]),
		QueueSize:  le.Uint16(p[18:]),
	}, nil
}
