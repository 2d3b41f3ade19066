package imgserver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/proto/imagepb"
	"github.com/krun-core/krun-core/sandbox"
)

func TestResizeRaw(t *testing.T) {
	const start = 1 << 20
	data := bytes.Repeat([]byte{0x5a}, 4096)
	cases := []struct {
		name string
		req  *imagepb.ResizeRequest
		want int64  // the size after; start when refused
		err  string // substring of the refusal
	}{
		{"grow", &imagepb.ResizeRequest{Size: 3 << 20}, 3 << 20, ""},
		{"same", &imagepb.ResizeRequest{Size: start}, start, ""},
		{"grow-relative", &imagepb.ResizeRequest{Size: 512, Relative: true}, start + 512, ""},
		{"shrink-refused", &imagepb.ResizeRequest{Size: 512 << 10}, start, "pass --shrink"},
		{"shrink-relative-refused", &imagepb.ResizeRequest{Size: -4096, Relative: true}, start, "pass --shrink"},
		{"shrink", &imagepb.ResizeRequest{Size: 512 << 10, Shrink: true}, 512 << 10, ""},
		{"shrink-relative", &imagepb.ResizeRequest{Size: -4096, Relative: true, Shrink: true}, start - 4096, ""},
		{"shrink-to-zero", &imagepb.ResizeRequest{Size: -start, Relative: true, Shrink: true}, start, "must be positive"},
		{"shrink-below-zero", &imagepb.ResizeRequest{Size: -2 * start, Relative: true, Shrink: true}, start, "must be positive"},
		{"zero", &imagepb.ResizeRequest{Size: 0, Shrink: true}, start, "must be positive"},
		{"negative", &imagepb.ResizeRequest{Size: -512, Shrink: true}, start, "must be positive"},
		{"unaligned", &imagepb.ResizeRequest{Size: start + 100}, start, "not a multiple of 512"},
		{"unaligned-relative", &imagepb.ResizeRequest{Size: 1000, Relative: true}, start, "not a multiple of 512"},
		{"overflow", &imagepb.ResizeRequest{Size: 1<<63 - 512, Relative: true}, start, "overflows"},
		{"too-large", &imagepb.ResizeRequest{Size: 1<<63 - 512}, start, "truncate"},
		{"unknown-format", &imagepb.ResizeRequest{Size: 2 << 20, Format: "vmdk"}, start, "format"},
	}
	dir := t.TempDir()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".raw")
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, start); err != nil {
				t.Fatal(err)
			}
			f := open(t, p, os.O_RDWR)
			if _, err := f.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if c.req.Format == "" {
				c.req.Format = "raw"
			}
			r, err := Resize(f, nil, c.req)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || strings.Contains(err.Error(), "\n") {
					t.Errorf("error %v, want one line with %q", err, c.err)
				}
			} else if err != nil {
				t.Fatal(err)
			} else if r.GetOldSize() != start || r.GetVirtualSize() != c.want {
				t.Errorf("response %+v, want old %d, new %d", r, start, c.want)
			}
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != c.want {
				t.Errorf("file size %d, want %d", fi.Size(), c.want)
			}
			got := make([]byte, len(data))
			if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
				t.Errorf("the data before the end changed: %v", err)
			}
			if c.name == "grow" {
				if st, err := f.Stat(); err == nil {
					if blocks := st.Sys().(*syscall.Stat_t).Blocks * 512; blocks > start {
						t.Errorf("growing allocated %d bytes; want a sparse extension", blocks)
					}
				}
			}
			if c.err == "" && c.want > start {
				// The new area reads as zeros.
				tail := make([]byte, c.want-start)
				if _, err := f.ReadAt(tail, start); err != nil || !bytes.Equal(tail, make([]byte, len(tail))) {
					t.Errorf("the grown area is not zero: %v", err)
				}
			}
		})
	}
}

// TestServerResize: Resize goes through Open (the sandbox) like every
// other operation.
func TestServerResize(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.raw")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	fd := freeFD(t)
	f := open(t, p, os.O_RDWR)
	if err := unix.Dup3(int(f.Fd()), fd, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() { unix.Close(fd) })
	restricted := false
	s := NewServer(nil, func(sandbox.Policy, sandbox.Logger) error { restricted = true; return nil })
	ctx := context.Background()
	req := &imagepb.ResizeRequest{File: "image", Format: "raw", Size: 8192}
	if _, err := s.Resize(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Resize before Open: %v", err)
	}
	if _, err := s.Open(ctx, &imagepb.OpenRequest{Files: map[string]uint32{"image": uint32(fd)}}); err != nil || !restricted {
		t.Fatalf("Open: %v (restricted %v)", err, restricted)
	}
	r, err := s.Resize(ctx, req)
	if err != nil || r.GetOldSize() != 4096 || r.GetVirtualSize() != 8192 {
		t.Fatalf("Resize: %+v, %v", r, err)
	}
	req.Size = 512
	if _, err := s.Resize(ctx, req); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "--shrink") {
		t.Errorf("shrinking without shrink: %v", err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Size() != 8192 {
		t.Errorf("size after: %v, %v", fi, err)
	}
}
