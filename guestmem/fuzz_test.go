package guestmem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// FuzzSlice lays up to four regions of one memfd at guest and user
// addresses taken from the input (holes between them, regions ending at
// 2^64, unaligned file offsets), then asks Slice, Read, Write and
// TranslateUser about guest-chosen ranges. Each answer must agree with a
// model of "wholly inside one region" computed in 128-bit-safe arithmetic,
// return exactly the bytes asked for, and be the bytes of the file at the
// region's offset; nothing may panic. Each 24-byte record of the input is
// (guest addr, user addr, size and offset in units of 16 bytes) for a
// region, then the rest are 16-byte queries (addr, length).
func FuzzSlice(f *testing.F) {
	rec := func(ga, ua uint64, size, off uint32) []byte {
		b := binary.LittleEndian.AppendUint64(nil, ga)
		b = binary.LittleEndian.AppendUint64(b, ua)
		b = binary.LittleEndian.AppendUint32(b, size)
		return binary.LittleEndian.AppendUint32(b, off)
	}
	q := func(a, n uint64) []byte {
		return binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, a), n)
	}
	join := func(nr byte, parts ...[]byte) []byte {
		return append([]byte{nr}, bytes.Join(parts, nil)...)
	}
	f.Add(join(2, rec(0, 0x7f0000000000, 0x100, 0), rec(0x10000, 0x7f0000010000, 0x80, 0x100),
		q(0, 0x1000), q(0xff0, 0x20), q(0x10000, 0x800), q(0x1000, 0), q(0x7f0000000ff0, 0x10)))
	f.Add(join(1, rec(0xfffffffffffff000, 0xfffffffffffff000, 0x100, 3),
		q(0xfffffffffffffff0, 0x10), q(0xfffffffffffffff0, 0x11), q(0xffffffffffffffff, 1), q(0xffffffffffffffff, 0)))
	f.Add(join(3, rec(0x1000, 0, 0x10, 0x1), rec(0x1100, 0, 0x10, 0x2), rec(0x1200, 0x5000, 0x10, 0x3),
		q(0x10ff, 2), q(0x1100, 0x100), q(0x1000, 0xfffffffffffff001), q(0x5000, 0x100)))

	// One file for every input: Map does not own it, and the accesses
	// below write back only what they read.
	const fileSize = 1 << 16
	file, err := NewMemfd("fuzz", fileSize)
	if err != nil {
		f.Fatal(err)
	}
	defer file.Close()
	pattern := make([]byte, fileSize)
	for i := range pattern {
		pattern[i] = byte(i*7 + i>>8)
	}
	if _, err := file.WriteAt(pattern, 0); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 {
			return
		}
		nr := int(data[0] % 5)
		data = data[1:]
		if len(data) < 24*nr {
			return
		}
		var regions []Region
		for i := 0; i < nr; i++ {
			r := data[24*i:]
			size := uint64(binary.LittleEndian.Uint32(r[16:])%0x200+1) * 16
			off := uint64(binary.LittleEndian.Uint32(r[20:])) % fileSize
			regions = append(regions, Region{
				GuestAddr: Addr(binary.LittleEndian.Uint64(r)),
				UserAddr:  binary.LittleEndian.Uint64(r[8:]),
				Size:      size, File: file, Offset: off,
			})
		}
		data = data[24*nr:]
		m, err := Map(regions)
		if err != nil {
			if !errors.Is(err, ErrBadRegion) {
				t.Fatalf("Map error %v is not ErrBadRegion", err)
			}
			return
		}
		defer m.Close()
		// inside reports the region holding [a, a+n) wholly (n == 0: a
		// inside or at the end), without wrapping arithmetic.
		inside := func(a, n uint64) (Region, bool) {
			for _, r := range regions {
				s := uint64(r.GuestAddr)
				if a < s || a-s > r.Size || n > r.Size-(a-s) {
					continue
				}
				if n == 0 || a-s < r.Size {
					return r, true
				}
			}
			return Region{}, false
		}
		for ; len(data) >= 16; data = data[16:] {
			a := binary.LittleEndian.Uint64(data)
			n := binary.LittleEndian.Uint64(data[8:])
			r, want := inside(a, n)
			b, err := m.Slice(Addr(a), n)
			if want != (err == nil) {
				t.Fatalf("Slice(%#x, %#x): err %v, want ok=%v (regions %+v)", a, n, err, want, regions)
			}
			if err != nil {
				if !errors.Is(err, ErrOutOfRange) {
					t.Fatalf("Slice(%#x, %#x): error %v is not ErrOutOfRange", a, n, err)
				}
			} else {
				if uint64(len(b)) != n || uint64(cap(b)) != n {
					t.Fatalf("Slice(%#x, %#x): len %d cap %d", a, n, len(b), cap(b))
				}
				fo := r.Offset + (a - uint64(r.GuestAddr))
				if !bytes.Equal(b, pattern[fo:fo+n]) {
					t.Fatalf("Slice(%#x, %#x): bytes are not the file's at %#x", a, n, fo)
				}
			}
			// Read and Write of a small buffer follow Slice.
			k := n % 64
			_, want = inside(a, k)
			buf := make([]byte, k)
			if err := m.Read(Addr(a), buf); want != (err == nil) {
				t.Fatalf("Read(%#x, %d): err %v, want ok=%v", a, k, err, want)
			}
			if err := m.Write(Addr(a), buf); want != (err == nil) {
				t.Fatalf("Write(%#x, %d): err %v, want ok=%v", a, k, err, want)
			}
			// The same numbers as a front-end (user) address range.
			ga, err := m.TranslateUser(a, n)
			if err == nil {
				nn := max(n, 1)
				if _, err := m.Slice(ga, nn); err != nil {
					t.Fatalf("TranslateUser(%#x, %#x) = %#x, which Slice refuses: %v", a, n, ga, err)
				}
			} else if !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("TranslateUser(%#x, %#x): error %v is not ErrOutOfRange", a, n, err)
			}
		}
	})
}
