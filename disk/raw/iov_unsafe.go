package raw

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxIov is how many buffers one preadv/pwritev carries. The kernel's limit
// (UIO_MAXIOV) is 1024; 64 covers a 256 KiB request of scattered 4 KiB guest
// pages in one call while keeping the batch small enough for the stack.
const maxIov = 64

// iovBatch is a fixed iovec array. It lives on the caller's stack, so a
// vectored transfer allocates nothing (unix.Preadv heap-allocates its iovec
// array above 8 buffers).
type iovBatch struct {
	v [maxIov]unix.Iovec
}

// fill loads up to maxIov non-empty buffers from bufs and returns how many
// iovecs it filled. It stops at the first empty buffer after the first one
// so that the byte count of a transfer maps back onto bufs exactly.
func (b *iovBatch) fill(bufs [][]byte) int {
	n := 0
	for _, p := range bufs {
		if n == maxIov || len(p) == 0 {
			break
		}
		b.v[n].Base = &p[0]
		b.v[n].SetLen(len(p))
		n++
	}
	return n
}

// do issues one preadv or pwritev of the first cnt iovecs at off.
func (b *iovBatch) do(fd, cnt int, off int64, write bool) (int, error) {
	trap := uintptr(unix.SYS_PREADV)
	if write {
		trap = unix.SYS_PWRITEV
	}
	// preadv takes the offset split in two longs; on 64-bit the high half
	// is ignored by the kernel and passed as 0.
	lo := uintptr(off)
	hi := uintptr(uint64(off) >> (unsafe.Sizeof(uintptr(0))*8 - 1) >> 1)
	r, _, errno := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&b.v[0])), uintptr(cnt), lo, hi, 0)
	// The iovecs point at the caller's buffers; keep them reachable until
	// the system call has returned.
	clear(b.v[:cnt])
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}
