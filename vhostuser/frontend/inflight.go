package frontend

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
)

// Inflight is a back-end's inflight region (VHOST_USER_PROTOCOL_F_
// INFLIGHT_SHMFD): the front-end keeps it for the life of the device and
// gives it to every back-end that serves the device after the one that
// allocated it, so that a back-end that starts after a crash knows which
// requests were in flight. The front-end never interprets its content; it
// only zeroes it when the device is reset (Reset: the queues' parts, and
// all but the device's own bytes after them).
type Inflight struct {
	vhostuser.Inflight
	File *os.File
}

type inflightReply struct {
	in vhostuser.Inflight
	f  *os.File
}

// GetInflightFD asks the back-end for a region that tracks requests of
// numQueues queues of up to queueSize descriptors. The caller owns the
// returned region's file.
//
// The region is the front-end's own: a sealed memfd, all zero (what a
// back-end hands out at GET_INFLIGHT_FD), of the size the back-end asked
// for (bounded by maxInflightBytes). The back-end's file is closed
// unread. The front-end zeroes the region at every device reset and gives
// it to every later back-end, so it must never be a file the back-end
// chose: a compromised plugin could hand back the disk image or the guest
// RAM memfd it holds, which would then be overwritten long after that
// plugin was replaced.
func (c *Client) GetInflightFD(numQueues, queueSize uint16) (*Inflight, error) {
	req := vhostuser.Inflight{NumQueues: numQueues, QueueSize: queueSize}
	v, err := c.call(vhostuser.GetInflightFD, req.Encode(), nil)
	if err != nil {
		return nil, err
	}
	r := v.(inflightReply)
	theirs := &Inflight{Inflight: r.in, File: r.f}
	defer theirs.Close()
	if err := theirs.check(); err != nil {
		return nil, fmt.Errorf("reply to %v: %w", vhostuser.GetInflightFD, err)
	}
	if r.in.NumQueues != numQueues || r.in.QueueSize != queueSize {
		// The layout depends on both: a back-end that answers for other
		// values would read the region differently from its successor.
		return nil, fmt.Errorf("reply to %v: region for %d queues of %d, asked %d of %d", vhostuser.GetInflightFD,
			r.in.NumQueues, r.in.QueueSize, numQueues, queueSize)
	}
	if r.in.MmapSize == 0 {
		return nil, fmt.Errorf("reply to %v: empty region", vhostuser.GetInflightFD)
	}
	f, err := newRegionFile(r.in.MmapSize)
	if err != nil {
		return nil, err
	}
	return &Inflight{Inflight: vhostuser.Inflight{MmapSize: r.in.MmapSize, NumQueues: numQueues, QueueSize: queueSize}, File: f}, nil
}

