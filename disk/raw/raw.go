// Package raw serves a raw image — a file or block device whose bytes are the
// disk's bytes — as a disk.Disk.
//
// Raw is raw: nothing here ever looks at the image's content. A guest that
// writes a qcow2 (or any other) header into sector 0 reads those exact bytes
// back, on this run and every later run that is configured with format=raw.
//
// The image arrives as an *os.File the caller opened (in krun-core, an fd the
// plugin host passed in); this package opens no paths.
package raw

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
)

// Options configures Open.
type Options struct {
	// ReadOnly refuses every write, discard and write-zeroes with
	// disk.ErrReadOnly. A file opened O_RDONLY must be opened ReadOnly.
	ReadOnly bool
}

// Disk is a raw image. It is safe for concurrent use: every access is a
// positioned pread/pwrite/fallocate on the same fd, which the kernel
// serialises as needed.
type Disk struct {
	f        *os.File
	fd       int
	size     int64
	readOnly bool
	closed   atomic.Bool

	// noZeroRange / noPunchHole / noAllocate remember that the file
	// system refused a fallocate mode, so that later calls go straight
	// to the fallback.
	noZeroRange atomic.Bool
	noPunchHole atomic.Bool
	noAllocate  atomic.Bool
	// synced remembers a failed fdatasync (disk.ErrSyncFailed).
	synced disk.SyncLatch
	// blockDev: a block device refuses a range not aligned to its
	// logical sectors with EINVAL, which says nothing of later ranges.
	blockDev bool
}

var _ disk.Disk = (*Disk)(nil)

// ErrClosed is returned by every method after Close.
var ErrClosed = errors.New("raw image is closed")

// Open serves f as a raw image. The virtual size is f's size at Open (the
// end offset for a block device). Open takes ownership of f: Close closes it.
func Open(f *os.File, opts Options) (*Disk, error) {
	if f == nil {
		return nil, errors.New("raw: nil image file")
	}
	fd := int(f.Fd())
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("raw: query image fd flags: %w", err)
	}
	switch fl & unix.O_ACCMODE {
	case unix.O_RDONLY:
		if !opts.ReadOnly {
			return nil, errors.New("raw: image fd is opened read-only; configure the disk readonly")
		}
	case unix.O_WRONLY:
		return nil, errors.New("raw: image fd is opened write-only; it must be readable")
	}
	if fl&unix.O_APPEND != 0 && !opts.ReadOnly {
		// Linux puts every pwrite on an O_APPEND fd at the end of the
		// file, whatever its offset: the guest's writes would grow
		// the file and never reach their sectors.
		return nil, errors.New("raw: image fd is opened O_APPEND, which places every write at its end; open it without O_APPEND or configure the disk readonly")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("raw: stat image: %w", err)
	}
	var size int64
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		size = st.Size
	case unix.S_IFBLK:
		// The size of a block device is where its end is.
		end, err := unix.Seek(fd, 0, io.SeekEnd)
		if err != nil {
			return nil, fmt.Errorf("raw: find size of block device: %w", err)
		}
		size = end
	default:
		return nil, fmt.Errorf("raw: image is neither a regular file nor a block device (mode %#o)", st.Mode&unix.S_IFMT)
	}
	if size < 0 {
		return nil, fmt.Errorf("raw: image has negative size %d", size)
	}
	return &Disk{f: f, fd: fd, size: size, readOnly: opts.ReadOnly, blockDev: st.Mode&unix.S_IFMT == unix.S_IFBLK}, nil
}

// Size is the image size in bytes at Open.
func (d *Disk) Size() int64 { return d.size }

// ReadOnly reports whether the image was opened read-only.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// check validates [off, off+n) against the virtual size, overflow-safe.
func (d *Disk) check(off, n int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("raw: range [%d,+%d) of a %d-byte image: %w", off, n, d.size, disk.ErrOutOfRange)
	}
	return nil
}

func (d *Disk) checkWrite(off, n int64) error {
	if d.readOnly {
		return disk.ErrReadOnly
	}
	return d.check(off, n)
}

