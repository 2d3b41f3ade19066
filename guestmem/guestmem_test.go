package guestmem

import (
	"bytes"
	"errors"
	"os"
	"testing"
)

func memfd(t *testing.T, size uint64) *os.File {
	t.Helper()
	f, err := NewMemfd("test", size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func twoRegions(t *testing.T) *Memory {
	t.Helper()
	f := memfd(t, 0x3000)
	m, err := Map([]Region{
		{GuestAddr: 0x10000, Size: 0x1000, UserAddr: 0x7f0000010000, File: f, Offset: 0x2000},
		{GuestAddr: 0x0, Size: 0x2000, UserAddr: 0x7f0000000000, File: f, Offset: 0},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestSliceBounds(t *testing.T) {
	m := twoRegions(t)
	tests := []struct {
		name string
		addr Addr
		n    uint64
		ok   bool
	}{
		{"start of first", 0, 1, true},
		{"whole first", 0, 0x2000, true},
		{"past first", 0, 0x2001, false},
		{"last byte of first", 0x1fff, 1, true},
		{"gap", 0x2000, 1, false},
		{"across gap", 0x1fff, 0xe002, false},
		{"second region", 0x10000, 0x1000, true},
		{"past second", 0x10fff, 2, false},
		{"overflow", 0xffffffffffffffff, 2, false},
		{"overflow huge length", 0x10, 0xfffffffffffffff8, false},
		{"zero length inside", 0x10, 0, true},
		{"zero length at end", 0x2000, 0, true},
		{"zero length outside", 0x5000, 0, false},
		{"far away", 0x100000000, 8, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := m.Slice(tt.addr, tt.n)
			if tt.ok != (err == nil) {
				t.Fatalf("Slice(%#x, %#x) err = %v, want ok=%v", tt.addr, tt.n, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("error %v is not ErrOutOfRange", err)
			}
			if err == nil && uint64(len(b)) != tt.n {
				t.Fatalf("len = %d, want %d", len(b), tt.n)
			}
		})
	}
}

func TestSharedBacking(t *testing.T) {
	// Region 1 (guest 0x10000) maps file offset 0x2000, which region 0 does
	// not cover; a second mapping of the same file sees the same bytes.
	f := memfd(t, 0x3000)
	m1, err := Map([]Region{{GuestAddr: 0x10000, Size: 0x1000, File: f, Offset: 0x2000}})
	if err != nil {
		t.Fatal(err)
	}
	defer m1.Close()
	m2, err := Map([]Region{{GuestAddr: 0, Size: 0x3000, File: f}})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m1.Write(0x10010, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if err := m2.Read(0x2010, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte("hello")) {
		t.Fatalf("got %q through the second mapping", got)
	}
}

func TestUnalignedOffset(t *testing.T) {
	f := memfd(t, 0x3000)
	if _, err := f.WriteAt([]byte("xyz"), 0x1234); err != nil {
		t.Fatal(err)
	}
	m, err := Map([]Region{{GuestAddr: 0x1000, Size: 0x100, File: f, Offset: 0x1234}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got := make([]byte, 3)
	if err := m.Read(0x1000, got); err != nil || string(got) != "xyz" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestMapRejects(t *testing.T) {
	f := memfd(t, 0x4000)
	tests := []struct {
		name    string
		regions []Region
	}{
		{"no file", []Region{{Size: 0x1000}}},
		{"empty", []Region{{Size: 0, File: f}}},
		{"guest overflow", []Region{{GuestAddr: 0xfffffffffffff000, Size: 0x2000, File: f}}},
		{"user overflow", []Region{{UserAddr: 0xfffffffffffff000, Size: 0x2000, File: f}}},
		{"offset overflow", []Region{{Offset: 0xfffffffffffff000, Size: 0x2000, File: f}}},
		{"guest overlap", []Region{{GuestAddr: 0, Size: 0x2000, File: f}, {GuestAddr: 0x1fff, Size: 0x1000, File: f}}},
		{"user overlap", []Region{{GuestAddr: 0, UserAddr: 0x10000, Size: 0x1000, File: f}, {GuestAddr: 0x8000, UserAddr: 0x10800, Size: 0x1000, File: f}}},
		{"too many", make([]Region, MaxRegions+1)},
		{"past end of file", []Region{{GuestAddr: 0, Size: 0x5000, File: f}}},
		{"offset past end of file", []Region{{GuestAddr: 0, Size: 0x1000, File: f, Offset: 0x3800}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Map(tt.regions)
			if err == nil {
				m.Close()
				t.Fatal("Map accepted invalid regions")
			}
			if !errors.Is(err, ErrBadRegion) {
				t.Fatalf("error %v is not ErrBadRegion", err)
			}
		})
	}
}

func TestTranslateUser(t *testing.T) {
	m := twoRegions(t)
	tests := []struct {
		uaddr, n uint64
		want     Addr
		ok       bool
	}{
		{0x7f0000000000, 16, 0, true},
		{0x7f0000001ff0, 16, 0x1ff0, true},
		{0x7f0000001ff0, 17, 0, false},
		{0x7f0000010800, 0x800, 0x10800, true},
		{0x7f0000005000, 1, 0, false},
		{0xffffffffffffffff, 2, 0, false},
	}
	for _, tt := range tests {
		got, err := m.TranslateUser(tt.uaddr, tt.n)
		if tt.ok != (err == nil) || (tt.ok && got != tt.want) {
			t.Errorf("TranslateUser(%#x, %#x) = %#x, %v; want %#x ok=%v", tt.uaddr, tt.n, got, err, tt.want, tt.ok)
		}
	}
}

func TestCloseIdempotent(t *testing.T) {
	m := twoRegions(t)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Slice(0, 1); err == nil {
		t.Fatal("Slice after Close succeeded")
	}
}

func TestRegionsSorted(t *testing.T) {
	m := twoRegions(t)
	r := m.Regions()
	if len(r) != 2 || r[0].GuestAddr != 0 || r[1].GuestAddr != 0x10000 {
		t.Fatalf("Regions() = %+v", r)
	}
	if m.Size() != 0x3000 {
		t.Fatalf("Size() = %#x", m.Size())
	}
}
