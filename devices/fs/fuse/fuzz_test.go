package fuse

import (
	"bytes"
	"testing"
)

// FuzzDecode runs every decoder over arbitrary bytes. Invariants: no panic;
// a decoder either fails on a short slice or succeeds; what it decodes
// re-encodes to the input's bytes (outside the padding); dirent records
// decode whole, and cover the input exactly.
func FuzzDecode(f *testing.F) {
	h := InHeader{Len: 56, Opcode: OpInit, Unique: 7, NodeID: 1, UID: 1000, GID: 1000, PID: 42}
	b := make([]byte, InHeaderSize)
	h.Encode(b)
	f.Add(append(b, make([]byte, 64)...))
	f.Add([]byte("name\x00rest"))
	f.Add(make([]byte, 200))
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := DecodeInHeader(b); err == nil {
			out := make([]byte, InHeaderSize)
			h.Encode(out)
			// The padding field is not carried.
			if !bytes.Equal(out[:38], b[:38]) {
				t.Fatalf("in header round trip: %x vs %x", out, b[:InHeaderSize])
			}
		} else if len(b) >= InHeaderSize {
			t.Fatalf("DecodeInHeader failed on %d bytes: %v", len(b), err)
		}
		check := func(what string, need int, err error) {
			if (err != nil) != (len(b) < need) {
				t.Fatalf("%s on %d bytes (needs %d): %v", what, len(b), need, err)
			}
		}
		// roundTrip re-encodes a decoded struct into n bytes and compares
		// them with the input, outside the padding (pad: [from, to) pairs).
		roundTrip := func(what string, n int, encode func([]byte), pad ...int) {
			out := make([]byte, max(n, 128)) // Encode may clear its whole struct
			encode(out)
			want := bytes.Clone(b[:n])
			got := out[:n]
			for i := 0; i+1 < len(pad); i += 2 {
				clear(want[pad[i]:pad[i+1]])
				clear(got[pad[i]:pad[i+1]])
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s round trip: %x, want %x", what, got, want)
			}
		}
		oh, err := DecodeOutHeader(b)
		check("out header", OutHeaderSize, err)
		if err == nil {
			roundTrip("out header", OutHeaderSize, oh.Encode)
		}
		a, err := DecodeAttr(b)
		check("attr", AttrSize, err)
		if err == nil {
			roundTrip("attr", AttrSize, a.Encode)
		}
		eo, err := DecodeEntryOut(b)
		check("entry out", EntryOutSize, err)
		if err == nil {
			roundTrip("entry out", EntryOutSize, eo.Encode)
		}
		ii, err := DecodeInitIn(b)
		check("init in", InitInMinSize, err)
		if err == nil {
			flags2 := uint64(0)
			if len(b) >= 20 && ii.Flags&InitExt != 0 {
				flags2 = uint64(le.Uint32(b[16:])) << 32
			}
			if ii.Major != le.Uint32(b) || ii.Minor != le.Uint32(b[4:]) || ii.MaxReadahead != le.Uint32(b[8:]) ||
				ii.Flags != uint64(le.Uint32(b[12:]))|flags2 {
				t.Fatalf("init in %+v from %x", ii, b[:min(len(b), 20)])
			}
		}
		io, err := DecodeInitOut(b)
		check("init out", InitOutCompat22, err)
		if err == nil {
			if len(b) >= InitOutSize {
				roundTrip("init out", 36, io.Encode)
			} else {
				roundTrip("init out (7.22)", InitOutCompat22, io.Encode)
			}
		}
		sa, err := DecodeSetattrIn(b)
		check("setattr in", SetattrInSize, err)
		if err == nil {
			roundTrip("setattr in", SetattrInSize, sa.Encode, 4, 8, 72, 76, 84, 88)
		}
		ri, err := DecodeReadIn(b)
		check("read in", ReadInSize, err)
		if err == nil {
			roundTrip("read in", ReadInSize, ri.Encode, 36, 40)
		}
		wi, err := DecodeWriteIn(b)
		check("write in", WriteInCompatSize, err)
		if err == nil {
			if len(b) >= WriteInSize {
				roundTrip("write in", WriteInSize, wi.Encode, 36, 40)
			} else {
				roundTrip("write in (7.8)", WriteInCompatSize, wi.Encode)
			}
		}
		ks, err := DecodeKstatfs(b)
		check("statfs", StatfsOutSize, err)
		if err == nil {
			roundTrip("statfs", 52, ks.Encode)
		}
		// Records decode whole, within the input, and re-encode to it.
		if ds, err := DecodeDirents(b); err == nil {
			var enc []byte
			for _, d := range ds {
				if len(d.Name) > MaxNameLen {
					t.Fatalf("dirent name of %d bytes", len(d.Name))
				}
				r := make([]byte, DirentSize(len(d.Name)))
				PutDirent(r, d.Ino, d.Off, d.Type, []byte(d.Name))
				off := len(enc)
				enc = append(enc, r...)
				if len(enc) > len(b) || !bytes.Equal(enc[off:off+DirentHeaderSize+len(d.Name)], b[off:off+DirentHeaderSize+len(d.Name)]) {
					t.Fatalf("dirent %+v does not re-encode to its bytes", d)
				}
			}
			if len(enc) != len(b) {
				t.Fatalf("%d dirents of %d bytes from %d", len(ds), len(enc), len(b))
			}
		}
		if ds, err := DecodeDirentplus(b); err == nil {
			n := 0
			for _, d := range ds {
				if len(d.Name) > MaxNameLen {
					t.Fatalf("direntplus name of %d bytes", len(d.Name))
				}
				if e, _ := DecodeEntryOut(b[n:]); e != d.Entry {
					t.Fatalf("direntplus entry %+v, bytes hold %+v", d.Entry, e)
				}
				n += DirentplusSize(len(d.Name))
			}
			if n != len(b) {
				t.Fatalf("%d direntplus records of %d bytes from %d", len(ds), n, len(b))
			}
		}
		if name, rest, err := CString(b); err == nil {
			if len(name)+1+len(rest) != len(b) || bytes.IndexByte(name, 0) >= 0 {
				t.Fatalf("CString split %d+1+%d of %d", len(name), len(rest), len(b))
			}
		} else if bytes.IndexByte(b, 0) >= 0 {
			t.Fatal("CString missed a NUL")
		}
		for off := -1; off < 12; off++ {
			if _, ok := U32(b, off); ok != (off >= 0 && off+4 <= len(b)) {
				t.Fatalf("U32 at %d of %d: %v", off, len(b), ok)
			}
			if _, ok := U64(b, off); ok != (off >= 0 && off+8 <= len(b)) {
				t.Fatalf("U64 at %d of %d: %v", off, len(b), ok)
			}
		}
	})
}

func TestDirentEncoding(t *testing.T) {
	for _, name := range []string{"a", "abcdefgh", "0123456789abcdef0"} {
		b := make([]byte, DirentplusSize(len(name)))
		n := PutDirent(b, 5, 9, 4, []byte(name))
		if n != DirentSize(len(name)) || n%8 != 0 {
			t.Fatalf("%q: record of %d bytes", name, n)
		}
		ds, err := DecodeDirents(b[:n])
		if err != nil || len(ds) != 1 || ds[0].Name != name || ds[0].Ino != 5 || ds[0].Off != 9 || ds[0].Type != 4 {
			t.Fatalf("%q: decoded %+v %v", name, ds, err)
		}
	}
	if DirentplusHeadSize != 152 || EntryOutSize != 128 || AttrOutSize != 104 {
		t.Fatal("struct sizes differ from fuse.h")
	}
}
