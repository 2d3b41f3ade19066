package backend

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/virtq"
)

// Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings;
// QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking").
//
// The back-end allocates a shared region on GET_INFLIGHT_FD and hands it
// to the front-end, which keeps it across back-end crashes and gives it to
// the next back-end with SET_INFLIGHT_FD. Per queue the region holds a
// header and one entry per descriptor:
//
//	offset  size  header
//	0       8     features (0)
//	8       2     version (1; 0 means not initialized)
//	10      2     desc_num (entries that follow, >= the ring size)
//	12      2     last_batch_head (newest head of the last used batch)
//	14      2     used_idx (the used index once the last batch was cleared)
//	16      16*desc_num entries:
//	                0 inflight (1 byte) 1 padding (5) 6 next (2) 8 counter (8)
//
// The ring engine marks a head (counter, then inflight = 1) when it takes
// the chain, links it into the last batch (next, last_batch_head) when its
// used element is added, and after the used index is published clears
// inflight for the batch and records used_idx. A new back-end (recover)
// first undoes a batch that was published but not cleared (the used index
// in guest memory differs from used_idx: the difference is the batch size,
// walked from last_batch_head), then resubmits every head still marked, in
// counter order; the next available index is the used index plus their
// number. Each queue's part of the region is 64-byte aligned.
//
// The front-end can write the region at any time, so every value read from
// it is checked before use (heads against the ring size, the batch walk
// against the ring size, desc_num against the region), and every access
// runs with faults caught (a truncated file), like guest memory.

// After the queues' parts the region holds vhostuser.InflightStateBytes
// of the device's own (DeviceState): flags that must outlive a back-end
// process, which the front-end keeps with the region and hands the next
// one. A region without them (a front-end that kept one from a back-end
// before them) works as before, without device state.

const (
	inflightHeaderSize = 16
	inflightEntrySize  = 16
	inflightAlign      = 64
	inflightVersion    = 1

	// offsets in the header and in an entry
	inflightOffVersion   = 8
	inflightOffDescNum   = 10
	inflightOffBatchHead = 12
	inflightOffUsedIdx   = 14
	inflightOffNext      = 6
	inflightOffCounter   = 8
)

// InflightQueueBytes is the size of one queue's part of the inflight
// region for queues of up to queueSize descriptors.
func InflightQueueBytes(queueSize uint16) uint64 {
	return vhostuser.Inflight{QueueSize: queueSize}.QueueBytes()
}

// checkInflight checks an inflight description's queue count and size.
func checkInflight(in vhostuser.Inflight) error {
	if in.NumQueues == 0 || in.NumQueues > vhostuser.MaxQueues {
		return fmt.Errorf("%w: inflight region for %d queues, want 1..%d", ErrBadValue, in.NumQueues, vhostuser.MaxQueues)
	}
	if in.QueueSize == 0 || in.QueueSize > virtq.MaxSize {
		return fmt.Errorf("%w: inflight region for queues of %d, want 1..%d", ErrBadValue, in.QueueSize, virtq.MaxSize)
	}
	return nil
}

