// Package disk defines the interface every disk image format implements, so
// that raw and qcow2 images plug into the same virtio-blk device.
//
// The format of an image always comes from the user's configuration; nothing
// in this package or below it guesses a format from an image's content.
package disk

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/krun-core/krun-core/devopts"
)

// Disk is a virtual block device backed by an image. Implementations are safe
// for concurrent use.
type Disk interface {
	// ReadAt reads len(p) bytes of virtual content at off.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at virtual offset off.
	WriteAt(p []byte, off int64) (int, error)
	// Size is the virtual size in bytes.
	Size() int64
	// Flush returns once everything written before it is on stable storage.
	Flush() error
	// Discard deallocates [off, off+n); the range may read back as zeroes.
	Discard(off, n int64) error
	// WriteZeroes makes [off, off+n) read as zeroes; with unmap the
	// implementation may deallocate the range.
	WriteZeroes(off, n int64, unmap bool) error
	// ReadOnly reports whether writes are refused.
	ReadOnly() bool
	// Close releases the image's resources. It does not flush.
	Close() error
}

// Format names an image format. It is only ever set from configuration;
// the names are shared with the host (devopts).
type Format = devopts.Format

// The formats krun-core serves.
const (
	Raw   = devopts.Raw
	QCOW2 = devopts.QCOW2
)

// ParseFormat validates a user-supplied format name.
func ParseFormat(s string) (Format, error) { return devopts.ParseFormat(s) }

// ErrReadOnly is returned by writes to a read-only disk.
var ErrReadOnly = errors.New("disk is read-only")

// ErrOutOfRange is returned for accesses beyond the virtual size.
var ErrOutOfRange = errors.New("access beyond end of disk")

// ErrSyncFailed is returned by every Flush after one failed: on Linux a
// failed writeback is reported by one fdatasync only (the pages it could
// not write are then clean), so a later one that succeeds would call
// writes durable that were lost. As QEMU's file-posix does
// (page_cache_inconsistent), the failure sticks until the image is opened
// again.
var ErrSyncFailed = errors.New("an earlier sync of the image failed: what was written since the last successful flush may be lost")

// SyncLatch remembers the first failed sync of an image, so that every
// later Flush fails (ErrSyncFailed). Reading it is one atomic load: it
// sits on the write paths.
type SyncLatch struct{ first atomic.Pointer[error] }

// Fail records err unless a failure was recorded already.
func (l *SyncLatch) Fail(err error) { l.first.CompareAndSwap(nil, &err) }

// SyncLatched is a disk whose failed-sync latch can be read and set from
// outside: the virtio-blk device keeps it across the restarts of its
// plugin process (a restarted plugin that forgot it would acknowledge a
// FLUSH after the kernel reported the lost writeback to the dead one).
type SyncLatched interface {
	// SyncFailed is ErrSyncFailed with the first failure, or nil.
	SyncFailed() error
	// FailSync latches err as a failed sync: every later Flush fails
	// (and every write of a qcow2 image), as after one that failed here.
	FailSync(err error)
}

// Err is ErrSyncFailed with the first failure, or nil.
func (l *SyncLatch) Err() error {
	if e := l.first.Load(); e != nil {
		return fmt.Errorf("%w (%v)", ErrSyncFailed, *e)
	}
	return nil
}
