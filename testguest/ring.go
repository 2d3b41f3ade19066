package testguest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// Descriptor and ring flags (virtio 1.2, 2.7).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4

	availFNoInterrupt = 1
	usedFNoNotify     = 1
)

// ErrRingFull is returned by Post when not enough descriptors are free.
var ErrRingFull = errors.New("virtqueue full")

// Segment is one buffer of a descriptor chain.
type Segment struct {
	Addr     uint64 // guest physical address
	Len      uint32
	Writable bool // device-writable
}

// Completion is a used element returned by the device.
type Completion struct {
	Head  uint16
	Len   uint32 // bytes the device wrote
	Token any    // what was given to Post
}

// RingOptions select the ring layout and features.
type RingOptions struct {
	Size     uint16 // power of two
	EventIdx bool   // VIRTIO_F_EVENT_IDX negotiated
	Indirect bool   // VIRTIO_F_INDIRECT_DESC negotiated: multi-buffer chains use an indirect table
	// PollKick gives the device no kick eventfd (it polls); PollCall
	// gives it no call eventfd (the driver polls).
	PollKick bool
	PollCall bool
}

// Ring is the driver side of one split virtqueue in guest memory. Its
// methods are safe for concurrent use.
type Ring struct {
	mem   *Memory
	index uint32
	opt   RingOptions

	descAddr, availAddr, usedAddr uint64
	desc, avail, used             []byte

	kick, call *os.File // eventfds; call is non-blocking in Go's poller

	mu        sync.Mutex
	freeHead  uint16
	numFree   uint16
	next      []uint16 // free-list links
	tokens    []any
	indirect  []uint64 // indirect table per head, 0 if none
	chainLen  []uint16
	availIdx  uint16
	holdAvail bool   // Post leaves the available index to ReleaseAvail
	lastKick  uint16 // avail idx at the last kick decision
	lastUsed  uint16
	availFlag uint16
	barrier   atomic.Uint32

	kicks atomic.Uint64

	// gone is set by the Guest's hang-up watcher
	// (Options.EndWaitsOnHangup) once the back-end closed its socket.
	gone atomic.Bool
}

// ErrBackendGone is what a ring's Wait returns once the back-end has
// closed its vhost-user socket (Options.EndWaitsOnHangup): no call can
// come any more.
var ErrBackendGone = errors.New("the vhost-user back-end closed its socket")

// markGone records that the back-end is gone and wakes a waiter (the
// back-end's copy of the call eventfd went with it).
func (r *Ring) markGone() {
	r.gone.Store(true)
	if r.call != nil {
		var one [8]byte
		one[0] = 1
		r.call.Write(one[:]) // a full counter already wakes the waiter
	}
}

// NewRing allocates ring idx in mem and creates its eventfds.
func NewRing(mem *Memory, idx uint32, opt RingOptions) (*Ring, error) {
	n := uint64(opt.Size)
	if n == 0 || n > 32768 || n&(n-1) != 0 {
		return nil, fmt.Errorf("ring size %d is not a power of two in 1..32768", n)
	}
	r := &Ring{mem: mem, index: idx, opt: opt}
	var err error
	// Sizes with room for the event index and u32 padding (see load16).
	descSize, availSize, usedSize := 16*n, 4+2*n+4, 4+8*n+4
	if r.descAddr, err = mem.Alloc(descSize, 4096); err != nil {
		return nil, err
	}
	if r.availAddr, err = mem.Alloc(availSize, 64); err != nil {
		return nil, err
	}
	if r.usedAddr, err = mem.Alloc(usedSize, 4096); err != nil {
		return nil, err
	}
	r.desc, _ = mem.Bytes(r.descAddr, descSize)
	r.avail, _ = mem.Bytes(r.availAddr, availSize)
	r.used, _ = mem.Bytes(r.usedAddr, usedSize)

	r.next = make([]uint16, n)
	r.tokens = make([]any, n)
	r.indirect = make([]uint64, n)
	r.chainLen = make([]uint16, n)
	for i := range r.next {
		r.next[i] = uint16(i + 1)
	}
	r.numFree = uint16(n)
	if n == 32768 {
		r.numFree = 32768 - 1 // keep numFree in a u16; one descriptor unused
	}

	if !opt.PollKick {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return nil, fmt.Errorf("kick eventfd: %w", err)
		}
		r.kick = os.NewFile(uintptr(fd), fmt.Sprintf("kick%d", idx))
	}
	if !opt.PollCall {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("call eventfd: %w", err)
		}
		r.call = os.NewFile(uintptr(fd), fmt.Sprintf("call%d", idx))
	}
	return r, nil
}