// newInflightFile creates the region GET_INFLIGHT_FD hands out: a memfd of
// the size the description asks for, all zero (every queue uninitialized).
func newInflightFile(in vhostuser.Inflight) (*os.File, uint64, error) {
	if err := checkInflight(in); err != nil {
		return nil, 0, err
	}
	size := uint64(in.NumQueues)*InflightQueueBytes(in.QueueSize) + vhostuser.InflightStateBytes
	fd, err := unix.MemfdCreate("krun-inflight", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, 0, fmt.Errorf("inflight region: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, 0, fmt.Errorf("inflight region: ftruncate %d: %w", size, err)
	}
	return os.NewFile(uintptr(fd), "inflight"), size, nil
}

// inflightRegion is the mapping of a region received with SET_INFLIGHT_FD.
type inflightRegion struct {
	mem       []byte
	numQueues int
	queueSize uint16
	stride    uint64
	state     []byte // the device's flags and their mark (16 bytes), nil when the region has none
}

// mapInflight checks the description against the file and maps it.
func mapInflight(f *os.File, in vhostuser.Inflight) (*inflightRegion, error) {
	if err := checkInflight(in); err != nil {
		return nil, err
	}
	stride := InflightQueueBytes(in.QueueSize)
	need := uint64(in.NumQueues) * stride
	if in.MmapSize < need {
		return nil, fmt.Errorf("%w: inflight region of %d bytes, %d queues of %d need %d", ErrBadValue, in.MmapSize, in.NumQueues, in.QueueSize, need)
	}
	if in.MmapOffset%uint64(os.Getpagesize()) != 0 {
		return nil, fmt.Errorf("%w: inflight region offset %#x is not page aligned", ErrBadValue, in.MmapOffset)
	}
	// Only the part the queues and the device state use is mapped; a
	// region that lies beyond the end of its file is refused (touching
	// it would fault).
	withState := in.MmapSize >= need+vhostuser.InflightStateBytes
	if withState {
		need += vhostuser.InflightStateBytes
	}
	if err := checkFileSize(slot{MemRegion: vhostuser.MemRegion{Size: need, MmapOffset: in.MmapOffset}, file: f}); err != nil {
		return nil, fmt.Errorf("inflight region: %w", err)
	}
	if in.MmapOffset > 1<<62 {
		return nil, fmt.Errorf("%w: inflight region offset %#x", ErrBadValue, in.MmapOffset)
	}
	fd, err := rawFD(f)
	if err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(fd, int64(in.MmapOffset), int(need), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("inflight region: mmap: %w", err)
	}
	r := &inflightRegion{mem: mem, numQueues: int(in.NumQueues), queueSize: in.QueueSize, stride: stride}
	if withState {
		off := uint64(in.NumQueues) * stride // 64-byte aligned
		r.state = mem[off : off+16 : off+16]
	}
	return r, nil
}

func (r *inflightRegion) close() {
	if r != nil && r.mem != nil {
		unix.Munmap(r.mem)
		r.mem = nil
	}
}

// queue returns queue i's part of the region, or nil when the region has
// none for it.
func (r *inflightRegion) queue(i int) []byte {
	if r == nil || i < 0 || i >= r.numQueues {
		return nil
	}
	off := uint64(i) * r.stride
	return r.mem[off : off+r.stride : off+r.stride]
}

// DeviceState is a device's few flags that outlive its back-end process:
// kept in the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
// which the front-end holds across back-end crashes and hands to the next
// back-end. A device that implements StateKeeper gets it when the
// front-end sets the region up. Flags only ever get set; krun-core's
// front-end keeps them at a device reset (it zeroes the queues' parts
// only), a front-end that zeroes the whole region (QEMU) clears them, so
// a device sets its flags again when its rings start (Device.Queue). The
// front-end can write the region too: a flag read from it is a hint of
// the front-end's, never trusted for anything but failing safe.
type DeviceState struct {
	mu sync.Mutex
	b  []byte // 16 bytes of the mapped region (stateWords); nil once it is unmapped
}

// NewDeviceState returns a state kept in this process's memory only: for a
// device's tests, and what a device may use where the front-end keeps no
// inflight region.
func NewDeviceState() *DeviceState { return newDeviceState(make([]byte, 16)) }

// deviceStateMark, after the flags, says the flags word is this
// framework's: bytes a region holds there otherwise (a zeroed region,
// another back-end's layout) are not taken for flags.
const deviceStateMark = 0x74617473_6e75726b // "krunstat"

// newDeviceState makes the state in b (16 bytes: the flags, the mark),
// starting it with no flags unless b holds the mark.
func newDeviceState(b []byte) *DeviceState {
	s := &DeviceState{b: b}
	s.access(claimState)
	return s
}

// claimState makes the words this framework's, with no flags, unless they
// hold the mark already.
func claimState(flags, mark *uint64) {
	if atomic.LoadUint64(mark) != deviceStateMark {
		atomic.StoreUint64(flags, 0)
		atomic.StoreUint64(mark, deviceStateMark)
	}
}

// Flags returns the flags set, by this back-end or a previous one.
func (s *DeviceState) Flags() uint64 {
	var v uint64
	s.access(func(p, mark *uint64) {
		if atomic.LoadUint64(mark) == deviceStateMark {
			v = atomic.LoadUint64(p)
		}
	})
	return v
}

// Set sets flags. It returns once they are in the region, behind the
// mark: a back-end killed right after finds them set in the next one. The
// mark is written again each time: a front-end zeroes the region at a
// device reset without handing it over again, and the flags set after
// that must count all the same (found in review, helper-106).
func (s *DeviceState) Set(flags uint64) {
	s.access(func(p, mark *uint64) {
		claimState(p, mark) // zeroed (or another layout's bytes) since: no flags
		for {
			old := atomic.LoadUint64(p)
			if old&flags == flags || atomic.CompareAndSwapUint64(p, old, old|flags) {
				return
			}
		}
	})
}

// access runs f on the flags and mark words while the region is mapped,
// with a memory fault (a front-end that truncated the region) caught.
func (s *DeviceState) access(f func(flags, mark *uint64)) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b == nil {
		return
	}
	_ = Protect(func() error {
		f(stateWords(s.b))
		return nil
	})
}

