// Package virtq implements the device side of a virtio 1.x split virtqueue
// (OASIS virtio 1.2, section 2.7) over guest memory from package guestmem.
//
// The guest writes the descriptor table and the available ring; everything in
// them is hostile. Pop checks one descriptor chain with bounded work and no
// allocation: a chain has at most the queue's chain bound of buffers in
// total, direct and indirect together, and an indirect table at most that
// many entries (the bound is Size, the spec's limit, unless Config.MaxChain
// raises it to what the device's configuration allows); tables do not
// nest; every index and every buffer is checked against guest memory, and a
// device-readable descriptor after a device-writable one is refused. A
// Chain stores no buffers: its cursors walk the descriptors lazily and
// check each again when they reach it (see Chain). A malformed chain fails
// only that request.
//
// A Queue has two sides that may run on two goroutines at once, each on
// one goroutine at a time: the pop side (Pop, Unpop, Pending, NextAvail,
// EnableNotification, EnableNotificationForMore, DisableNotification) and
// the push side (AddUsed, PublishUsed, Push, NeedsNotify, NextUsed). They
// share no state but guest memory, where each writes its own fields. Set-up
// (SetMemory, SetNextAvail, SetNextUsed) needs both sides idle.
package virtq

import (
	"errors"
	"fmt"

	"github.com/krun-core/krun-core/guestmem"
)

// Descriptor flags.
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4
)

// Ring flags.
const (
	AvailFNoInterrupt = 1 // VRING_AVAIL_F_NO_INTERRUPT
	UsedFNoNotify     = 1 // VRING_USED_F_NO_NOTIFY
)

// Feature bits that concern the ring layer.
const (
	FeatureIndirectDesc = 28 // VIRTIO_F_INDIRECT_DESC
	FeatureEventIdx     = 29 // VIRTIO_F_EVENT_IDX
	FeatureVersion1     = 32 // VIRTIO_F_VERSION_1
)

// MaxSize is the largest split queue the spec allows.
const MaxSize = 32768

const descSize = 16

// ErrMalformedChain is wrapped by every error that concerns one descriptor
// chain only. Pop has consumed the chain; the caller completes it with
// Push(c.Head, 0) and carries on.
var ErrMalformedChain = errors.New("malformed descriptor chain")

// ErrQueueBroken is wrapped by errors after which the queue cannot be used:
// the available ring itself is inconsistent. The device should stop the
// queue (and may set DEVICE_NEEDS_RESET).
var ErrQueueBroken = errors.New("virtqueue broken")

// Errors for malformed chains; each wraps ErrMalformedChain.
var (
	ErrChainTooLong     = fmt.Errorf("%w: chain longer than the queue allows (loop?)", ErrMalformedChain)
	ErrDescIndex        = fmt.Errorf("%w: descriptor index out of range", ErrMalformedChain)
	ErrDescOutOfMemory  = fmt.Errorf("%w: buffer outside guest memory", ErrMalformedChain)
	ErrNestedIndirect   = fmt.Errorf("%w: nested indirect descriptor", ErrMalformedChain)
	ErrIndirectNotNeg   = fmt.Errorf("%w: indirect descriptor without VIRTIO_F_INDIRECT_DESC", ErrMalformedChain)
	ErrIndirectWithNext = fmt.Errorf("%w: indirect descriptor with NEXT set", ErrMalformedChain)
	ErrIndirectLen      = fmt.Errorf("%w: indirect table length not a non-zero multiple of 16", ErrMalformedChain)
	ErrIndirectTooLong  = fmt.Errorf("%w: indirect table longer than the queue allows", ErrMalformedChain)
	ErrReadAfterWrite   = fmt.Errorf("%w: device-readable descriptor after a device-writable one", ErrMalformedChain)
)

// Config locates a queue in guest memory.
type Config struct {
	Size      uint16 // power of two, 1..32768 (0 means 32768 is not accepted)
	DescTable guestmem.Addr
	AvailRing guestmem.Addr
	UsedRing  guestmem.Addr
	EventIdx  bool // VIRTIO_F_EVENT_IDX negotiated
	Indirect  bool // VIRTIO_F_INDIRECT_DESC negotiated
	// MaxChain is the most buffers one chain may have, an indirect
	// table's entries included: 0 means Size; otherwise Size..MaxSize.
	// The spec asks drivers for chains no longer than the ring, but a
	// device whose configuration is read before the driver picks a ring
	// size gets chains as long as that configuration allows: virtio-blk's
	// seg_max (Linux builds indirect tables of seg_max+2 entries whatever
	// the ring) is read by a vhost-user front-end before it sets the ring
	// size, so the device's chain bound (seg_max+2, the back-end's
	// DeviceInfo.MaxChain) is what goes here when it exceeds the ring.
	MaxChain uint16
}

