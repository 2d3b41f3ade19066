package backend

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// fileSlot holds an eventfd (call or error) that the message loop may
// replace while a ring signals it. Signalling writes the raw descriptor
// under a read lock, so it allocates nothing and can never write to a
// descriptor number that was closed and reused meanwhile.
type fileSlot struct {
	mu sync.RWMutex
	f  *os.File
	fd int
}

// swap installs f (nil: none) and closes the previous file.
func (s *fileSlot) swap(f *os.File) {
	fd := -1
	if f != nil {
		var err error
		if fd, err = rawFD(f); err != nil {
			f.Close()
			f = nil
		}
	}
	s.mu.Lock()
	old := s.f
	s.f, s.fd = f, fd
	s.mu.Unlock()
	if old != nil {
		old.Close()
	}
}

// eventfdOne is what a signal writes: 1 as a native-endian u64.
var eventfdOne = [8]byte{1}

// signal adds 1 to the eventfd in the slot, if any, without ever
// blocking: the descriptor is non-blocking, so a saturated counter or a
// full pipe (EAGAIN) is ignored (the reader has a wake-up pending anyway).
// It reports whether there was a descriptor.
func (s *fileSlot) signal() (bool, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.f == nil {
		return false, nil
	}
	if _, err := unix.Write(s.fd, eventfdOne[:]); err != nil && err != unix.EAGAIN {
		return true, err
	}
	return true, nil
}

// rawFD returns f's descriptor without switching it to blocking mode (as
// f.Fd would).
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// nonBlockingDup duplicates f's descriptor, sets O_NONBLOCK and returns it
// as a file in Go's poller (so kick reads park the goroutine and can be
// cancelled with a deadline, and call writes never block). O_NONBLOCK is
// shared with the front-end's copy, as with every vhost-user
// implementation; eventfd users do not depend on it.
func nonBlockingDup(f *os.File) (*os.File, error) {
	fd, err := rawFD(f)
	if err != nil {
		return nil, err
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	if err := unix.SetNonblock(nfd, true); err != nil {
		unix.Close(nfd)
		return nil, fmt.Errorf("set O_NONBLOCK: %w", err)
	}
	return os.NewFile(uintptr(nfd), "vhost-user-eventfd"), nil
}