// ReadAt reads len(p) bytes at off. A range reaching past Size fails with
// disk.ErrOutOfRange before any byte is read.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pread(d.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("raw: pread %d bytes at %d: %w", len(p)-done, off+int64(done), err)
		}
		if n == 0 {
			// The file shrank under us.
			return done, fmt.Errorf("raw: pread at %d: %w", off+int64(done), io.ErrUnexpectedEOF)
		}
		done += n
	}
	return done, nil
}

// WriteAt writes p at off. A range reaching past Size fails with
// disk.ErrOutOfRange; a raw image never grows.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(d.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("raw: pwrite %d bytes at %d: %w", len(p)-done, off+int64(done), err)
		}
		if n == 0 {
			return done, fmt.Errorf("raw: pwrite at %d: %w", off+int64(done), io.ErrShortWrite)
		}
		done += n
	}
	return done, nil
}

// ReadvAt reads into bufs, in order, starting at off, with preadv: one
// system call for a scattered guest buffer and no copy. It is the vectored
// fast path the virtio-blk device uses when the disk offers it.
func (d *Disk) ReadvAt(bufs [][]byte, off int64) (int, error) {
	total, err := iovLen(bufs)
	if err != nil {
		return 0, err
	}
	if err := d.check(off, total); err != nil {
		return 0, err
	}
	return d.vectored(bufs, off, false)
}

// WritevAt writes bufs, in order, starting at off, with pwritev.
func (d *Disk) WritevAt(bufs [][]byte, off int64) (int, error) {
	total, err := iovLen(bufs)
	if err != nil {
		return 0, err
	}
	if err := d.checkWrite(off, total); err != nil {
		return 0, err
	}
	return d.vectored(bufs, off, true)
}

func iovLen(bufs [][]byte) (int64, error) {
	var total int64
	for _, b := range bufs {
		if int64(len(b)) > (1<<62)-total {
			return 0, errors.New("raw: vectored request too large")
		}
		total += int64(len(b))
	}
	return total, nil
}

// vectored runs preadv/pwritev over bufs in batches of at most maxIov
// entries, resuming after short transfers.
func (d *Disk) vectored(bufs [][]byte, off int64, write bool) (int, error) {
	done := 0
	var iov iovBatch
	for len(bufs) > 0 {
		// Drop leading empty buffers: they would make a zero return
		// ambiguous.
		if len(bufs[0]) == 0 {
			bufs = bufs[1:]
			continue
		}
		cnt := iov.fill(bufs)
		n, err := iov.do(d.fd, cnt, off+int64(done), write)
		if err == unix.EINTR {
			continue
		}
		op := "preadv"
		if write {
			op = "pwritev"
		}
		if err != nil {
			return done, fmt.Errorf("raw: %s at %d: %w", op, off+int64(done), err)
		}
		if n == 0 {
			if write {
				return done, fmt.Errorf("raw: %s at %d: %w", op, off+int64(done), io.ErrShortWrite)
			}
			return done, fmt.Errorf("raw: %s at %d: %w", op, off+int64(done), io.ErrUnexpectedEOF)
		}
		done += n
		// Consume n bytes from bufs. The caller's slice is not modified:
		// bufs is a local header; a partly consumed buffer is re-sliced.
		for n > 0 {
			if n >= len(bufs[0]) {
				n -= len(bufs[0])
				bufs = bufs[1:]
				continue
			}
			// Partial buffer: continue with a single-buffer transfer for
			// its remainder so the caller's slice stays untouched.
			rest := bufs[0][n:]
			var m int
			var err error
			if write {
				m, err = d.WriteAt(rest, off+int64(done))
			} else {
				m, err = d.ReadAt(rest, off+int64(done))
			}
			done += m
			if err != nil {
				return done, err
			}
			bufs = bufs[1:]
			n = 0
		}
	}
	return done, nil
}

// SyncFailed is the latched sync failure (disk.SyncLatched).
func (d *Disk) SyncFailed() error { return d.synced.Err() }

// FailSync latches err as a failed sync (disk.SyncLatched).
func (d *Disk) FailSync(err error) { d.synced.Fail(err) }

// Flush makes every completed write durable with fdatasync. Once one
// failed, every later Flush fails (disk.ErrSyncFailed).
func (d *Disk) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	if err := d.synced.Err(); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	for {
		err := unix.Fdatasync(d.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			err = fmt.Errorf("raw: fdatasync: %w", err)
			d.synced.Fail(err)
			return err
		}
		return nil
	}
}

