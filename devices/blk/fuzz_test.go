package blk

import (
	"bytes"
	"testing"
)

// FuzzHandle feeds arbitrary requests, cut into arbitrary descriptor
// layouts, to the handler. Invariants: no panic, the disk is never accessed
// out of range, a request with a status byte gets 0, 1 or 2 there, a
// read-only disk is never written, and failed requests leave counters.
func FuzzHandle(f *testing.F) {
	f.Add(cat(header(TypeIn, 0)), []byte{16}, uint16(513), []byte{200, 0}, false, uint64(allFeatures))
	f.Add(cat(header(TypeOut, 3), patternBytes(1024, 1)), []byte{16, 3, 0}, uint16(1), []byte{}, false, uint64(allFeatures))
	f.Add(cat(header(TypeDiscard, 0), rangeSeg(1, 2, 0), rangeSeg(100, 50, 0)), []byte{16, 16}, uint16(1), []byte{}, false, uint64(allFeatures))
	f.Add(cat(header(TypeWriteZeroes, 0), rangeSeg(1, 2, 1)), []byte{7, 9, 16}, uint16(1), []byte{}, true, uint64(0))
	f.Add(cat(header(TypeGetID, 0)), []byte{}, uint16(21), []byte{10, 10}, false, uint64(allFeatures))
	f.Add(cat(header(TypeFlush, 0)), []byte{}, uint16(1), []byte{}, false, uint64(0))
	f.Add(header(TypeOut, 127)[:9], []byte{}, uint16(0), []byte{}, false, uint64(allFeatures))

	f.Fuzz(func(t *testing.T, readable []byte, rdCuts []byte, wrLen uint16, wrCuts []byte, ro bool, features uint64) {
		const size = 64 << 10
		md := newMemDisk(size)
		md.ro = ro
		for i := range md.data {
			md.data[i] = 0xa5
		}
		d, err := New(Config{Disk: vecMemDisk{md}, Serial: "fuzz", MaxDiscardSegments: 4, MaxWriteZeroesSegments: 4, MaxDiscardSectors: 64, MaxWriteZeroesSectors: 64})
		if err != nil {
			t.Fatal(err)
		}
		d.SetFeatures(features)
		cuts := func(b []byte, c []byte) [][]byte {
			s := make([]int, len(c))
			for i, v := range c {
				s[i] = int(v)
			}
			return split(b, s...)
		}
		rd := cuts(readable, rdCuts)
		wrBuf := bytes.Repeat([]byte{0xee}, int(wrLen))
		wr := cuts(wrBuf, wrCuts)

		used, _ := d.NewHandler().Handle(rd, wr)

		if md.violation != nil {
			t.Fatal(md.violation)
		}
		if wrLen == 0 {
			if used != 0 || d.Stats().NoStatus != 1 {
				t.Fatalf("no status byte: used %d, stats %+v", used, d.Stats())
			}
			return
		}
		if used != uint32(wrLen) {
			t.Fatalf("used %d, want %d", used, wrLen)
		}
		status := wrBuf[wrLen-1]
		if status > StatusUnsupp {
			t.Fatalf("status %d", status)
		}
		s := d.Stats()
		failures := s.ShortHeader + s.BadLength + s.OutOfRange + s.TooManySegments + s.TooManySectors +
			s.BadFlags + s.ShortID + s.ReadOnly + s.Unsupported + s.TooLarge + s.IOErrors
		if (status != StatusOK) != (failures == 1) {
			t.Fatalf("status %d but %d failures counted", status, failures)
		}
		if ro && !bytes.Equal(md.data, bytes.Repeat([]byte{0xa5}, size)) {
			t.Fatal("read-only disk changed")
		}
	})
}
