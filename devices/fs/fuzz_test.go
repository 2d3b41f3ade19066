package fs

import (
	"encoding/binary"
	"os"
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

// fuzzMsg builds one framed message for FuzzHandle: u16 length, u8 split,
// u16 reply capacity, then the request bytes.
func fuzzMsg(op fuse.Opcode, node uint64, split byte, replyCap uint16, args ...[]byte) []byte {
	var body []byte
	for _, a := range args {
		body = append(body, a...)
	}
	h := fuse.InHeader{Len: uint32(fuse.InHeaderSize + len(body)), Opcode: op, Unique: 3, NodeID: node}
	req := make([]byte, fuse.InHeaderSize)
	h.Encode(req)
	req = append(req, body...)
	out := binary.LittleEndian.AppendUint16(nil, uint16(len(req)))
	out = append(out, split)
	out = binary.LittleEndian.AppendUint16(out, replyCap)
	return append(out, req...)
}

func le32(v ...uint32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, x)
	}
	return b
}

func le64(v ...uint64) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint64(b, x)
	}
	return b
}

// FuzzHandle feeds sequences of arbitrary FUSE messages, cut into arbitrary
// descriptor sizes with arbitrary reply space, to a server on a fresh
// directory (after a proper INIT). Invariants: no panic or hang; a reply,
// when written, is a well-formed FUSE reply to that request; a file outside
// the share is never touched.
//
// Every input sets up a directory and a server (about a millisecond), and
// new inputs are frequent, so run it with a bounded minimization:
//
//	go test -run XXX -fuzz FuzzHandle -fuzztime 60s -fuzzminimizetime 20x ./devices/fs/
func FuzzHandle(f *testing.F) {
	rw := func(fh, off uint64, size uint32) []byte {
		b := make([]byte, fuse.ReadInSize)
		r := fuse.ReadIn{Fh: fh, Offset: off, Size: size}
		r.Encode(b)
		return b
	}
	var seq []byte
	seq = append(seq, fuzzMsg(fuse.OpCreate, 1, 0, 4096, le32(2, 0o644, 0, 0), []byte("f\x00"))...)
	seq = append(seq, fuzzMsg(fuse.OpWrite, 2, 3, 4096, rw(1, 0, 5), []byte("hello"))...)
	seq = append(seq, fuzzMsg(fuse.OpRead, 2, 0, 4096, rw(1, 0, 100))...)
	seq = append(seq, fuzzMsg(fuse.OpMkdir, 1, 5, 4096, le32(0o755, 0), []byte("d\x00"))...)
	seq = append(seq, fuzzMsg(fuse.OpOpendir, 1, 0, 4096, le32(0, 0))...)
	seq = append(seq, fuzzMsg(fuse.OpReaddirplus, 1, 0, 4096, rw(2, 0, 4096))...)
	seq = append(seq, fuzzMsg(fuse.OpRename, 1, 0, 4096, le64(3), []byte("f\x00g\x00"))...)
	seq = append(seq, fuzzMsg(fuse.OpSymlink, 1, 0, 4096, []byte("l\x00../../etc\x00"))...)
	seq = append(seq, fuzzMsg(fuse.OpBatchForget, 0, 0, 0, le32(2, 0), le64(2, 1, 3, 1))...)
	f.Add(seq)
	f.Add(fuzzMsg(fuse.OpLookup, 1, 1, 200, []byte("..\x00")))
	f.Add(fuzzMsg(fuse.OpSetattr, 1, 0, 4096, make([]byte, fuse.SetattrInSize)))
	f.Add(fuzzMsg(fuse.OpSetxattr, 1, 0, 4096, le32(3, 0), []byte("user.x\x00abc")))
	f.Add(fuzzMsg(fuse.OpGetxattr, 1, 0, 4096, le32(100, 0), []byte("user.x\x00")))
	f.Add(fuzzMsg(fuse.OpLink, 1, 0, 4096, le64(1), []byte("x\x00")))
	f.Add(append(fuzzMsg(fuse.OpCreate, 1, 0, 4096, le32(2, 0o644, 0, 0), []byte("f\x00")),
		fuzzMsg(fuse.OpFallocate, 2, 0, 4096, append(le64(1, 4096, 8192), le32(0, 0)...))...))
	// A file unlinked while open, opened again through its handle's fd
	// (dupHandleFd): append, read, truncate without a handle.
	trunc := make([]byte, fuse.SetattrInSize)
	(&fuse.SetattrIn{Valid: fuse.FattrSize, Size: 1}).Encode(trunc)
	var unl []byte
	unl = append(unl, fuzzMsg(fuse.OpCreate, 1, 0, 4096, le32(2, 0o644, 0, 0), []byte("u\x00"))...)
	unl = append(unl, fuzzMsg(fuse.OpUnlink, 1, 0, 4096, []byte("u\x00"))...)
	unl = append(unl, fuzzMsg(fuse.OpOpen, 2, 0, 4096, le32(1|0o2000, 0))...)
	unl = append(unl, fuzzMsg(fuse.OpWrite, 2, 0, 4096, rw(2, 0, 3), []byte("abc"))...)
	unl = append(unl, fuzzMsg(fuse.OpOpen, 2, 0, 4096, le32(0, 0))...)
	unl = append(unl, fuzzMsg(fuse.OpRead, 2, 0, 4096, rw(3, 0, 100))...)
	unl = append(unl, fuzzMsg(fuse.OpSetattr, 2, 0, 4096, trunc)...)
	f.Add(unl)

	out, err := os.MkdirTemp("", "fuzz-outside")
	if err != nil {
		f.Fatal(err)
	}
	defer os.RemoveAll(out)
	if err := os.WriteFile(out+"/secret", []byte("secret"), 0o644); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		os.Symlink(out, dir+"/out")
		os.Symlink(out+"/secret", dir+"/outf")
		d, err := os.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewServer(ServerConfig{Dir: d, MaxNodes: 64, MaxHandles: 16})
		d.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		c := fuseclient.New(&fuseclient.Local{Handle: func(m *fuseclient.MemChain) uint32 { return s.Handle(m) }})
		if _, err := c.Init(fuseclient.LinuxInitFlags); err != nil {
			t.Fatal(err)
		}
		for len(data) >= 5 {
			n := int(binary.LittleEndian.Uint16(data))
			split := int(data[2])
			replyCap := int(binary.LittleEndian.Uint16(data[3:]))
			data = data[5:]
			n = min(n, len(data))
			req := data[:n]
			data = data[n:]
			if len(req) >= 8 {
				switch fuse.Opcode(binary.LittleEndian.Uint32(req[4:])) {
				case fuse.OpFallocate:
					// Could reserve gigabytes of the host's disk: only
					// ranges within the first MiB run (a short request
					// runs too, to be refused).
					if len(req) >= fuse.InHeaderSize+24 {
						off := binary.LittleEndian.Uint64(req[fuse.InHeaderSize+8:])
						length := binary.LittleEndian.Uint64(req[fuse.InHeaderSize+16:])
						if off > 1<<20 || length > 1<<20 {
							continue
						}
					}
				}
			}
			local := &fuseclient.Local{Handle: func(m *fuseclient.MemChain) uint32 { return s.Handle(m) }, Split: split}
			buf := append([]byte(nil), req...)
			reply, err := local.RoundTrip([][]byte{buf}, replyCap)
			if err != nil {
				t.Fatal(err)
			}
			if len(reply) == 0 {
				continue
			}
			oh, err := fuse.DecodeOutHeader(reply)
			if err != nil {
				t.Fatalf("reply of %d bytes: %v", len(reply), err)
			}
			if int(oh.Len) != len(reply) {
				t.Fatalf("reply header says %d bytes, %d written", oh.Len, len(reply))
			}
			if len(req) >= 16 && oh.Unique != binary.LittleEndian.Uint64(req[8:]) {
				t.Fatalf("reply unique %d", oh.Unique)
			}
			if oh.Error > 0 || (oh.Error < 0 && len(reply) != fuse.OutHeaderSize) {
				t.Fatalf("error %d with %d bytes", oh.Error, len(reply))
			}
		}
		if b, err := os.ReadFile(out + "/secret"); err != nil || string(b) != "secret" {
			t.Fatalf("the file outside the share changed: %q %v", b, err)
		}
		if ents, _ := os.ReadDir(out); len(ents) != 1 {
			t.Fatalf("the directory outside the share has %d entries", len(ents))
		}
	})
}