// detach ends the state's use of the region (before it is unmapped).
func (s *DeviceState) detach() {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.b = nil
	s.mu.Unlock()
}

// StateKeeper is a device with state that must outlive its back-end
// process (virtio-blk: that a sync of the image failed, so that a
// restarted plugin does not acknowledge a FLUSH the lost writeback makes
// a lie). UseState is called when the front-end sets up an inflight
// region with room for it, before any ring starts; the state is valid
// until the next call.
type StateKeeper interface {
	UseState(s *DeviceState)
}

// maxInflightCounter bounds the counters a region may hold: a back-end
// numbers the requests it takes from 0, or from one past the largest it
// recovered, and never gets near it.
const maxInflightCounter = 1 << 63

// errInflightCorrupt is wrapped by errors about a region whose content
// contradicts itself or the ring.
var errInflightCorrupt = errors.New("inflight region inconsistent")

// tracker keeps one ring's part of the inflight region. mark runs on the
// ring goroutine, the others where used elements are added and published;
// the engine serializes them under its mutex (a head published and at
// once reused by the driver must be marked after its old mark is cleared).
type tracker struct {
	b       []byte // the queue's part: header + descNum entries
	num     uint16 // ring size: heads are below it
	descNum uint16
	counter uint64
	batch   []uint16 // heads added to the used ring and not published (cap num)
	barrier uint32
	// onStore, for tests, runs after every store to the region (a crash
	// may come between any two).
	onStore func()
}

// newTracker attaches to queue part b, laid out for queues of up to
// queueSize descriptors, for a ring of num descriptors whose used index in
// guest memory is used. A part never initialized (version 0: a fresh
// region, or one the front-end zeroed at a device reset) is initialized
// with nothing in flight; a part left by an earlier back-end is recovered
// (see recover). It returns the heads to resubmit, in order.
func newTracker(b []byte, queueSize, num, used uint16) (*tracker, []uint16, error) {
	if uint64(len(b)) < InflightQueueBytes(queueSize) || queueSize < num {
		return nil, nil, fmt.Errorf("%w: a region for queues of %d cannot track a ring of %d", errInflightCorrupt, queueSize, num)
	}
	maxDesc := uint64(queueSize)
	t := &tracker{b: b, num: num, batch: make([]uint16, 0, num)}
	switch v := t.load16(inflightOffVersion); v {
	case 0:
		t.descNum = queueSize
		for i := uint16(0); i < t.descNum; i++ {
			t.setInflight(i, 0)
			t.store16(t.entry(i)+inflightOffNext, 0)
			t.storeCounter(i, 0)
		}
		t.store16(inflightOffBatchHead, 0)
		t.store16(inflightOffUsedIdx, used)
		t.store16(inflightOffDescNum, t.descNum)
		t.fence()
		t.store16(inflightOffVersion, inflightVersion)
		return t, nil, nil
	case inflightVersion:
	default:
		return nil, nil, fmt.Errorf("%w: version %d", errInflightCorrupt, v)
	}
	t.descNum = t.load16(inflightOffDescNum)
	if t.descNum < num || uint64(t.descNum) > maxDesc {
		return nil, nil, fmt.Errorf("%w: %d entries in a region for queues of %d, for a ring of %d", errInflightCorrupt, t.descNum, queueSize, num)
	}
	heads, err := t.recover(used)
	if err != nil {
		return nil, nil, err
	}
	return t, heads, nil
}

