package fs

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxIov is how many buffers one preadv/pwritev carries: 1 MiB of
// scattered 4 KiB guest pages plus the odd unaligned head and tail.
const maxIov = 260

// iovec is a fixed iovec array owned by one request's scratch space, so a
// vectored transfer between a file and guest memory allocates nothing.
type iovec struct {
	v [maxIov]unix.Iovec
}

// fill loads up to maxIov non-empty buffers from bufs and returns how many
// buffers of bufs it consumed and how many iovecs it filled.
func (b *iovec) fill(bufs [][]byte) (used, cnt int) {
	for _, p := range bufs {
		if cnt == maxIov {
			break
		}
		used++
		if len(p) == 0 {
			continue
		}
		b.v[cnt].Base = &p[0]
		b.v[cnt].SetLen(len(p))
		cnt++
	}
	return used, cnt
}

// do issues one preadv or pwritev of the first cnt iovecs at off;
// nonzero flags (RWF_*) make it preadv2 or pwritev2.
func (b *iovec) do(fd, cnt int, off int64, write bool, flags int) (int, error) {
	trap := uintptr(unix.SYS_PREADV)
	switch {
	case write && flags != 0:
		trap = unix.SYS_PWRITEV2
	case write:
		trap = unix.SYS_PWRITEV
	case flags != 0:
		trap = unix.SYS_PREADV2
	}
	for {
		// The offset goes in two longs; on 64-bit the high one is 0.
		lo := uintptr(off)
		hi := uintptr(uint64(off) >> (unsafe.Sizeof(uintptr(0))*8 - 1) >> 1)
		r, _, errno := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&b.v[0])), uintptr(cnt), lo, hi, uintptr(flags))
		if errno == unix.EINTR {
			continue
		}
		// The iovecs point into guest memory; drop them once the call is
		// done so nothing keeps them past the request.
		clear(b.v[:cnt])
		if errno != 0 {
			return 0, errno
		}
		return int(r), nil
	}
}

// transfer moves data between fd at off and bufs (read: file -> bufs),
// looping over batches and short transfers. It returns the byte count; it
// stops early at end of file (read) and returns an error only when nothing
// was transferred.
func (b *iovec) transfer(fd int, bufs [][]byte, off int64, write bool) (int, error) {
	return b.transferFlags(fd, bufs, off, write, 0)
}

// transferFlags is transfer with RWF_* flags for each call.
func (b *iovec) transferFlags(fd int, bufs [][]byte, off int64, write bool, flags int) (int, error) {
	total := 0
	for len(bufs) > 0 {
		used, cnt := b.fill(bufs)
		if cnt == 0 {
			break
		}
		want := 0
		for _, v := range b.v[:cnt] {
			want += int(v.Len)
		}
		n, err := b.do(fd, cnt, off+int64(total), write, flags)
		if err != nil {
			if total > 0 {
				return total, nil
			}
			return 0, err
		}
		total += n
		if n < want {
			if n == 0 {
				return total, nil // EOF (read) or no progress (write)
			}
			// Partial: drop what was done and go again.
			bufs = advance(bufs, n)
			continue
		}
		bufs = bufs[used:]
	}
	return total, nil
}

// advance returns bufs with the first n bytes removed. It re-slices the
// caller's slice of slices in place.
func advance(bufs [][]byte, n int) [][]byte {
	for n > 0 && len(bufs) > 0 {
		if n < len(bufs[0]) {
			bufs[0] = bufs[0][n:]
			return bufs
		}
		n -= len(bufs[0])
		bufs = bufs[1:]
	}
	return bufs
}