// Close closes the eventfds (the ring memory stays allocated).
func (r *Ring) Close() {
	if r.kick != nil {
		r.kick.Close()
	}
	if r.call != nil {
		r.call.Close()
	}
}

// Index is the ring index.
func (r *Ring) Index() uint32 { return r.index }

// Size is the ring size.
func (r *Ring) Size() uint16 { return r.opt.Size }

// Kicks counts kicks actually sent to the device.
func (r *Ring) Kicks() uint64 { return r.kicks.Load() }

// KickFile and CallFile are the ring's eventfds (nil when polling).
func (r *Ring) KickFile() *os.File { return r.kick }

// CallFile is the call eventfd (nil when the driver polls).
func (r *Ring) CallFile() *os.File { return r.call }

// Addrs returns the guest physical addresses of the descriptor table, the
// available ring and the used ring.
func (r *Ring) Addrs() (desc, avail, used uint64) { return r.descAddr, r.availAddr, r.usedAddr }

// Setup describes the ring for frontend.Client.SetupQueue, with user
// addresses.
func (r *Ring) Setup() frontend.QueueSetup {
	r.mu.Lock()
	defer r.mu.Unlock()
	return frontend.QueueSetup{
		Index: r.index,
		Size:  r.opt.Size,
		Desc:  r.mem.UserAddr(r.descAddr),
		Avail: r.mem.UserAddr(r.availAddr),
		Used:  r.mem.UserAddr(r.usedAddr),
		Base:  r.availIdx,
		Kick:  r.kick,
		Call:  r.call,
	}
}

// Free is the number of free descriptors.
func (r *Ring) Free() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return int(r.numFree)
}

