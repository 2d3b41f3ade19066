package fs

import (
	"encoding/binary"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestShortReplyNotExecuted: a request whose reply area holds the 16-byte
// header but not its fixed reply struct is refused (ENOBUFS) before it
// acts, as one without room for the header is dropped. The server made
// the directory, link or file, truncated, wrote or changed the mode and
// only then found that the reply did not fit: the guest was told the
// request failed and the host was changed all the same.
func TestShortReplyNotExecuted(t *testing.T) {
	e := newEnv(t, 0, nil)
	c := e.c
	must(t, "write", os.WriteFile(e.path("f"), []byte("data"), 0o644))
	f := e.lookup(fuse.RootID, "f")
	_, wfh, err := c.Create(fuse.RootID, "w", unix.O_RDWR, 0o644)
	must(t, "CREATE w", err)
	le32 := func(v ...uint32) []byte {
		var b []byte
		for _, x := range v {
			b = binary.LittleEndian.AppendUint32(b, x)
		}
		return b
	}
	le64 := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	setattr := func(in fuse.SetattrIn) []byte {
		b := make([]byte, fuse.SetattrInSize)
		in.Encode(b)
		return b
	}
	write := func() []byte {
		b := make([]byte, fuse.WriteInSize)
		w := fuse.ReadIn{Fh: wfh, Size: 3}
		w.Encode(b)
		return append(b, "new"...)
	}
	unchanged := func(t *testing.T) {
		t.Helper()
		for _, name := range []string{"d", "n", "s", "l", "c"} {
			if _, err := os.Lstat(e.path(name)); err == nil {
				t.Fatalf("%s was made", name)
			}
		}
		if b, _ := os.ReadFile(e.path("f")); string(b) != "data" {
			t.Fatalf("f holds %q", b)
		}
		if st, _ := os.Stat(e.path("f")); st.Mode().Perm() != 0o644 {
			t.Fatalf("f has mode %v", st.Mode())
		}
		if b, _ := os.ReadFile(e.path("w")); len(b) != 0 {
			t.Fatalf("w holds %q", b)
		}
	}
	for _, tc := range []struct {
		name string
		op   fuse.Opcode
		node uint64
		args []byte
		need int
	}{
		{"MKDIR", fuse.OpMkdir, fuse.RootID, append(le32(0o755, 0), "d\x00"...), fuse.EntryOutSize},
		{"MKNOD", fuse.OpMknod, fuse.RootID, append(le32(unix.S_IFIFO|0o644, 0, 0, 0), "n\x00"...), fuse.EntryOutSize},
		{"SYMLINK", fuse.OpSymlink, fuse.RootID, []byte("s\x00target\x00"), fuse.EntryOutSize},
		{"LINK", fuse.OpLink, fuse.RootID, append(le64(f.NodeID), "l\x00"...), fuse.EntryOutSize},
		{"CREATE", fuse.OpCreate, fuse.RootID, append(le32(unix.O_RDWR, 0o644, 0, 0), "c\x00"...), fuse.EntryOutSize + fuse.OpenOutSize},
		{"CREATE O_TRUNC", fuse.OpCreate, fuse.RootID, append(le32(unix.O_RDWR|unix.O_TRUNC, 0o644, 0, 0), "f\x00"...), fuse.EntryOutSize + fuse.OpenOutSize},
		{"OPEN O_TRUNC", fuse.OpOpen, f.NodeID, le32(unix.O_RDWR|unix.O_TRUNC, 0), fuse.OpenOutSize},
		{"SETATTR size", fuse.OpSetattr, f.NodeID, setattr(fuse.SetattrIn{Valid: fuse.FattrSize}), fuse.AttrOutSize},
		{"SETATTR mode", fuse.OpSetattr, f.NodeID, setattr(fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o600}), fuse.AttrOutSize},
		{"WRITE", fuse.OpWrite, 0, write(), fuse.WriteOutSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nodes, handles := e.live()
			for _, room := range []int{0, 1, tc.need - 1} {
				_, err := c.Call(tc.op, tc.node, fuse.OutHeaderSize+room, tc.args)
				wantErrno(t, tc.name+" into a short reply", err, syscall.ENOBUFS)
				unchanged(t)
			}
			if n, h := e.live(); n != nodes || h != handles {
				t.Fatalf("%d nodes and %d handles, were %d and %d", n, h, nodes, handles)
			}
		})
	}
	// An INIT that cannot be answered does not end the session.
	init := make([]byte, fuse.InitInSize)
	fuse.PutU32(init, 0, fuse.KernelVersion)
	fuse.PutU32(init, 4, 37)
	_, err = c.Call(fuse.OpInit, 0, fuse.OutHeaderSize+fuse.InitOutSize-1, init)
	wantErrno(t, "INIT into a short reply", err, syscall.ENOBUFS)
	if _, err := c.Read(0, wfh, 0, 10); err != nil {
		t.Fatalf("the session ended: READ after the refused INIT: %v", err)
	}
}
