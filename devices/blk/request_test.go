package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// memDisk is an in-memory disk.Disk that records what the device asked of it
// and flags any access outside its size (which the device must never make).
type memDisk struct {
	mu        sync.Mutex
	data      []byte
	ro        bool
	flushes   int
	discards  [][2]int64
	zeroes    [][3]int64 // off, n, unmap
	violation error
	failIO    bool
}

func newMemDisk(size int) *memDisk { return &memDisk{data: make([]byte, size)} }

func (m *memDisk) bad(op string, off, n int64) error {
	if off < 0 || n < 0 || off > int64(len(m.data)) || n > int64(len(m.data))-off {
		m.violation = errors.New(op + " out of range")
		return disk.ErrOutOfRange
	}
	if m.failIO {
		return errors.New("injected I/O error")
	}
	return nil
}

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.bad("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(p, m.data[off:]), nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ro {
		m.violation = errors.New("write to read-only disk")
		return 0, disk.ErrReadOnly
	}
	if err := m.bad("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

func (m *memDisk) Size() int64 { return int64(len(m.data)) }
func (m *memDisk) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	if m.failIO {
		return errors.New("injected flush error")
	}
	return nil
}

func (m *memDisk) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.bad("discard", off, n); err != nil {
		return err
	}
	m.discards = append(m.discards, [2]int64{off, n})
	clear(m.data[off : off+n])
	return nil
}

func (m *memDisk) WriteZeroes(off, n int64, unmap bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.bad("write zeroes", off, n); err != nil {
		return err
	}
	u := int64(0)
	if unmap {
		u = 1
	}
	m.zeroes = append(m.zeroes, [3]int64{off, n, u})
	clear(m.data[off : off+n])
	return nil
}

func (m *memDisk) ReadOnly() bool { return m.ro }
func (m *memDisk) Close() error   { return nil }

// vecMemDisk adds the vectored interface, to test both I/O paths.
type vecMemDisk struct{ *memDisk }