// Queue is the device side of one split virtqueue.
type Queue struct {
	cfg   Config
	mem   *guestmem.Memory
	desc  []byte // Size*16
	avail []byte // 4 + 2*Size (+2 used_event)
	used  []byte // 4 + 8*Size (+2 avail_event)

	nextAvail uint16
	nextUsed  uint16
	usedFlags uint16

	// notification state (device -> driver)
	signalledUsed  uint16
	signalledValid bool
	pushedSince    bool

	// maxChain is the bound on a chain's buffers: cfg.MaxChain or Size.
	maxChain uint

	barrier uint32
}

// NewQueue checks cfg against mem and returns a queue positioned at index 0.
func NewQueue(mem *guestmem.Memory, cfg Config) (*Queue, error) {
	if cfg.Size == 0 || cfg.Size&(cfg.Size-1) != 0 {
		return nil, fmt.Errorf("queue size %d is not a power of two", cfg.Size)
	}
	if cfg.MaxChain != 0 && (cfg.MaxChain < cfg.Size || cfg.MaxChain > MaxSize) {
		return nil, fmt.Errorf("chains of at most %d buffers on a queue of %d, want %d..%d", cfg.MaxChain, cfg.Size, cfg.Size, MaxSize)
	}
	q := &Queue{cfg: cfg, maxChain: uint(max(cfg.Size, cfg.MaxChain))}
	if err := q.SetMemory(mem); err != nil {
		return nil, err
	}
	return q, nil
}

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.cfg.Size }

// Config returns the queue's configuration.
func (q *Queue) Config() Config { return q.cfg }

// SetMemory re-resolves the rings in a new memory map (after a memory-table
// change). Chains popped before must be pushed before the old map is closed.
func (q *Queue) SetMemory(mem *guestmem.Memory) error {
	n := uint64(q.cfg.Size)
	extra := uint64(0)
	if q.cfg.EventIdx {
		extra = 2
	}
	if q.cfg.DescTable%16 != 0 {
		return fmt.Errorf("descriptor table %#x not 16-byte aligned", q.cfg.DescTable)
	}
	if q.cfg.AvailRing%2 != 0 {
		return fmt.Errorf("available ring %#x not 2-byte aligned", q.cfg.AvailRing)
	}
	if q.cfg.UsedRing%4 != 0 {
		return fmt.Errorf("used ring %#x not 4-byte aligned", q.cfg.UsedRing)
	}
	desc, err := mem.Slice(q.cfg.DescTable, n*descSize)
	if err != nil {
		return fmt.Errorf("descriptor table: %w", err)
	}
	avail, err := mem.Slice(q.cfg.AvailRing, 4+2*n+extra)
	if err != nil {
		return fmt.Errorf("available ring: %w", err)
	}
	used, err := mem.Slice(q.cfg.UsedRing, 4+8*n+extra)
	if err != nil {
		return fmt.Errorf("used ring: %w", err)
	}
	// Ring fields are accessed with single aligned loads and stores: the
	// mapping must keep the alignment the guest addresses have (a region
	// whose file offset is skewed against its guest address would not).
	if !aligned(desc, 16) || !aligned(avail, 2) || !aligned(used, 4) {
		return fmt.Errorf("rings at desc %#x avail %#x used %#x are misaligned in the mapping of guest memory", q.cfg.DescTable, q.cfg.AvailRing, q.cfg.UsedRing)
	}
	q.mem, q.desc, q.avail, q.used = mem, desc, avail, used
	return nil
}

// NextAvail is the index of the next available-ring entry the device will
// take (what GET_VRING_BASE reports).
func (q *Queue) NextAvail() uint16 { return q.nextAvail }

// NextUsed is the index the next used element goes to.
func (q *Queue) NextUsed() uint16 { return q.nextUsed }

// SetNextAvail positions the queue (SET_VRING_BASE). With no request in
// flight the used index equals it, so it is set too; SetNextUsed overrides.
func (q *Queue) SetNextAvail(idx uint16) {
	q.nextAvail = idx
	q.nextUsed = idx
	q.signalledValid = false
}

// SetNextUsed sets the index of the next used element.
func (q *Queue) SetNextUsed(idx uint16) {
	q.nextUsed = idx
	q.signalledValid = false
}

// availIdx reads the driver's available index (acquire).
func (q *Queue) availIdx() uint16 {
	v := load16(q.avail, 2)
	q.fence()
	return v
}

// Pending reports how many chains the driver has made available and the
// device has not popped, or an error if the index is inconsistent.
func (q *Queue) Pending() (uint16, error) {
	n := q.availIdx() - q.nextAvail
	if n > q.cfg.Size {
		return 0, fmt.Errorf("%w: available index moved by %d on a queue of %d", ErrQueueBroken, n, q.cfg.Size)
	}
	return n, nil
}

// Pop fills c with the next available chain. It returns false when none is
// available. On an error wrapping ErrMalformedChain, c.Head is valid and the
// caller must complete it with Push(c.Head, 0); on one wrapping
// ErrQueueBroken the queue must be stopped. Pop checks the whole chain (see
// Chain) but keeps none of its buffers: its work is bounded by the chain
// bound (Config.MaxChain) and it allocates nothing, whatever the guest
// wrote.
func (q *Queue) Pop(c *Chain) (bool, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return false, err
	}
	slot := uint32(q.nextAvail % q.cfg.Size)
	head := load16(q.avail, 4+2*slot)
	if head >= q.cfg.Size {
		return false, fmt.Errorf("%w: available ring entry %d names descriptor %d of %d", ErrQueueBroken, q.nextAvail, head, q.cfg.Size)
	}
	q.nextAvail++
	c.reset(q, head)
	return true, c.check(head)
}