// recover brings the part in line with the used index in guest memory and
// returns the heads still in flight, ordered by their counters.
func (t *tracker) recover(used uint16) ([]uint16, error) {
	if last := t.load16(inflightOffUsedIdx); last != used {
		// A batch was published and the back-end died before clearing
		// it: its heads are the newest n of the last-batch list.
		n := used - last
		if n > t.num {
			return nil, fmt.Errorf("%w: used index %d in guest memory, %d in the region: a batch of %d on a ring of %d",
				errInflightCorrupt, used, last, n, t.num)
		}
		h := t.load16(inflightOffBatchHead)
		for range n {
			if h >= t.num {
				return nil, fmt.Errorf("%w: last batch names descriptor %d on a ring of %d", errInflightCorrupt, h, t.num)
			}
			t.setInflight(h, 0)
			h = t.load16(t.entry(h) + inflightOffNext)
		}
		t.fence()
		t.store16(inflightOffUsedIdx, used)
	}
	type flight struct {
		head    uint16
		counter uint64
	}
	var fl []flight
	for i := uint16(0); i < t.descNum; i++ {
		if !t.inflight(i) {
			continue
		}
		if i >= t.num {
			// No chain of this ring starts there: stale or forged.
			t.setInflight(i, 0)
			continue
		}
		c := t.loadCounter(i)
		if c >= maxInflightCounter {
			// No back-end takes 2^63 requests: forged. Taken as it is,
			// the next counter (c+1) would wrap to 0, and this back-end's
			// requests would be resubmitted before it after another
			// crash (found in review, helper-153).
			return nil, fmt.Errorf("%w: descriptor %d has counter %#x", errInflightCorrupt, i, c)
		}
		fl = append(fl, flight{i, c})
	}
	slices.SortStableFunc(fl, func(a, b flight) int {
		switch {
		case a.counter < b.counter:
			return -1
		case a.counter > b.counter:
			return 1
		}
		return 0
	})
	heads := make([]uint16, len(fl))
	for i, f := range fl {
		heads[i] = f.head
		t.counter = max(t.counter, f.counter+1)
	}
	return heads, nil
}

// mark records that head was taken (before the device sees it).
func (t *tracker) mark(head uint16) {
	t.storeCounter(head, t.counter)
	t.counter++
	t.fence()
	t.setInflight(head, 1)
}

// unmark forgets a head given back without being served (Untake).
func (t *tracker) unmark(head uint16) {
	t.setInflight(head, 0)
}

// used links head into the last batch; its used element was just added.
func (t *tracker) used(head uint16) {
	t.store16(t.entry(head)+inflightOffNext, t.load16(inflightOffBatchHead))
	t.fence()
	t.store16(inflightOffBatchHead, head)
	t.batch = append(t.batch, head)
}

// published clears the batch once the used index (usedIdx) is published.
func (t *tracker) published(usedIdx uint16) {
	if len(t.batch) == 0 {
		return
	}
	t.fence()
	for _, h := range t.batch {
		t.setInflight(h, 0)
	}
	t.batch = t.batch[:0]
	t.fence()
	t.store16(inflightOffUsedIdx, usedIdx)
}

// forget marks the part uninitialized once the ring stopped with nothing
// in flight: the next start (maybe of a ring the driver moved, whose used
// index starts again from 0) initializes it afresh instead of reconciling
// it with a used ring it never tracked.
func (t *tracker) forget() {
	t.store16(inflightOffVersion, 0)
}

// idle reports whether the part shows nothing in flight: no head marked
// and no used element waiting for its publication. A ring that failed
// with the part idle (the guest broke its available ring, and every
// request taken was completed) stopped as cleanly as one stopped on
// purpose.
func (t *tracker) idle() bool {
	if len(t.batch) > 0 {
		return false
	}
	for i := uint16(0); i < t.descNum; i++ {
		if t.inflight(i) {
			return false
		}
	}
	return true
}

// entry is the offset of head's entry.
func (t *tracker) entry(head uint16) uint64 {
	return inflightHeaderSize + uint64(head)*inflightEntrySize
}
