package raw

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
)

func newImage(t *testing.T, size int64) (string, *os.File) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p, f
}

func openRW(t *testing.T, size int64) (string, *Disk) {
	t.Helper()
	p, f := newImage(t, size)
	d, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return p, d
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func TestReadWriteBounds(t *testing.T) {
	const size = 1 << 20
	_, d := openRW(t, size)
	if d.Size() != size {
		t.Fatalf("Size = %d, want %d", d.Size(), size)
	}
	tests := []struct {
		name    string
		off     int64
		n       int
		wantErr error
	}{
		{"first sector", 0, 512, nil},
		{"middle", 512 * 1000, 4096, nil},
		{"last sector", size - 512, 512, nil},
		{"whole disk", 0, size, nil},
		{"empty at end", size, 0, nil},
		{"one past end", size - 511, 512, disk.ErrOutOfRange},
		{"start past end", size + 512, 512, disk.ErrOutOfRange},
		{"negative offset", -512, 512, disk.ErrOutOfRange},
		{"huge offset", 1<<63 - 1, 1, disk.ErrOutOfRange},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := pattern(tc.n, byte(i))
			n, err := d.WriteAt(w, tc.off)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("WriteAt err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != nil {
				if n != 0 {
					t.Fatalf("failed WriteAt wrote %d bytes", n)
				}
				_, err = d.ReadAt(make([]byte, tc.n), tc.off)
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("ReadAt err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			r := make([]byte, tc.n)
			if _, err := d.ReadAt(r, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(r, w) {
				t.Fatal("read back differs from written")
			}
		})
	}
	// A raw image never grows.
	st, err := os.Stat(d.f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size {
		t.Fatalf("file size %d after writes, want %d", st.Size(), size)
	}
}

func TestVectored(t *testing.T) {
	const size = 4 << 20
	_, d := openRW(t, size)
	// More buffers than one batch holds, of odd sizes, with empty ones.
	var bufs [][]byte
	var want []byte
	for i := 0; i < 3*maxIov+5; i++ {
		n := 512 + (i%5)*100
		if i%17 == 3 {
			n = 0
		}
		b := pattern(n, byte(i))
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	const off = 12345
	n, err := d.WritevAt(bufs, off)
	if err != nil || n != len(want) {
		t.Fatalf("WritevAt = %d, %v; want %d", n, err, len(want))
	}
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("pwritev content differs")
	}
	// Read back scattered.
	rbufs := make([][]byte, len(bufs))
	for i, b := range bufs {
		rbufs[i] = make([]byte, len(b))
	}
	n, err = d.ReadvAt(rbufs, off)
	if err != nil || n != len(want) {
		t.Fatalf("ReadvAt = %d, %v; want %d", n, err, len(want))
	}
	for i := range bufs {
		if !bytes.Equal(rbufs[i], bufs[i]) {
			t.Fatalf("buffer %d differs after preadv", i)
		}
	}
	// Out of range: nothing transferred.
	if _, err := d.ReadvAt([][]byte{make([]byte, 512), make([]byte, 512)}, size-512); !errors.Is(err, disk.ErrOutOfRange) {
		t.Fatalf("ReadvAt past end: %v", err)
	}
	if _, err := d.WritevAt([][]byte{make([]byte, 512), make([]byte, 512)}, size-512); !errors.Is(err, disk.ErrOutOfRange) {
		t.Fatalf("WritevAt past end: %v", err)
	}
}

func TestVectoredNoAlloc(t *testing.T) {
	_, d := openRW(t, 1<<20)
	bufs := make([][]byte, 32)
	for i := range bufs {
		bufs[i] = make([]byte, 4096)
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := d.ReadvAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := d.WritevAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("vectored I/O allocates %v times per call", allocs)
	}
}

func TestReadOnly(t *testing.T) {
	p, f := newImage(t, 1<<20)
	if _, err := f.WriteAt([]byte("hello"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// A read-only fd must be configured read-only.
	rf, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(rf, Options{}); err == nil {
		t.Fatal("Open of an O_RDONLY fd without ReadOnly succeeded")
	}
	d, err := Open(rf, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !d.ReadOnly() {
		t.Fatal("ReadOnly() = false")
	}
	buf := make([]byte, 5)
	if _, err := d.ReadAt(buf, 0); err != nil || string(buf) != "hello" {
		t.Fatalf("ReadAt = %q, %v", buf, err)
	}
	writes := map[string]func() error{
		"WriteAt":     func() error { _, err := d.WriteAt([]byte("x"), 0); return err },
		"WritevAt":    func() error { _, err := d.WritevAt([][]byte{[]byte("x")}, 0); return err },
		"Discard":     func() error { return d.Discard(0, 512) },
		"WriteZeroes": func() error { return d.WriteZeroes(0, 512, false) },
	}
	for name, fn := range writes {
		if err := fn(); !errors.Is(err, disk.ErrReadOnly) {
			t.Errorf("%s on read-only disk: %v, want ErrReadOnly", name, err)
		}
	}
	if err := d.Flush(); err != nil {
		t.Errorf("Flush on read-only disk: %v", err)
	}
}

func TestWriteOnlyFdRefused(t *testing.T) {
	p, f := newImage(t, 4096)
	f.Close()
	wf, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer wf.Close()
	if _, err := Open(wf, Options{}); err == nil {
		t.Fatal("Open of an O_WRONLY fd succeeded")
	}
}

// TestAppendFdRefused hands Open an fd opened with O_APPEND, as an
// inherited one may be (a shell's >> redirection). Linux places every
// pwrite on such an fd at the end of the file whatever its offset, so a
// guest's writes would land past the disk and read back as the old bytes;
// a writable disk refuses it, a read-only one does not care.
func TestAppendFdRefused(t *testing.T) {
	const size = 4096
	p, f := newImage(t, size)
	f.Close()
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_APPEND|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	af := os.NewFile(uintptr(fd), p)
	d, err := Open(af, Options{})
	if err == nil {
		_, werr := d.WriteAt(pattern(512, 3), 0)
		st, _ := os.Stat(p)
		d.Close()
		t.Fatalf("Open of an O_APPEND fd succeeded; a write at 0 (%v) left the file %d bytes long", werr, st.Size())
	}
	if !strings.Contains(err.Error(), "O_APPEND") {
		t.Errorf("error %q does not name O_APPEND", err)
	}
	d, err = Open(af, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only Open of an O_APPEND fd: %v", err)
	}
	d.Close()
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	const size = 8 << 20
	for _, tc := range []struct {
		name string
		op   func(d *Disk, off, n int64) error
	}{
		{"discard", func(d *Disk, off, n int64) error { return d.Discard(off, n) }},
		{"write zeroes", func(d *Disk, off, n int64) error { return d.WriteZeroes(off, n, false) }},
		{"write zeroes unmap", func(d *Disk, off, n int64) error { return d.WriteZeroes(off, n, true) }},
		{"fallback zero bytes", func(d *Disk, off, n int64) error { return d.writeZeroBytes(off, n) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, d := openRW(t, size)
			full := pattern(size, 9)
			if _, err := d.WriteAt(full, 0); err != nil {
				t.Fatal(err)
			}
			// Unaligned range straddling file system blocks.
			const off, n = 4096*3 + 512, 1<<20 + 1024
			if err := tc.op(d, off, n); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:off], full[:off]) || !bytes.Equal(got[off+n:], full[off+n:]) {
				t.Fatal("bytes outside the range changed")
			}
			if !bytes.Equal(got[off:off+n], make([]byte, n)) {
				t.Fatal("range does not read back as zeroes")
			}
			if d.Size() != size {
				t.Fatal("size changed")
			}
			if err := tc.op(d, size-512, 1024); !errors.Is(err, disk.ErrOutOfRange) {
				t.Fatalf("past end: %v", err)
			}
		})
	}
}

// TestRawIsRaw writes a qcow2 header into sector 0 and checks that a new
// Open of the same file serves those exact bytes and the size of the file,
// never the qcow2 virtual size the header claims.
func TestRawIsRaw(t *testing.T) {
	const size = 1 << 20
	p, d := openRW(t, size)
	hdr := make([]byte, 512)
	copy(hdr, []byte{'Q', 'F', 'I', 0xfb, 0, 0, 0, 3}) // magic, version 3
	// virtual size field (offset 24): claim 1 TiB.
	hdr[24+2] = 0x01
	hdr[20+3] = 16 // cluster_bits
	if _, err := d.WriteAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	d.Close()

	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if d2.Size() != size {
		t.Fatalf("re-opened size %d, want the file size %d", d2.Size(), size)
	}
	got := make([]byte, 512)
	if _, err := d2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, hdr) {
		t.Fatal("sector 0 does not read back the written qcow2 header bytes")
	}
}

func TestConcurrent(t *testing.T) {
	const workers, per = 8, 64
	_, d := openRW(t, workers*per*4096)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				off := int64((w*per + i) * 4096)
				b := pattern(4096, byte(w*per+i))
				if _, err := d.WritevAt([][]byte{b[:1000], b[1000:]}, off); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for j := 0; j < workers*per; j++ {
		got := make([]byte, 4096)
		if _, err := d.ReadAt(got, int64(j*4096)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern(4096, byte(j))) {
			t.Fatalf("block %d differs", j)
		}
	}
}

func TestClosed(t *testing.T) {
	_, f := newImage(t, 4096)
	d, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadAt after Close: %v", err)
	}
	if err := d.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after Close: %v", err)
	}
	if err := d.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
}

func TestNotAFile(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	defer r.Close()
	// A pipe's read end is O_RDONLY; ask read-only so the mode check runs.
	if _, err := Open(r, Options{ReadOnly: true}); err == nil {
		t.Fatal("Open of a pipe succeeded")
	}
}

func BenchmarkReadvAt4K(b *testing.B) {
	p := filepath.Join(b.TempDir(), "d")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(64 << 20)
	d, err := Open(f, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	buf := [][]byte{make([]byte, 4096)}
	b.SetBytes(4096)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := d.ReadvAt(buf, int64(i%16384)*4096); err != nil {
			b.Fatal(err)
		}
	}
}