func (v vecMemDisk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	n := 0
	for _, b := range bufs {
		k, err := v.ReadAt(b, off+int64(n))
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (v vecMemDisk) WritevAt(bufs [][]byte, off int64) (int, error) {
	n := 0
	for _, b := range bufs {
		k, err := v.WriteAt(b, off+int64(n))
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

const allFeatures = 1<<FeatureFlush | 1<<FeatureDiscard | 1<<FeatureWriteZeroes | 1<<FeatureMQ

func newTestDevice(t testing.TB, dsk disk.Disk, features uint64) *Device {
	t.Helper()
	d, err := New(Config{Disk: dsk, Serial: "krun-test-serial"})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetFeatures(features); err != nil {
		t.Fatal(err)
	}
	return d
}

func header(typ uint32, sector uint64) []byte {
	h := make([]byte, HeaderSize)
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

func rangeSeg(sector uint64, n, flags uint32) []byte {
	s := make([]byte, SegmentSize)
	binary.LittleEndian.PutUint64(s[0:], sector)
	binary.LittleEndian.PutUint32(s[8:], n)
	binary.LittleEndian.PutUint32(s[12:], flags)
	return s
}

// split cuts b into pieces of the given sizes (the last piece takes the
// rest), the way a guest may spread one buffer over several descriptors.
func split(b []byte, sizes ...int) [][]byte {
	var out [][]byte
	for _, s := range sizes {
		if s > len(b) {
			s = len(b)
		}
		out = append(out, b[:s:s])
		b = b[s:]
	}
	return append(out, b)
}

func cat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

func patternBytes(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed ^ byte(i) ^ byte(i>>8)*31
	}
	return b
}

func lastByte(wr [][]byte) byte {
	for i := len(wr) - 1; i >= 0; i-- {
		if len(wr[i]) > 0 {
			return wr[i][len(wr[i])-1]
		}
	}
	return 0xff
}

func TestReadWriteSegmentations(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name   string
		sector uint64
		n      int
		rdCut  []int // how the readable side (header+data) is split
		wrCut  []int // how the writable side (data+status) is split
	}{
		{"linux layout 4K", 8, 4096, []int{16}, []int{4096}},
		{"first sector", 0, 512, []int{16}, []int{512}},
		{"last sector", size/512 - 1, 512, []int{16}, []int{512}},
		{"status with data", 100, 1024, []int{16}, nil},
		{"header split", 3, 512, []int{5, 11}, []int{512}},
		{"header and data in one", 7, 512, nil, []int{512}},
		{"scattered pages", 64, 64 << 10, []int{16, 4096, 4096, 100, 3996, 0, 0, 4096}, []int{4096, 4096, 4096, 3000, 1096}},
		{"empty descriptors", 9, 1536, []int{0, 16, 0, 512, 0}, []int{0, 512, 0, 1024, 0}},
		{"zero length", 5, 0, []int{16}, nil},
	}
	for _, vec := range []bool{false, true} {
		for i, tc := range tests {
			name := tc.name
			if vec {
				name += " vectored"
			}
			t.Run(name, func(t *testing.T) {
				md := newMemDisk(size)
				var dsk disk.Disk = md
				if vec {
					dsk = vecMemDisk{md}
				}
				d := newTestDevice(t, dsk, allFeatures)
				h := d.NewHandler()
				data := patternBytes(tc.n, byte(i))

				// Write.
				status := []byte{0xff}
				rd := split(cat(header(TypeOut, tc.sector), data), tc.rdCut...)
				if used, _ := h.Handle(rd, [][]byte{status}); used != 1 {
					t.Fatalf("write used len %d, want 1", used)
				}
				if status[0] != StatusOK {
					t.Fatalf("write status %d", status[0])
				}
				off := tc.sector * 512
				if !bytes.Equal(md.data[off:off+uint64(tc.n)], data) {
					t.Fatal("disk content differs after write")
				}

				// Read back.
				in := bytes.Repeat([]byte{0xee}, tc.n+1)
				wr := split(in, tc.wrCut...)
				used, _ := h.Handle([][]byte{header(TypeIn, tc.sector)}, wr)
				if used != uint32(tc.n+1) {
					t.Fatalf("read used len %d, want %d", used, tc.n+1)
				}
				if in[tc.n] != StatusOK {
					t.Fatalf("read status %d", in[tc.n])
				}
				if !bytes.Equal(in[:tc.n], data) {
					t.Fatal("read data differs")
				}
				s := d.Stats()
				if s.Reads != 1 || s.Writes != 1 || s.BytesRead != uint64(tc.n) || s.BytesWritten != uint64(tc.n) {
					t.Fatalf("stats %+v", s)
				}
				if md.violation != nil {
					t.Fatal(md.violation)
				}
			})
		}
	}
}

// TestHostileRequests sends malformed requests; each must fail with the
// right status and counter, leave the disk untouched and never panic.
func TestHostileRequests(t *testing.T) {
	const size = 64 << 10 // 128 sectors
	const capSectors = size / 512
	type req struct {
		rd [][]byte
		wr [][]byte
	}
	tests := []struct {
		name     string
		ro       bool
		features uint64
		req      req
		status   int // -1: no status byte
		counter  func(Stats) uint64
	}{
		{"no writable bytes", false, allFeatures, req{rd: [][]byte{header(TypeIn, 0)}}, -1, func(s Stats) uint64 { return s.NoStatus }},
		{"no readable bytes", false, allFeatures, req{wr: [][]byte{make([]byte, 513)}}, StatusIOErr, func(s Stats) uint64 { return s.ShortHeader }},
		{"header 15 bytes", false, allFeatures, req{rd: [][]byte{header(TypeIn, 0)[:15]}, wr: [][]byte{make([]byte, 513)}}, StatusIOErr, func(s Stats) uint64 { return s.ShortHeader }},
		{"read not sector multiple", false, allFeatures, req{rd: [][]byte{header(TypeIn, 0)}, wr: [][]byte{make([]byte, 100), {0}}}, StatusIOErr, func(s Stats) uint64 { return s.BadLength }},
		{"write not sector multiple", false, allFeatures, req{rd: [][]byte{header(TypeOut, 0), make([]byte, 511)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.BadLength }},
		{"read past end", false, allFeatures, req{rd: [][]byte{header(TypeIn, capSectors-1)}, wr: [][]byte{make([]byte, 1024), {0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"read at capacity", false, allFeatures, req{rd: [][]byte{header(TypeIn, capSectors)}, wr: [][]byte{make([]byte, 512), {0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"write sector overflow", false, allFeatures, req{rd: [][]byte{header(TypeOut, 1<<63), make([]byte, 512)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"write sector max", false, allFeatures, req{rd: [][]byte{header(TypeOut, ^uint64(0)), make([]byte, 512)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"unknown type", false, allFeatures, req{rd: [][]byte{header(77, 0)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"legacy scsi", false, allFeatures, req{rd: [][]byte{header(2, 0)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"barrier bit", false, allFeatures, req{rd: [][]byte{header(0x80000001, 0), make([]byte, 512)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"get lifetime", false, allFeatures, req{rd: [][]byte{header(TypeGetLifetime, 0)}, wr: [][]byte{make([]byte, 9)}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"secure erase", false, allFeatures, req{rd: [][]byte{header(TypeSecureErase, 0), rangeSeg(0, 1, 0)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"get id too small", false, allFeatures, req{rd: [][]byte{header(TypeGetID, 0)}, wr: [][]byte{make([]byte, 19), {0}}}, StatusIOErr, func(s Stats) uint64 { return s.ShortID }},
		{"write read-only", true, allFeatures, req{rd: [][]byte{header(TypeOut, 0), make([]byte, 512)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.ReadOnly }},
		{"discard read-only", true, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, 8, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.ReadOnly }},
		{"write zeroes read-only", true, allFeatures, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(0, 8, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.ReadOnly }},
		{"discard not negotiated", false, 1 << FeatureFlush, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, 8, 0)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"write zeroes not negotiated", false, 1 << FeatureFlush, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(0, 8, 0)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.Unsupported }},
		{"discard no ranges", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.BadLength }},
		{"discard partial range", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, 8, 0)[:15]}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.BadLength }},
		{"discard too many ranges", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), bytes.Repeat(rangeSeg(0, 1, 0), DefaultMaxSegments+1)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.TooManySegments }},
		{"discard unmap flag", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, 8, FlagUnmap)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.BadFlags }},
		{"write zeroes unknown flag", false, allFeatures, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(0, 8, 2)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.BadFlags }},
		{"discard past end", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(capSectors-4, 8, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"write zeroes sector overflow", false, allFeatures, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(^uint64(0)-1, 8, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
		{"discard range too long", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, DefaultMaxSectors+1, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.TooManySectors }},
		{"bad flags after a bad range", false, allFeatures, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(capSectors, 1, 0), rangeSeg(0, 8, 2)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.BadFlags }},
		{"discard unmap after a long range", false, allFeatures, req{rd: [][]byte{header(TypeDiscard, 0), rangeSeg(0, DefaultMaxSectors+1, 0), rangeSeg(0, 8, FlagUnmap)}, wr: [][]byte{{0}}}, StatusUnsupp, func(s Stats) uint64 { return s.BadFlags }},
		{"second range bad, first not applied", false, allFeatures, req{rd: [][]byte{header(TypeWriteZeroes, 0), rangeSeg(0, 8, 0), rangeSeg(capSectors, 1, 0)}, wr: [][]byte{{0}}}, StatusIOErr, func(s Stats) uint64 { return s.OutOfRange }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			md := newMemDisk(size)
			for i := range md.data {
				md.data[i] = 0x5a
			}
			md.ro = tc.ro
			d := newTestDevice(t, md, tc.features)
			used, _ := d.NewHandler().Handle(tc.req.rd, tc.req.wr)
			if tc.status < 0 {
				if used != 0 {
					t.Fatalf("used %d, want 0", used)
				}
			} else {
				if got := lastByte(tc.req.wr); int(got) != tc.status {
					t.Fatalf("status %d, want %d", got, tc.status)
				}
				if used != uint32(segLen(tc.req.wr)) {
					t.Fatalf("used %d, want %d", used, segLen(tc.req.wr))
				}
			}
			if got := tc.counter(d.Stats()); got != 1 {
				t.Fatalf("counter = %d, want 1 (stats %+v)", got, d.Stats())
			}
			if md.violation != nil {
				t.Fatal(md.violation)
			}
			if !bytes.Equal(md.data, bytes.Repeat([]byte{0x5a}, size)) {
				t.Fatal("a failed request changed the disk")
			}
			if len(md.discards)+len(md.zeroes) != 0 {
				t.Fatal("a failed request discarded or zeroed")
			}
		})
	}
}

func TestFlushAndWriteThrough(t *testing.T) {
	md := newMemDisk(1 << 20)
	d := newTestDevice(t, md, allFeatures)
	h := d.NewHandler()
	st := []byte{0xff}
	h.Handle([][]byte{header(TypeOut, 0), make([]byte, 512)}, [][]byte{st})
	if md.flushes != 0 {
		t.Fatalf("write with FLUSH negotiated flushed %d times", md.flushes)
	}
	h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
	if st[0] != StatusOK || md.flushes != 1 || d.Stats().Flushes != 1 {
		t.Fatalf("flush: status %d, disk flushes %d", st[0], md.flushes)
	}

	// Without VIRTIO_BLK_F_FLUSH the cache is write-through.
	if err := d.SetFeatures(1 << FeatureDiscard); err != nil {
		t.Fatal(err)
	}
	h.Handle([][]byte{header(TypeOut, 0), make([]byte, 512)}, [][]byte{st})
	if st[0] != StatusOK || md.flushes != 2 {
		t.Fatalf("write-through write: status %d, flushes %d", st[0], md.flushes)
	}
	h.Handle([][]byte{header(TypeDiscard, 0), rangeSeg(0, 8, 0)}, [][]byte{st})
	if st[0] != StatusOK || md.flushes != 3 {
		t.Fatalf("write-through discard: status %d, flushes %d", st[0], md.flushes)
	}

	// A failing flush reports IOERR.
	md.failIO = true
	h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
	if st[0] != StatusIOErr || d.Stats().IOErrors != 1 {
		t.Fatalf("failed flush: status %d, io errors %d", st[0], d.Stats().IOErrors)
	}
	h.Handle([][]byte{header(TypeIn, 0)}, [][]byte{make([]byte, 512), st})
	if st[0] != StatusIOErr || d.Stats().IOErrors != 2 {
		t.Fatalf("failed read: status %d", st[0])
	}
}

func TestGetID(t *testing.T) {
	d := newTestDevice(t, newMemDisk(4096), allFeatures)
	for _, n := range []int{IDBytes, IDBytes + 12} {
		buf := bytes.Repeat([]byte{0xcc}, n+1)
		used, _ := d.NewHandler().Handle([][]byte{header(TypeGetID, 0)}, split(buf, 7, 9))
		if buf[n] != StatusOK || used != uint32(n+1) {
			t.Fatalf("status %d used %d", buf[n], used)
		}
		want := append([]byte("krun-test-serial"), 0, 0, 0, 0)
		if !bytes.Equal(buf[:IDBytes], want) {
			t.Fatalf("id %q, want %q", buf[:IDBytes], want)
		}
	}
}

func TestDiscardWriteZeroes(t *testing.T) {
	md := newMemDisk(1 << 20)
	for i := range md.data {
		md.data[i] = 1
	}
	d := newTestDevice(t, md, allFeatures)
	h := d.NewHandler()
	st := []byte{0xff}
	// Two discard ranges, the ranges split across descriptors.
	rd := split(cat(header(TypeDiscard, 0), rangeSeg(8, 8, 0), rangeSeg(100, 3, 0)), 16, 10, 13)
	h.Handle(rd, [][]byte{st})
	if st[0] != StatusOK {
		t.Fatalf("discard status %d", st[0])
	}
	if len(md.discards) != 2 || md.discards[0] != [2]int64{8 * 512, 8 * 512} || md.discards[1] != [2]int64{100 * 512, 3 * 512} {
		t.Fatalf("discards %v", md.discards)
	}
	h.Handle([][]byte{header(TypeWriteZeroes, 0), rangeSeg(2047, 1, FlagUnmap), rangeSeg(0, 1, 0)}, [][]byte{st})
	if st[0] != StatusOK {
		t.Fatalf("write zeroes status %d", st[0])
	}
	if len(md.zeroes) != 2 || md.zeroes[0] != [3]int64{2047 * 512, 512, 1} || md.zeroes[1] != [3]int64{0, 512, 0} {
		t.Fatalf("zeroes %v", md.zeroes)
	}
	if md.data[0] != 0 || md.data[511] != 0 || md.data[512] != 1 || md.data[1<<20-1] != 0 {
		t.Fatal("zeroed range content wrong")
	}
	// Exactly the segment limit is fine.
	h.Handle([][]byte{header(TypeDiscard, 0), bytes.Repeat(rangeSeg(0, 1, 0), DefaultMaxSegments)}, [][]byte{st})
	if st[0] != StatusOK {
		t.Fatalf("discard with %d ranges: status %d", DefaultMaxSegments, st[0])
	}
}

func TestConfigSpace(t *testing.T) {
	tests := []struct {
		name string
		ro   bool
		cfg  Config
	}{
		{"rw", false, Config{NumQueues: 4, QueueSize: 128}},
		{"ro", true, Config{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			md := newMemDisk(10<<20 + 100) // partial last sector
			md.ro = tc.ro
			tc.cfg.Disk = md
			d, err := New(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			c := make([]byte, 72)
			if err := d.ReadConfig(0, c); err != nil {
				t.Fatal(err)
			}
			le := binary.LittleEndian
			if got := le.Uint64(c[0:]); got != 10<<20/512 {
				t.Errorf("capacity %d", got)
			}
			qs, nq := DefaultQueueSize, 1
			if tc.cfg.QueueSize != 0 {
				qs, nq = tc.cfg.QueueSize, tc.cfg.NumQueues
			}
			if got := le.Uint32(c[12:]); got != uint32(min(qs, maxSegChain)-2) {
				t.Errorf("seg_max %d", got)
			}
			if got := le.Uint32(c[20:]); got != 512 {
				t.Errorf("blk_size %d", got)
			}
			if got := le.Uint16(c[34:]); got != uint16(nq) {
				t.Errorf("num_queues %d", got)
			}
			f := d.Features()
			if tc.ro {
				if f&(1<<FeatureRO) == 0 || f&(1<<FeatureDiscard|1<<FeatureWriteZeroes) != 0 {
					t.Errorf("ro features %#x", f)
				}
				if !bytes.Equal(c[36:60], make([]byte, 24)) {
					t.Errorf("ro device advertises discard limits")
				}
			} else {
				if f&(1<<FeatureRO) != 0 || f&(1<<FeatureDiscard) == 0 || f&(1<<FeatureWriteZeroes) == 0 {
					t.Errorf("rw features %#x", f)
				}
				if le.Uint32(c[36:]) != DefaultMaxSectors || le.Uint32(c[40:]) != DefaultMaxSegments ||
					le.Uint32(c[44:]) != DefaultDiscardAlign || le.Uint32(c[48:]) != DefaultMaxSectors ||
					le.Uint32(c[52:]) != DefaultMaxSegments || c[56] != 1 {
					t.Errorf("discard/write-zeroes fields % x", c[36:60])
				}
			}
			if f&(1<<FeatureFlush|1<<FeatureMQ|1<<FeatureBlkSize|1<<FeatureSegMax) == 0 {
				t.Errorf("features %#x", f)
			}
			if !bytes.Equal(c[60:], make([]byte, 12)) {
				t.Errorf("bytes past the defined fields not zero")
			}
			// Partial reads see the same bytes.
			p := make([]byte, 4)
			if err := d.ReadConfig(34, p); err != nil || le.Uint16(p) != uint16(nq) {
				t.Errorf("partial read % x %v", p, err)
			}
			if err := d.ReadConfig(250, make([]byte, 10)); err == nil {
				t.Error("config read past 256 bytes accepted")
			}
			if err := d.ReadConfig(^uint32(0), make([]byte, 2)); err == nil {
				t.Error("config read at 4 GiB accepted")
			}
			if err := d.WriteConfig(32, []byte{1}); err == nil {
				t.Error("config write accepted")
			}
		})
	}
}

func TestNewValidation(t *testing.T) {
	md := newMemDisk(4096)
	for _, cfg := range []Config{
		{},
		{Disk: md, NumQueues: -1},
		{Disk: md, NumQueues: MaxQueues + 1},
		{Disk: md, QueueSize: 100},
		{Disk: md, QueueSize: 65536},
		{Disk: md, Serial: "this serial is longer than twenty"},
		{Disk: md, MaxDiscardSegments: 1000},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

func TestHandleNoAlloc(t *testing.T) {
	md := newMemDisk(1 << 20)
	for _, dsk := range []disk.Disk{md, vecMemDisk{md}} {
		d := newTestDevice(t, dsk, allFeatures)
		h := d.NewHandler()
		data := make([]byte, 64<<10)
		out := split(cat(header(TypeOut, 16), data), 16, 4096, 4096, 4096)
		in := split(make([]byte, 64<<10+1), 4096, 4096, 4096, 4096, 4096)
		st := [][]byte{{0}}
		hdrIn := [][]byte{header(TypeIn, 16)}
		dz := [][]byte{header(TypeWriteZeroes, 0), rangeSeg(0, 8, 0), rangeSeg(64, 8, 1)}
		bad := [][]byte{header(TypeIn, 1<<40)}
		// Warm up, then measure.
		h.Handle(out, st)
		h.Handle(hdrIn, in)
		allocs := testing.AllocsPerRun(50, func() {
			h.Handle(out, st)
			h.Handle(hdrIn, in)
			h.Handle(bad, in)
		})
		if allocs != 0 {
			t.Fatalf("request handling allocates %v times", allocs)
		}
		md.zeroes = make([][3]int64, 0, 1000) // the fake's own log may allocate otherwise
		allocs = testing.AllocsPerRun(50, func() { h.Handle(dz, st) })
		if allocs != 0 {
			t.Fatalf("write zeroes allocates %v times", allocs)
		}
	}
}

func TestConcurrentHandlers(t *testing.T) {
	const workers, per = 4, 200
	md := newMemDisk(workers * per * 4096)
	d := newTestDevice(t, vecMemDisk{md}, allFeatures)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := d.NewHandler()
			for i := 0; i < per; i++ {
				blk := uint64(w*per + i)
				st := []byte{0xff}
				h.Handle([][]byte{header(TypeOut, blk*8), patternBytes(4096, byte(blk))}, [][]byte{st})
				if st[0] != StatusOK {
					t.Error("write failed")
					return
				}
				in := make([]byte, 4097)
				h.Handle([][]byte{header(TypeIn, blk*8)}, [][]byte{in})
				if in[4096] != StatusOK || !bytes.Equal(in[:4096], patternBytes(4096, byte(blk))) {
					t.Error("read back differs")
					return
				}
			}
		}()
	}
	wg.Wait()
	if s := d.Stats(); s.Reads != workers*per || s.Writes != workers*per {
		t.Fatalf("stats %+v", s)
	}
}

// BenchmarkHandle is the device's own cost per request (parsing, checks,
// status, counters) over an in-memory disk: no rings, no system calls.
func BenchmarkHandle(b *testing.B) {
	md := newMemDisk(64 << 20)
	d := newTestDevice(b, vecMemDisk{md}, allFeatures)
	h := d.NewHandler()
	for _, bc := range []struct {
		name string
		rd   [][]byte
		wr   [][]byte
		n    int64
	}{
		{"read-4k", [][]byte{header(TypeIn, 8)}, [][]byte{make([]byte, 4096), {0}}, 4096},
		{"write-4k", [][]byte{header(TypeOut, 8), make([]byte, 4096)}, [][]byte{{0}}, 4096},
		{"read-64k-16seg", [][]byte{header(TypeIn, 8)}, split(make([]byte, 64<<10+1), 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096), 64 << 10},
		{"flush", [][]byte{header(TypeFlush, 0)}, [][]byte{{0}}, 0},
		{"bad-sector", [][]byte{header(TypeIn, 1<<40)}, [][]byte{make([]byte, 4096), {0}}, 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(bc.n)
			b.ReportAllocs()
			for b.Loop() {
				h.Handle(bc.rd, bc.wr)
			}
		})
	}
}

// TestInlineShapes: the chain shapes served on the ring's goroutine with
// SerialWrites (queueHandler.Inline) outside a stream of writes: writes of
// at most inlineWriteMax bytes; never a read, a flush, GET_ID, a long
// write, or what may be a DISCARD or WRITE_ZEROES request, whose ranges
// may take long to serve (they kept the whole queue waiting, reads
// included; found in review), nor a 512-byte write, which has the shape
// of 32 ranges.
func TestInlineShapes(t *testing.T) {
	d, err := New(Config{Disk: newMemDisk(1 << 20)})
	if err != nil {
		t.Fatal(err)
	}
	qc, err := d.Queue(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	rangesMax := qc.Handler.(*queueHandler).rangesMax
	if rangesMax != SegmentSize*DefaultMaxSegments {
		t.Fatalf("rangesMax %d, want %d", rangesMax, SegmentSize*DefaultMaxSegments)
	}
	for _, tc := range []struct {
		name   string
		rd, wr uint64
		want   bool
	}{
		{"4 KiB write", HeaderSize + 4096, 1, true},
		{"1 KiB write", HeaderSize + 1024, 1, true},
		{"512-byte write", HeaderSize + 512, 1, false},
		{"64 KiB write", HeaderSize + inlineWriteMax, 1, true},
		{"64 KiB + 512 write", HeaderSize + inlineWriteMax + 512, 1, false},
		{"1 MiB write", HeaderSize + 1<<20, 1, false},
		{"discard, one range", HeaderSize + SegmentSize, 1, false},
		{"discard, 31 ranges", HeaderSize + 31*SegmentSize, 1, false},
		{"discard, 32 ranges", HeaderSize + 32*SegmentSize, 1, false},
		{"flush", HeaderSize, 1, false},
		{"4 KiB read", HeaderSize, 4096 + 1, false},
		{"GET_ID", HeaderSize, 20 + 1, false},
		{"no status byte", HeaderSize + 4096, 0, false},
		{"header cut short", HeaderSize - 1, 1, false},
	} {
		h := &queueHandler{inlineWrites: true, rangesMax: rangesMax}
		if got := h.inline(tc.rd, tc.wr); got != tc.want {
			t.Errorf("%s (read %d, write %d): %v, want %v", tc.name, tc.rd, tc.wr, got, tc.want)
		}
	}
	// Alone on an idle ring, what may be ranges goes to a worker too
	// (Offload), with SerialWrites or without.
	for _, tc := range []struct {
		name   string
		rd, wr uint64
		want   bool
	}{
		{"discard, one range", HeaderSize + SegmentSize, 1, true},
		{"discard, 32 ranges", HeaderSize + 32*SegmentSize, 1, true},
		{"discard, 33 ranges (too many)", HeaderSize + 33*SegmentSize, 1, false},
		{"512-byte write", HeaderSize + 512, 1, true},
		{"4 KiB write", HeaderSize + 4096, 1, false},
		{"payload of 17 bytes", HeaderSize + 17, 1, false},
		{"4 KiB read", HeaderSize, 4096 + 1, false},
		{"flush", HeaderSize, 1, false},
	} {
		for _, serial := range []bool{false, true} {
			h := &queueHandler{inlineWrites: serial, rangesMax: rangesMax}
			if got := h.mayBeRanges(tc.rd, tc.wr); got != tc.want {
				t.Errorf("Offload, %s (read %d, write %d; serial writes %v): %v, want %v", tc.name, tc.rd, tc.wr, serial, got, tc.want)
			}
		}
	}
	// A read-only device takes no ranges: its 512-byte writes (refused)
	// keep the write's shape.
	rod := newMemDisk(1 << 20)
	rod.ro = true
	ro, err := New(Config{Disk: rod})
	if err != nil {
		t.Fatal(err)
	}
	if qc, err = ro.Queue(context.Background(), 0); err != nil {
		t.Fatal(err)
	}
	if m := qc.Handler.(*queueHandler).rangesMax; m != 0 {
		t.Fatalf("read-only device: rangesMax %d, want 0", m)
	}
}

// TestInlineStreak: long writes are served on the ring's goroutine once
// writeStreak writes came in a row, short or long; any other request,
// whether Inline sees it or it is handled on the ring's goroutine
// directly, ends the streak.
func TestInlineStreak(t *testing.T) {
	const (
		long  = HeaderSize + 1<<20
		short = HeaderSize + 4096
		read  = 4096 + 1
	)
	h := &queueHandler{inlineWrites: true}
	step := func(what string, rd, wr uint64, want bool) {
		t.Helper()
		if got := h.inline(rd, wr); got != want {
			t.Fatalf("%s (streak %d): inline %v, want %v", what, h.streak, got, want)
		}
	}
	for i := 1; i < writeStreak; i++ {
		step(fmt.Sprintf("long write %d", i), long, 1, false)
	}
	step("long write at the streak", long, 1, true)
	step("next long write", long, 1, true)
	step("a read", HeaderSize, read, false)
	step("long write after the read", long, 1, false)
	step("short write after the read", short, 1, true)
	for i := 3; i < writeStreak; i++ {
		step(fmt.Sprintf("long write %d after the read", i), long, 1, false)
	}
	step("long write at the streak again", long, 1, true)
	step("a flush", HeaderSize, 1, false)
	step("long write after the flush", long, 1, false)
	for i := 2; i <= writeStreak; i++ {
		h.inline(long, 1)
	}
	step("long write at the streak, third time", long, 1, true)
	h.handledOnRing(long, 1) // a write handled alone: the streak goes on
	step("long write after a write alone", long, 1, true)
	h.handledOnRing(HeaderSize, read) // a read handled alone ends it
	step("long write after a read alone", long, 1, false)
}

// TestIOErrorLogBounded: a guest that keeps writing to a failing disk
// (full, say) gets IOERR each time, every failure is counted, and the
// host's log gets one line, not one per request.
func TestIOErrorLogBounded(t *testing.T) {
	md := newMemDisk(64 << 10)
	logs := &syncbuf.Buffer{}
	d, err := New(Config{Disk: md, Serial: "krun-test-serial", Log: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetFeatures(allFeatures); err != nil {
		t.Fatal(err)
	}
	h := d.NewHandler()
	md.failIO = true
	const n = 1000
	st := []byte{0xff}
	for i := range n {
		h.Handle([][]byte{header(TypeOut, uint64(i%64)), make([]byte, 512)}, [][]byte{st})
		if st[0] != StatusIOErr {
			t.Fatalf("write %d to a failing disk: status %d, want IOERR", i, st[0])
		}
	}
	if got := d.Stats().IOErrors; got != n {
		t.Errorf("io errors = %d, want %d", got, n)
	}
	if lines := strings.Count(logs.String(), "\n"); lines != 1 {
		t.Errorf("%d failed writes wrote %d log lines, want 1:\n%s", n, lines, logs)
	}
}

// TestPartialSector: a disk whose size is not a multiple of 512 is served
// in whole sectors, and the device says once, at a warning, what it leaves
// out; a whole-sector disk logs nothing.
func TestPartialSector(t *testing.T) {
	for _, tc := range []struct {
		size     int
		capacity uint64
		warn     string
	}{
		{1000, 1, "unserved=488"},
		{511, 0, "unserved=511"},
		{4096, 8, ""},
	} {
		logs := &syncbuf.Buffer{}
		d, err := New(Config{Disk: newMemDisk(tc.size), Log: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
		if err != nil {
			t.Fatal(err)
		}
		if d.Capacity() != tc.capacity {
			t.Errorf("%d bytes: capacity %d sectors, want %d", tc.size, d.Capacity(), tc.capacity)
		}
		out := logs.String()
		switch {
		case tc.warn == "" && out != "":
			t.Errorf("%d bytes: logged %q", tc.size, out)
		case tc.warn != "" && (strings.Count(out, "\n") != 1 || !strings.Contains(out, "[WARN]") || !strings.Contains(out, tc.warn)):
			t.Errorf("%d bytes: logged %q, want one warning with %s", tc.size, out, tc.warn)
		}
	}
}
