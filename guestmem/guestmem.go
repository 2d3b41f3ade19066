// Package guestmem maps guest memory regions that another process shares
// with us (memfds passed over vhost-user, or the core's own memfd) and gives
// checked access to them by guest physical address.
//
// Every address and length here is controlled by the guest. All accessors
// refuse a range that is not wholly inside one region, with overflow-safe
// arithmetic, and return errors instead of panicking.
//
// A *Memory is immutable after Map. A memory-table change builds a new one;
// whoever swaps them must make sure no slice obtained from the old one is used
// after Close (the vhost-user back-end stops its ring workers first).
package guestmem

import (
	"errors"
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// Addr is a guest physical address.
type Addr uint64

// Region describes one contiguous piece of guest memory backed by a file.
type Region struct {
	// GuestAddr is the guest physical address of the first byte.
	GuestAddr Addr
	// Size is the region's length in bytes.
	Size uint64
	// UserAddr is the front-end's virtual address of the first byte
	// (vhost-user ring addresses are given in that address space); 0 if
	// unused.
	UserAddr uint64
	// File is the memfd (or other MAP_SHARED-able file) holding the region.
	// Map does not take ownership: the mapping stays valid after File is
	// closed.
	File *os.File
	// Offset is where the region starts inside File.
	Offset uint64
}

// Errors returned by the accessors. They are wrapped with the offending
// address and length.
var (
	ErrOutOfRange = errors.New("guest address range not inside guest memory")
	ErrBadRegion  = errors.New("invalid guest memory region")
)

type mapped struct {
	Region
	mapping []byte // whole mmap, page aligned
	data    []byte // the region's bytes: len(data) == Size
}

// Memory is a set of mapped guest memory regions.
type Memory struct {
	regions []mapped // sorted by GuestAddr, non-overlapping
}

// MaxRegions bounds how many regions one Memory may hold (vhost-user's
// CONFIGURE_MEM_SLOTS maximum is 509).
const MaxRegions = 512

// Map validates the regions and maps each of them shared and read-write.
func Map(regions []Region) (*Memory, error) {
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("%w: %d regions, at most %d", ErrBadRegion, len(regions), MaxRegions)
	}
	if err := validate(regions); err != nil {
		return nil, err
	}
	m := &Memory{regions: make([]mapped, 0, len(regions))}
	pageSize := uint64(os.Getpagesize())
	for i, r := range regions {
		base := r.Offset &^ (pageSize - 1)
		skew := r.Offset - base
		length := r.Size + skew
		if length < r.Size || length > uint64(maxInt) {
			m.Close()
			return nil, fmt.Errorf("%w: region %d too large to map", ErrBadRegion, i)
		}
		if base > uint64(maxInt64) {
			m.Close()
			return nil, fmt.Errorf("%w: region %d offset %#x too large", ErrBadRegion, i, r.Offset)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(r.File.Fd()), &st); err != nil {
			m.Close()
			return nil, fmt.Errorf("stat guest memory region %d: %w", i, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < r.Offset+r.Size {
			// Touching the part past the end would raise SIGBUS.
			m.Close()
			return nil, fmt.Errorf("%w: region %d ends at file offset %#x, past the end of its file (%#x bytes)", ErrBadRegion, i, r.Offset+r.Size, st.Size)
		}
		b, err := unix.Mmap(int(r.File.Fd()), int64(base), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("map guest memory region %d (guest %#x, size %#x): %w", i, r.GuestAddr, r.Size, err)
		}
		// Guest memory stays out of a core dump of this process: the
		// kernel pipes a dump to a core_pattern handler
		// (systemd-coredump, apport) whatever RLIMIT_CORE says, leaving
		// the choice to it, and the guest's memory is not the
		// back-end's to hand on. Best effort: a kernel that refuses the
		// advice maps the memory all the same.
		_ = unix.Madvise(b, unix.MADV_DONTDUMP)
		m.regions = append(m.regions, mapped{Region: r, mapping: b, data: b[skew : skew+r.Size : skew+r.Size]})
	}
	sort.Slice(m.regions, func(i, j int) bool { return m.regions[i].GuestAddr < m.regions[j].GuestAddr })
	return m, nil
}

const (
	maxInt   = int(^uint(0) >> 1)
	maxInt64 = 1<<63 - 1
)

func validate(regions []Region) error {
	for i, r := range regions {
		if r.File == nil {
			return fmt.Errorf("%w: region %d has no file", ErrBadRegion, i)
		}
		if r.Size == 0 {
			return fmt.Errorf("%w: region %d is empty", ErrBadRegion, i)
		}
		if uint64(r.GuestAddr)+r.Size-1 < uint64(r.GuestAddr) {
			return fmt.Errorf("%w: region %d guest range %#x+%#x overflows", ErrBadRegion, i, r.GuestAddr, r.Size)
		}
		if r.UserAddr+r.Size-1 < r.UserAddr {
			return fmt.Errorf("%w: region %d user range %#x+%#x overflows", ErrBadRegion, i, r.UserAddr, r.Size)
		}
		if r.Offset+r.Size-1 < r.Offset {
			return fmt.Errorf("%w: region %d file range %#x+%#x overflows", ErrBadRegion, i, r.Offset, r.Size)
		}
		for j := 0; j < i; j++ {
			o := regions[j]
			if overlaps(uint64(r.GuestAddr), r.Size, uint64(o.GuestAddr), o.Size) {
				return fmt.Errorf("%w: regions %d and %d overlap in guest memory", ErrBadRegion, j, i)
			}
			if r.UserAddr != 0 && o.UserAddr != 0 && overlaps(r.UserAddr, r.Size, o.UserAddr, o.Size) {
				return fmt.Errorf("%w: regions %d and %d overlap in user addresses", ErrBadRegion, j, i)
			}
		}
	}
	return nil
}

// overlaps reports whether [a, a+n) and [b, b+m) intersect; n, m > 0 and
// neither range overflows (validated before).
func overlaps(a, n, b, m uint64) bool {
	return a <= b+m-1 && b <= a+n-1
}

// find returns the region holding [a, a+n) wholly, n >= 1.
func (m *Memory) find(a Addr, n uint64) (*mapped, uint64, bool) {
	last := uint64(a) + n - 1
	if last < uint64(a) {
		return nil, 0, false
	}
	// Few regions in practice; a linear scan beats binary search here.
	for i := range m.regions {
		r := &m.regions[i]
		start := uint64(r.GuestAddr)
		if uint64(a) >= start && last <= start+r.Size-1 {
			return r, uint64(a) - start, true
		}
	}
	return nil, 0, false
}

// Slice returns the n bytes at guest address a as a slice into guest memory.
// The range must lie wholly inside one region. n == 0 yields an empty slice
// when a is inside (or at the end of) a region. The slice is valid until the
// Memory is closed.
func (m *Memory) Slice(a Addr, n uint64) ([]byte, error) {
	if n == 0 {
		for i := range m.regions {
			r := &m.regions[i]
			if uint64(a) >= uint64(r.GuestAddr) && uint64(a)-uint64(r.GuestAddr) <= r.Size {
				off := uint64(a) - uint64(r.GuestAddr)
				return r.data[off:off:off], nil
			}
		}
		return nil, fmt.Errorf("%w: %#x+0", ErrOutOfRange, a)
	}
	r, off, ok := m.find(a, n)
	if !ok {
		return nil, fmt.Errorf("%w: %#x+%#x", ErrOutOfRange, a, n)
	}
	return r.data[off : off+n : off+n], nil
}

// Read copies len(p) bytes from guest address a into p.
func (m *Memory) Read(a Addr, p []byte) error {
	b, err := m.Slice(a, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, b)
	return nil
}

// Write copies p to guest address a.
func (m *Memory) Write(a Addr, p []byte) error {
	b, err := m.Slice(a, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(b, p)
	return nil
}

// TranslateUser converts a front-end virtual address range [uaddr, uaddr+n)
// to a guest physical address. The range must lie inside one region.
func (m *Memory) TranslateUser(uaddr, n uint64) (Addr, error) {
	if n == 0 {
		n = 1
	}
	last := uaddr + n - 1
	if last < uaddr {
		return 0, fmt.Errorf("%w: user address %#x+%#x overflows", ErrOutOfRange, uaddr, n)
	}
	for i := range m.regions {
		r := &m.regions[i]
		if r.UserAddr == 0 && uaddr != 0 {
			continue
		}
		if uaddr >= r.UserAddr && last <= r.UserAddr+r.Size-1 {
			return r.GuestAddr + Addr(uaddr-r.UserAddr), nil
		}
	}
	return 0, fmt.Errorf("%w: user address %#x+%#x", ErrOutOfRange, uaddr, n)
}

// Regions returns the regions, sorted by guest address.
func (m *Memory) Regions() []Region {
	out := make([]Region, len(m.regions))
	for i, r := range m.regions {
		out[i] = r.Region
	}
	return out
}

// Size returns the total size of all regions.
func (m *Memory) Size() uint64 {
	var n uint64
	for _, r := range m.regions {
		n += r.Size
	}
	return n
}

// Close unmaps every region. Slices obtained before must not be used after.
func (m *Memory) Close() error {
	var first error
	for i := range m.regions {
		if m.regions[i].mapping == nil {
			continue
		}
		if err := unix.Munmap(m.regions[i].mapping); err != nil && first == nil {
			first = fmt.Errorf("unmap guest memory region at %#x: %w", m.regions[i].GuestAddr, err)
		}
		m.regions[i].mapping = nil
		m.regions[i].data = nil
	}
	m.regions = nil
	return first
}

// NewMemfd creates an anonymous shareable file of the given size, suitable as
// guest memory that other processes can map (the core and the test guest use
// it). Its size can be sealed (SealSize).
func NewMemfd(name string, size uint64) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	if size > maxInt64 {
		f.Close()
		return nil, fmt.Errorf("memfd %s: size %d too large", name, size)
	}
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("size memfd %s: %w", name, err)
	}
	return f, nil
}

// SealSize fixes the size of a memfd from NewMemfd for good
// (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL). Guest RAM goes to every
// plugin, and a plugin (which may be compromised) that could shrink it
// would make the core's own accesses to its mapping fault.
func SealSize(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("seal memfd %s: %w", f.Name(), err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		_, serr = unix.FcntlInt(fd, unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL)
	}); err != nil {
		return fmt.Errorf("seal memfd %s: %w", f.Name(), err)
	}
	if serr != nil {
		return fmt.Errorf("seal memfd %s: %w", f.Name(), serr)
	}
	return nil
}
