package fuse

import (
	"bytes"
	"testing"
)

// FuzzDecode runs every decoder over arbitrary bytes. Invariants: no panic;
// a decoder either fails on a short slice or succeeds; headers round-trip.
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
		_, err := DecodeOutHeader(b)
		check("out header", OutHeaderSize, err)
		_, err = DecodeAttr(b)
		check("attr", AttrSize, err)
		_, err = DecodeEntryOut(b)
		check("entry out", EntryOutSize, err)
		_, err = DecodeInitIn(b)
		check("init in", InitInMinSize, err)
		_, err = DecodeInitOut(b)
		check("init out", InitOutCompat22, err)
		_, err = DecodeSetattrIn(b)
		check("setattr in", SetattrInSize, err)
		_, err = DecodeReadIn(b)
		check("read in", ReadInSize, err)
		_, err = DecodeWriteIn(b)
		check("write in", WriteInCompatSize, err)
		_, err = DecodeKstatfs(b)
		check("statfs", StatfsOutSize, err)
		if ds, err := DecodeDirents(b); err == nil {
			for _, d := range ds {
				if len(d.Name) > MaxNameLen {
					t.Fatalf("dirent name of %d bytes", len(d.Name))
				}
			}
		}
		DecodeDirentplus(b)
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