// PopHead fills c with the chain that starts at descriptor head without
// looking at the available ring: a chain the device took before (a
// previous back-end process, recorded in the inflight region) and must
// serve again. The chain is checked as Pop checks it; an error wrapping
// ErrMalformedChain means c.Head is valid and the caller completes it as
// for Pop; a head outside the queue is an error of its own (c is then
// unchanged). The available index does not move.
func (q *Queue) PopHead(head uint16, c *Chain) error {
	if head >= q.cfg.Size {
		return fmt.Errorf("chain head %d on a queue of %d", head, q.cfg.Size)
	}
	c.reset(q, head)
	return c.check(head)
}

// UsedIndex reads the used index as published in guest memory (after a
// back-end crash, the only record of how many chains were completed).
func (q *Queue) UsedIndex() uint16 {
	v := load16(q.used, 2)
	q.fence()
	return v
}

// Unpop gives back the last n popped chains that have not been pushed, so
// that the next Pop returns them again. The driver cannot tell: a device
// that popped buffers for a frame that turned out not to fit (virtio-net
// mergeable rx) returns them this way instead of holding them while it waits
// for more.
func (q *Queue) Unpop(n uint16) {
	q.nextAvail -= n
}

// AddUsed writes a used element without publishing it; PublishUsed makes
// all added elements visible to the driver at once.
func (q *Queue) AddUsed(head uint16, written uint32) error {
	if head >= q.cfg.Size {
		return fmt.Errorf("used element for descriptor %d on a queue of %d", head, q.cfg.Size)
	}
	off := 4 + 8*uint32(q.nextUsed%q.cfg.Size)
	store32(q.used, off, uint32(head))
	store32(q.used, off+4, written)
	q.nextUsed++
	q.pushedSince = true
	return nil
}

// PublishUsed stores the used index after every element added before it
// (release order).
func (q *Queue) PublishUsed() {
	q.fence()
	store16(q.used, 2, q.nextUsed)
}

// Push completes one chain: it adds the used element and publishes it.
func (q *Queue) Push(head uint16, written uint32) error {
	if err := q.AddUsed(head, written); err != nil {
		return err
	}
	q.PublishUsed()
	return nil
}

// NeedsNotify reports whether the driver wants an interrupt for the used
// elements published since the last call (VRING_AVAIL_F_NO_INTERRUPT, or
// used_event with VIRTIO_F_EVENT_IDX).
func (q *Queue) NeedsNotify() bool {
	q.fence() // the used index store must be visible before we read the driver's wish
	if !q.pushedSince {
		return false
	}
	q.pushedSince = false
	if !q.cfg.EventIdx {
		return load16(q.avail, 0)&AvailFNoInterrupt == 0
	}
	usedEvent := load16(q.avail, 4+2*uint32(q.cfg.Size))
	newIdx, old := q.nextUsed, q.signalledUsed
	valid := q.signalledValid
	q.signalledUsed, q.signalledValid = newIdx, true
	if !valid {
		return true
	}
	// vring_need_event: notify if used_event lies in (old, new].
	return newIdx-usedEvent-1 < newIdx-old
}

// EnableNotification asks the driver to kick again when it adds buffers and
// reports whether buffers were added meanwhile (then the device must keep
// popping instead of waiting for a kick).
func (q *Queue) EnableNotification() bool {
	if q.cfg.EventIdx {
		store16(q.used, 4+8*uint32(q.cfg.Size), q.nextAvail)
	} else {
		q.usedFlags &^= UsedFNoNotify
		store16(q.used, 0, q.usedFlags)
	}
	q.fence()
	return load16(q.avail, 2) != q.nextAvail
}

// EnableNotificationForMore asks the driver to kick when it adds buffers
// beyond those available now. It is for a device that has looked at what is
// available and found it too little (a frame that needs more buffers than
// there are): EnableNotification would report those buffers and never ask
// for a kick. Buffers added between that look and this request raise no
// kick, so the device must look at the ring once more before it waits.
func (q *Queue) EnableNotificationForMore() {
	if q.cfg.EventIdx {
		store16(q.used, 4+8*uint32(q.cfg.Size), load16(q.avail, 2))
	} else {
		q.usedFlags &^= UsedFNoNotify
		store16(q.used, 0, q.usedFlags)
	}
	q.fence()
}

// DisableNotification tells the driver that kicks are not needed while the
// device is busy popping. With EVENT_IDX the stale avail_event does this.
func (q *Queue) DisableNotification() {
	if q.cfg.EventIdx {
		return
	}
	q.usedFlags |= UsedFNoNotify
	store16(q.used, 0, q.usedFlags)
}
