// Package testguest is a guest written in Go: it owns guest memory (a
// shareable memfd), lays out split virtqueues on the driver side, posts
// descriptor chains and waits for their completion, speaking vhost-user
// through package frontend to any back-end over a unix socket — krun-core's
// own plugins or third-party ones (qemu-storage-daemon, virtiofsd). On top
// of it, Blk is a small virtio-blk driver. Tests and krun-bench (cmd/krun-bench) use
// it.
package testguest

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// UserOffset is the distance between a guest physical address and the
// fake front-end virtual address the test guest reports for it in the
// memory table and in SET_VRING_ADDR (UserAddr = GuestAddr + UserOffset).
const UserOffset = 0x7f0000000000

// ErrNoGuestMemory is returned when the allocator cannot satisfy a request.
var ErrNoGuestMemory = errors.New("guest memory exhausted")

// Memory is guest memory backed by one memfd, mapped here and shared with
// the back-end.
type Memory struct {
	file *os.File
	data []byte
	base uint64 // guest physical address of data[0]

	mu   sync.Mutex
	free []extent // sorted, coalesced
	used map[uint64]uint64
}

type extent struct{ start, size uint64 }

// NewMemory creates size bytes of guest memory (rounded up to pages) at
// guest physical address base (page aligned).
func NewMemory(base, size uint64) (*Memory, error) {
	page := uint64(os.Getpagesize())
	if base%page != 0 {
		return nil, fmt.Errorf("guest memory base %#x not page aligned", base)
	}
	if size == 0 || size > 1<<40 {
		return nil, fmt.Errorf("guest memory size %d out of range", size)
	}
	size = (size + page - 1) &^ (page - 1)
	if base+size < base || base+size+UserOffset < base {
		return nil, fmt.Errorf("guest memory %#x+%#x overflows", base, size)
	}
	fd, err := unix.MemfdCreate("testguest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "testguest-ram")
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("size guest memory: %w", err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("map guest memory: %w", err)
	}
	return &Memory{
		file: f,
		data: data,
		base: base,
		free: []extent{{base, size}},
		used: map[uint64]uint64{},
	}, nil
}

// Close unmaps the memory and closes the memfd.
func (m *Memory) Close() error {
	var err error
	if m.data != nil {
		err = unix.Munmap(m.data)
		m.data = nil
	}
	if cerr := m.file.Close(); err == nil {
		err = cerr
	}
	return err
}

// File is the memfd.
func (m *Memory) File() *os.File { return m.file }

// Base is the guest physical address of the first byte.
func (m *Memory) Base() uint64 { return m.base }

// Size is the memory size in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.data)) }

// UserAddr converts a guest physical address to the front-end virtual
// address used on the wire.
func (m *Memory) UserAddr(gpa uint64) uint64 { return gpa + UserOffset }

// Regions describes the memory as n regions of (about) equal page-aligned
// size, contiguous in guest and user addresses, all in the same memfd at
// increasing offsets. Each region carries the same *os.File.
func (m *Memory) Regions(n int) []frontend.MemRegion {
	page := uint64(os.Getpagesize())
	total := m.Size()
	if n < 1 {
		n = 1
	}
	if uint64(n) > total/page {
		n = int(total / page)
	}
	chunk := (total / uint64(n)) &^ (page - 1)
	out := make([]frontend.MemRegion, 0, n)
	for i := 0; i < n; i++ {
		off := chunk * uint64(i)
		size := chunk
		if i == n-1 {
			size = total - off
		}
		out = append(out, frontend.MemRegion{
			MemRegion: vhostuser.MemRegion{
				GuestAddr:  m.base + off,
				Size:       size,
				UserAddr:   m.UserAddr(m.base + off),
				MmapOffset: off,
			},
			File: m.file,
		})
	}
	return out
}

// Bytes returns the n bytes at guest address gpa.
func (m *Memory) Bytes(gpa, n uint64) ([]byte, error) {
	if gpa < m.base || gpa-m.base > uint64(len(m.data)) || n > uint64(len(m.data))-(gpa-m.base) {
		return nil, fmt.Errorf("guest range %#x+%#x outside guest memory", gpa, n)
	}
	off := gpa - m.base
	return m.data[off : off+n : off+n], nil
}

// Alloc reserves size bytes aligned to align (a power of two) and returns
// their guest address. The memory is zeroed.
func (m *Memory) Alloc(size, align uint64) (uint64, error) {
	if size == 0 {
		size = 1
	}
	if align == 0 || align&(align-1) != 0 {
		return 0, fmt.Errorf("alignment %d is not a power of two", align)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, e := range m.free {
		start := (e.start + align - 1) &^ (align - 1)
		if start < e.start || start-e.start >= e.size || e.size-(start-e.start) < size {
			continue
		}
		// Split e into [e.start,start) + [start,start+size) + rest.
		rest := extent{start + size, e.size - (start - e.start) - size}
		var repl []extent
		if start > e.start {
			repl = append(repl, extent{e.start, start - e.start})
		}
		if rest.size > 0 {
			repl = append(repl, rest)
		}
		m.free = append(m.free[:i], append(repl, m.free[i+1:]...)...)
		m.used[start] = size
		b := m.data[start-m.base : start-m.base+size]
		clear(b)
		return start, nil
	}
	return 0, fmt.Errorf("%w: %d bytes aligned %d", ErrNoGuestMemory, size, align)
}

// Free releases an allocation made by Alloc.
func (m *Memory) Free(gpa uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	size, ok := m.used[gpa]
	if !ok {
		return fmt.Errorf("free of %#x: not allocated", gpa)
	}
	delete(m.used, gpa)
	i := sort.Search(len(m.free), func(i int) bool { return m.free[i].start > gpa })
	m.free = append(m.free[:i], append([]extent{{gpa, size}}, m.free[i:]...)...)
	// Coalesce with the neighbours.
	if i+1 < len(m.free) && m.free[i].start+m.free[i].size == m.free[i+1].start {
		m.free[i].size += m.free[i+1].size
		m.free = append(m.free[:i+1], m.free[i+2:]...)
	}
	if i > 0 && m.free[i-1].start+m.free[i-1].size == m.free[i].start {
		m.free[i-1].size += m.free[i].size
		m.free = append(m.free[:i], m.free[i+1:]...)
	}
	return nil
}

// FreeBytes is the total unallocated size.
func (m *Memory) FreeBytes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n uint64
	for _, e := range m.free {
		n += e.size
	}
	return n
}