// Discard deallocates [off, off+n) by punching a hole (the range then reads
// as zeroes). Discard is advisory: where the file system cannot punch holes
// it does nothing and succeeds.
func (d *Disk) Discard(off, n int64) error {
	if err := d.checkWrite(off, n); err != nil {
		return err
	}
	if n == 0 || d.noPunchHole.Load() {
		return nil
	}
	err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if d.unsupported(err, &d.noPunchHole) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("raw: discard [%d,+%d): %w", off, n, err)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeroes. With unmap it punches a
// hole; otherwise (or where holes are unsupported) it uses
// FALLOC_FL_ZERO_RANGE, which keeps the range allocated, or, where that is
// unsupported (tmpfs), punches a hole and allocates it again; failing all
// that it writes zeroes. Without unmap the range ends up allocated.
//
// The range lies inside the file, so zeroing and allocating leave the size
// as it is without FALLOC_FL_KEEP_SIZE; the sandbox's block profile
// refuses that flag but with PUNCH_HOLE (past the end of the file it would
// allocate blocks without growing the size, beyond RLIMIT_FSIZE's reach).
func (d *Disk) WriteZeroes(off, n int64, unmap bool) error {
	if err := d.checkWrite(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if unmap && !d.noPunchHole.Load() {
		err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !d.unsupported(err, &d.noPunchHole) {
			return fmt.Errorf("raw: write zeroes (punch hole) [%d,+%d): %w", off, n, err)
		}
	}
	if !d.noZeroRange.Load() {
		err := d.fallocate(unix.FALLOC_FL_ZERO_RANGE, off, n)
		if err == nil {
			return nil
		}
		if !d.unsupported(err, &d.noZeroRange) {
			return fmt.Errorf("raw: write zeroes (zero range) [%d,+%d): %w", off, n, err)
		}
	}
	if !unmap && !d.noPunchHole.Load() && !d.noAllocate.Load() {
		// A hole reads back as zeroes, and allocating it again keeps
		// what the caller asked for without unmap: the range stays
		// provisioned, so later writes cannot fail for want of space
		// (as QEMU's file-posix does). It beats writing every byte.
		err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			err = d.fallocate(0, off, n)
			if err == nil {
				return nil
			}
			if !d.unsupported(err, &d.noAllocate) {
				return fmt.Errorf("raw: write zeroes (allocate) [%d,+%d): %w", off, n, err)
			}
			// The hole reads as zeroes; writing them allocates it.
			return d.writeZeroBytes(off, n)
		}
		if !d.unsupported(err, &d.noPunchHole) {
			return fmt.Errorf("raw: write zeroes (punch hole) [%d,+%d): %w", off, n, err)
		}
	}
	return d.writeZeroBytes(off, n)
}

// writeZeroBytes is the last-resort WriteZeroes: plain zero writes.
func (d *Disk) writeZeroBytes(off, n int64) error {
	const chunk = 256 << 10
	zero := make([]byte, min(n, chunk))
	for n > 0 {
		m := min(n, int64(len(zero)))
		if _, err := d.WriteAt(zero[:m], off); err != nil {
			return err
		}
		off += m
		n -= m
	}
	return nil
}

func (d *Disk) fallocate(mode uint32, off, n int64) error {
	for {
		err := unix.Fallocate(d.fd, mode, off, n)
		if err != unix.EINTR {
			return err
		}
	}
}

func isUnsupported(err error) bool {
	return err == unix.EOPNOTSUPP || err == unix.ENOSYS || err == unix.EINVAL
}

// unsupported reports whether err says a fallocate mode cannot do this
// range, so that the caller falls back, and remembers it in off where it
// says the file cannot do the mode at all: a block device's EINVAL is
// about this range's alignment only.
func (d *Disk) unsupported(err error, off *atomic.Bool) bool {
	if !isUnsupported(err) {
		return false
	}
	if !d.blockDev || err != unix.EINVAL {
		off.Store(true)
	}
	return true
}

// Close closes the image file. It does not flush.
func (d *Disk) Close() error {
	if d.closed.Swap(true) {
		return ErrClosed
	}
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("raw: close image: %w", err)
	}
	return nil
}