func (r *Ring) putDesc(table []byte, i uint16, s Segment, flags, next uint16) {
	d := table[16*uint64(i):]
	binary.LittleEndian.PutUint64(d[0:], s.Addr)
	binary.LittleEndian.PutUint32(d[8:], s.Len)
	if s.Writable {
		flags |= descFWrite
	}
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// Post adds a chain of segments to the available ring (without kicking)
// and returns its head. token comes back in the Completion.
func (r *Ring) Post(segs []Segment, token any) (uint16, error) {
	if len(segs) == 0 {
		return 0, errors.New("post: empty chain")
	}
	r.mu.Lock()
	defer r.mu.Unlock()

	if len(segs) > int(r.opt.Size) {
		// A chain may not be longer than the queue, indirect or not
		// (virtio 1.2, 2.7.5.3.1).
		return 0, fmt.Errorf("post: %d segments on a ring of %d", len(segs), r.opt.Size)
	}
	useIndirect := r.opt.Indirect && len(segs) > 1
	need := uint16(1)
	if !useIndirect {
		need = uint16(len(segs))
	}
	if r.numFree < need {
		return 0, ErrRingFull
	}
	head := r.freeHead
	if useIndirect {
		tbl, err := r.mem.Alloc(16*uint64(len(segs)), 16)
		if err != nil {
			return 0, err
		}
		tb, _ := r.mem.Bytes(tbl, 16*uint64(len(segs)))
		for i, s := range segs {
			var flags uint16
			if i+1 < len(segs) {
				flags = descFNext
			}
			r.putDesc(tb, uint16(i), s, flags, uint16(i+1))
		}
		r.freeHead = r.next[head]
		r.putDesc(r.desc, head, Segment{Addr: tbl, Len: uint32(16 * len(segs))}, descFIndirect, 0)
		r.indirect[head] = tbl
	} else {
		i := head
		for k, s := range segs {
			var flags uint16
			if k+1 < len(segs) {
				flags = descFNext
			}
			nxt := r.next[i]
			r.putDesc(r.desc, i, s, flags, nxt)
			if k+1 < len(segs) {
				i = nxt
			} else {
				r.freeHead = nxt
			}
		}
		r.indirect[head] = 0
	}
	r.numFree -= need
	r.chainLen[head] = need
	r.tokens[head] = token

	slot := 4 + 2*uint64(r.availIdx%r.opt.Size)
	binary.LittleEndian.PutUint16(r.avail[slot:], head)
	fence(&r.barrier) // descriptors and ring entry before the index
	r.availIdx++
	if !r.holdAvail {
		store16(r.avail, 2, r.availIdx)
	}
	return head, nil
}

// HoldAvail makes the chains posted from now on wait until ReleaseAvail
// makes them all available at once, as a driver that fills several slots
// before it moves the index: a back-end then finds them in one look.
func (r *Ring) HoldAvail() {
	r.mu.Lock()
	r.holdAvail = true
	r.mu.Unlock()
}

// ReleaseAvail makes the chains posted since HoldAvail available (without
// kicking).
func (r *Ring) ReleaseAvail() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.holdAvail = false
	fence(&r.barrier) // descriptors and ring entries before the index
	store16(r.avail, 2, r.availIdx)
}

// PostIndirect posts a chain whose head descriptor points at an indirect
// table the caller wrote into guest memory at table, length bytes long,
// without looking at it: for tests of hostile chains (a table that loops,
// one longer than the ring). token comes back in the Completion.
func (r *Ring) PostIndirect(table uint64, length uint32, token any) (uint16, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.numFree < 1 {
		return 0, ErrRingFull
	}
	head := r.freeHead
	r.freeHead = r.next[head]
	r.putDesc(r.desc, head, Segment{Addr: table, Len: length}, descFIndirect, 0)
	r.indirect[head] = 0 // the caller owns the table
	r.numFree--
	r.chainLen[head] = 1
	r.tokens[head] = token
	slot := 4 + 2*uint64(r.availIdx%r.opt.Size)
	binary.LittleEndian.PutUint16(r.avail[slot:], head)
	fence(&r.barrier)
	r.availIdx++
	if !r.holdAvail {
		store16(r.avail, 2, r.availIdx)
	}
	return head, nil
}

// Kick notifies the device of new buffers unless it asked not to be
// (VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). It returns
// whether a kick was sent. On a polling ring it does nothing.
func (r *Ring) Kick() (bool, error) {
	r.mu.Lock()
	fence(&r.barrier) // the avail index store before reading the device's wish
	old, cur := r.lastKick, r.availIdx
	r.lastKick = cur
	var need bool
	if r.opt.EventIdx {
		ev := load16(r.used, 4+8*uint64(r.opt.Size))
		need = cur-ev-1 < cur-old
	} else {
		need = load16(r.used, 0)&usedFNoNotify == 0
	}
	r.mu.Unlock()
	if !need || r.kick == nil || old == cur {
		return false, nil
	}
	return true, r.KickAlways()
}

