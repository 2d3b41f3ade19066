package fs

import (
	"bytes"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestReadWriteWithinInitLimits: a READ was bounded only by the reply area
// the guest gave it and a WRITE only by its message, up to 4 GiB each in
// one request, however small the max_write and max_pages INIT announced
// (found in review, helper-141). A READ is now served up to max_pages
// pages of the largest guest page size (64 KiB) and no further, a WRITE
// up to max_write; a larger WRITE is EINVAL and writes nothing.
func TestReadWriteWithinInitLimits(t *testing.T) {
	const maxWrite = 8 << 10 // max_pages 2: READs up to 128 KiB
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxWrite = maxWrite })
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<20/16)
	must(t, "write", os.WriteFile(e.path("f"), data, 0o644))
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDWR)
	must(t, "OPEN", err)
	maxRead := uint32(maxWrite / 4096 * maxGuestPage)
	for _, tc := range []struct {
		name string
		do   func() error
		want syscall.Errno
	}{
		{"READ max_pages of 64 KiB", func() error {
			got, err := e.c.Read(f.NodeID, fh, 0, maxRead)
			if err == nil && !bytes.Equal(got, data[:maxRead]) {
				t.Errorf("READ of %d bytes returned %d bytes", maxRead, len(got))
			}
			return err
		}, 0},
		{"READ beyond, reply area to match", func() error {
			got, err := e.c.Read(f.NodeID, fh, 0, maxRead+4096)
			if err == nil && len(got) != int(maxRead) {
				t.Errorf("READ of %d bytes (max %d) returned %d bytes", maxRead+4096, maxRead, len(got))
			}
			return err
		}, 0},
		{"READ of 4 GiB - 1, reply area of 1 MiB", func() error {
			got, err := e.c.Call(fuse.OpRead, f.NodeID, fuse.OutHeaderSize+1<<20, readIn(fh, 0, 1<<32-1))
			if err == nil && len(got) != int(maxRead) {
				t.Errorf("READ of 4 GiB - 1 (max %d) returned %d bytes", maxRead, len(got))
			}
			return err
		}, 0},
		{"WRITE max_write", func() error { _, err := e.c.Write(f.NodeID, fh, 0, make([]byte, maxWrite)); return err }, 0},
		{"WRITE beyond", func() error { _, err := e.c.Write(f.NodeID, fh, 1<<20, make([]byte, maxWrite+4096)); return err }, syscall.EINVAL},
	} {
		err := tc.do()
		if tc.want == 0 {
			must(t, tc.name, err)
			continue
		}
		wantErrno(t, tc.name, err, tc.want)
	}
	if st, err := os.Stat(e.path("f")); err != nil || st.Size() != 1<<20 {
		t.Errorf("host file after a refused WRITE beyond max_write: %v, %v", st.Size(), err)
	}
}

// readIn encodes fuse_read_in.
func readIn(fh, off uint64, size uint32) []byte {
	b := make([]byte, fuse.ReadInSize)
	fuse.PutU64(b, 0, fh)
	fuse.PutU64(b, 8, off)
	fuse.PutU32(b, 16, size)
	return b
}