// newRegionFile makes the front-end's inflight region: a memfd of size
// zero bytes whose size is sealed (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL),
// so no back-end that maps it can truncate it under the front-end's
// Reset.
func newRegionFile(size uint64) (*os.File, error) {
	fd, err := unix.MemfdCreate("krun-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("inflight region: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inflight")
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("inflight region: ftruncate %d: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, fmt.Errorf("inflight region: seal: %w", err)
	}
	return f, nil
}

// SetInflightFD gives the back-end the region to track its requests in.
func (c *Client) SetInflightFD(in *Inflight) error {
	if in == nil || in.File == nil {
		return fmt.Errorf("%v: no region", vhostuser.SetInflightFD)
	}
	_, err := c.call(vhostuser.SetInflightFD, in.Inflight.Encode(), []*os.File{in.File})
	return err
}

// maxInflightBytes bounds the region a back-end may describe for
// numQueues queues of queueSize descriptors: the split-ring layout needs a
// 16-byte header and 16 bytes a descriptor per queue, 64-byte aligned;
// twice that (a packed-ring layout's larger entries) rounded up to a page
// leaves room for any layout a back-end may use. The front-end zeroes the
// whole region at every device reset, so a larger one (a sparse 1 TiB
// memfd) would have it allocate and write that much.
func maxInflightBytes(numQueues, queueSize uint16) uint64 {
	perQueue := (64 + 32*uint64(queueSize) + 63) &^ 63
	return (uint64(numQueues)*perQueue + 4095) &^ 4095
}

// check refuses a back-end's region that is not a regular file (a memfd)
// at least as large as the description says, or larger than its queues
// can need (maxInflightBytes): the front-end makes a region of that size
// of its own, and a back-end could otherwise have it allocate a huge one.
func (in *Inflight) check() error {
	var st unix.Stat_t
	if err := unix.Fstat(int(in.File.Fd()), &st); err != nil {
		return fmt.Errorf("inflight region: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("inflight region is not a regular file (mode %#o)", st.Mode)
	}
	if most := maxInflightBytes(in.NumQueues, in.QueueSize); in.MmapSize > most {
		return fmt.Errorf("inflight region of %d bytes for %d queues of %d descriptors: at most %d", in.MmapSize, in.NumQueues, in.QueueSize, most)
	}
	if in.MmapOffset > 1<<62 || in.MmapSize > 1<<40 || uint64(st.Size) < in.MmapOffset+in.MmapSize {
		return fmt.Errorf("inflight region %#x+%#x lies beyond the end of its file (%d bytes)", in.MmapOffset, in.MmapSize, st.Size)
	}
	return nil
}

// Reset zeroes the region, as after a device reset: nothing is in flight,
// and the next back-end initializes it afresh. In a region of this
// module's layout (the queues' parts, then vhostuser.InflightStateBytes)
// the device's own bytes after the queues stay: a failed sync of the
// disk outlives the guest's reset of the device, and so a plugin killed
// after that reset, before its rings started again, whose successor would
// otherwise find no trace of it (left open in an earlier note). Their
// contents are the back-end's; the front-end only keeps them.
func (in *Inflight) Reset() error {
	if in == nil || in.File == nil {
		return nil
	}
	// [keep, keepEnd) stays; a region of another layout keeps nothing.
	keep, keepEnd := in.MmapSize, in.MmapSize
	if q := uint64(in.NumQueues) * in.Inflight.QueueBytes(); q > 0 && q+vhostuser.InflightStateBytes <= in.MmapSize {
		keep, keepEnd = q, q+vhostuser.InflightStateBytes
	}
	for _, part := range [][2]uint64{{0, keep}, {keepEnd, in.MmapSize}} {
		if part[1] > part[0] {
			if err := in.zero(part[0], part[1]-part[0]); err != nil {
				return fmt.Errorf("reset inflight region: %w", err)
			}
		}
	}
	return nil
}

// ResetQueue zeroes queue i's part of the region only: the ring it
// tracked is gone (the driver stopped the queue while no back-end could
// be told), and the next back-end initializes the part afresh, while the
// other queues' requests in flight stay tracked. A queue's part is where
// the layout of this module's back-end framework and of QEMU's
// libvhost-user puts it (vhostuser.Inflight.QueueBytes); a region too
// small for that layout is some other back-end's, and is zeroed whole
// (Reset): its other queues' requests in flight are forgotten, which is
// better than handing the next back-end a queue state it refuses.
func (in *Inflight) ResetQueue(i int) error {
	if in == nil || in.File == nil {
		return nil
	}
	if i < 0 || i >= int(in.NumQueues) {
		return fmt.Errorf("reset inflight region of queue %d: the region has %d queues", i, in.NumQueues)
	}
	part := in.Inflight.QueueBytes()
	if uint64(in.NumQueues)*part > in.MmapSize {
		return in.Reset()
	}
	if err := in.zero(uint64(i)*part, part); err != nil {
		return fmt.Errorf("reset inflight region of queue %d: %w", i, err)
	}
	return nil
}

// zero makes n bytes at off in the region zero, through the file (never a
// mapping a back-end could truncate under the front-end): the whole pages
// among them are punched out of the memfd, which frees them instead of
// writing them (a back-end may ask for a region of hundreds of MiB, which
// a device reset would otherwise fill with zeros), and the rest is
// written.
func (in *Inflight) zero(off, n uint64) error {
	const page = 4096
	start := in.MmapOffset + off
	end := start + n
	if hs, he := (start+page-1)&^(page-1), end&^(page-1); hs < he {
		err := unix.Fallocate(int(in.File.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(hs), int64(he-hs))
		if err == nil {
			if err := in.writeZeros(start-in.MmapOffset, hs-start); err != nil {
				return err
			}
			return in.writeZeros(he-in.MmapOffset, end-he)
		}
		// A file without holes (not a memfd): written below.
	}
	return in.writeZeros(off, n)
}

// writeZeros writes n zero bytes at off in the region.
func (in *Inflight) writeZeros(off, n uint64) error {
	if n == 0 {
		return nil
	}
	buf := make([]byte, min(n, 64<<10))
	for end := off + n; off < end; {
		k := min(uint64(len(buf)), end-off)
		if _, err := in.File.WriteAt(buf[:k], int64(in.MmapOffset+off)); err != nil {
			return err
		}
		off += k
	}
	return nil
}

// Close closes the region's file.
func (in *Inflight) Close() error {
	if in == nil || in.File == nil {
		return nil
	}
	return in.File.Close()
}