// KickAlways writes the kick eventfd regardless of notification
// suppression.
func (r *Ring) KickAlways() error {
	if r.kick == nil {
		return nil
	}
	one := [8]byte{1}
	if _, err := r.kick.Write(one[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
		return fmt.Errorf("ring %d kick: %w", r.index, err)
	}
	r.kicks.Add(1)
	return nil
}

// Reap collects the used elements published so far and frees their
// descriptors.
func (r *Ring) Reap() []Completion {
	return r.ReapInto(nil)
}

// ReapInto is Reap appending to dst (no allocation once dst has room).
func (r *Ring) ReapInto(dst []Completion) []Completion {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reapLocked(dst)
}

func (r *Ring) reapLocked(out []Completion) []Completion {
	usedIdx := load16(r.used, 2)
	fence(&r.barrier) // the index before the elements
	for r.lastUsed != usedIdx {
		e := 4 + 8*uint64(r.lastUsed%r.opt.Size)
		id := binary.LittleEndian.Uint32(r.used[e:])
		n := binary.LittleEndian.Uint32(r.used[e+4:])
		r.lastUsed++
		if id >= uint32(r.opt.Size) || r.chainLen[id] == 0 {
			// A device bug; remember nothing about it.
			out = append(out, Completion{Head: uint16(id), Len: n, Token: errBadUsed})
			continue
		}
		head := uint16(id)
		out = append(out, Completion{Head: head, Len: n, Token: r.tokens[head]})
		r.freeChain(head)
	}
	if r.opt.EventIdx {
		// Interrupt when the device uses the next buffer.
		store16(r.avail, 4+2*uint64(r.opt.Size), r.lastUsed)
		fence(&r.barrier)
	}
	return out
}

// errBadUsed marks a used element naming a descriptor that is not in
// flight.
var errBadUsed = errors.New("device returned a descriptor that is not in flight")

func (r *Ring) freeChain(head uint16) {
	n := r.chainLen[head]
	r.chainLen[head] = 0
	r.tokens[head] = nil
	if tbl := r.indirect[head]; tbl != 0 {
		r.mem.Free(tbl)
		r.indirect[head] = 0
	}
	// Walk the chain in the descriptor table to find its tail; the links
	// are our own (written in Post) and still intact in r.next order.
	tail := head
	for i := uint16(1); i < n; i++ {
		tail = r.next[tail]
	}
	r.next[tail] = r.freeHead
	r.freeHead = head
	r.numFree += n
}

// Wait returns the used elements published so far, waiting (on the call
// eventfd, or by polling without one) until there is at least one or ctx
// is done.
func (r *Ring) Wait(ctx context.Context) ([]Completion, error) {
	return r.WaitInto(ctx, nil)
}

// WaitInto is Wait appending to dst[:0]. With a ctx that is never done
// (context.Background) and dst with room, it allocates nothing, so
// benchmarks can measure the device side alone.
func (r *Ring) WaitInto(ctx context.Context, dst []Completion) ([]Completion, error) {
	for {
		if c := r.ReapInto(dst[:0]); len(c) > 0 {
			return c, nil
		}
		if err := r.waitCall(ctx); err != nil {
			return nil, err
		}
	}
}

var longAgo = time.Unix(1, 0)

func (r *Ring) waitCall(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if r.gone.Load() {
		return fmt.Errorf("ring %d: %w", r.index, ErrBackendGone)
	}
	if r.call == nil {
		t := time.NewTimer(100 * time.Microsecond)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		}
	}
	if err := r.call.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { r.call.SetReadDeadline(longAgo) })
		defer stop()
	}
	var buf [8]byte
	_, err := r.call.Read(buf[:])
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		return fmt.Errorf("ring %d call eventfd: %w", r.index, err)
	}
	return nil
}

// UsedIdx reads the device's used index (for tests).
func (r *Ring) UsedIdx() uint16 { return load16(r.used, 2) }

// AvailIdx is the driver's available index.
func (r *Ring) AvailIdx() uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.availIdx
}

// SetNoInterrupt sets or clears VRING_AVAIL_F_NO_INTERRUPT (without
// EVENT_IDX).
func (r *Ring) SetNoInterrupt(on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if on {
		r.availFlag |= availFNoInterrupt
	} else {
		r.availFlag &^= availFNoInterrupt
	}
	store16(r.avail, 0, r.availFlag)
	fence(&r.barrier)
}
