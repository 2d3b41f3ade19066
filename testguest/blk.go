package testguest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/krun-core/krun-core/vhostuser"
)

// virtio-blk (virtio 1.2, 5.2).
const (
	BlkDeviceID = 2

	BlkFSizeMax     = 1 << 1
	BlkFSegMax      = 1 << 2
	BlkFGeometry    = 1 << 4
	BlkFRO          = 1 << 5
	BlkFBlkSize     = 1 << 6
	BlkFFlush       = 1 << 9
	BlkFTopology    = 1 << 10
	BlkFConfigWCE   = 1 << 11
	BlkFMQ          = 1 << 12
	BlkFDiscard     = 1 << 13
	BlkFWriteZeroes = 1 << 14

	// BlkFeatures are the device features the driver acks when offered.
	BlkFeatures = BlkFSizeMax | BlkFSegMax | BlkFGeometry | BlkFRO | BlkFBlkSize | BlkFFlush |
		BlkFTopology | BlkFConfigWCE | BlkFMQ | BlkFDiscard | BlkFWriteZeroes

	BlkTIn          = 0
	BlkTOut         = 1
	BlkTFlush       = 4
	BlkTGetID       = 8
	BlkTDiscard     = 11
	BlkTWriteZeroes = 13

	BlkSOK     = 0
	BlkSIOErr  = 1
	BlkSUnsupp = 2

	SectorSize = 512
	// blkConfigSize covers capacity through num_queues.
	blkConfigSize = 36
)

// BlkStatusError is a request the device completed with a non-OK status.
type BlkStatusError struct {
	Type   uint32
	Status byte
}

func (e *BlkStatusError) Error() string {
	return fmt.Sprintf("virtio-blk request type %d: status %d", e.Type, e.Status)
}

// BlkRequest is one virtio-blk request for Blk.Do.
type BlkRequest struct {
	Type   uint32
	Sector uint64
	// Data is written to the device (OUT), or filled from it (IN, GET_ID).
	// For DISCARD and WRITE_ZEROES it holds the 16-byte segment
	// descriptors.
	Data []byte

	Status  byte   // set on completion
	Written uint32 // used length reported by the device
	Err     error  // set on completion: transport or status error

	buf uint64 // guest buffer: header(16) status(1, padded to 64) data
}

// BlkConfig is the part of the virtio-blk config space the driver reads.
type BlkConfig struct {
	Capacity  uint64 // in 512-byte sectors
	SizeMax   uint32
	SegMax    uint32
	BlkSize   uint32
	NumQueues uint16
}

// Blk drives a virtio-blk back-end through a Guest. Synchronous methods
// serialize; Do runs a batch with as much queue depth as the ring allows.
type Blk struct {
	g      *Guest
	ring   *Ring
	Config BlkConfig

	mu sync.Mutex
}

// DialBlk connects to a vhost-user-blk back-end at path with the default
// block options.
func DialBlk(path string, opt Options) (*Blk, error) {
	opt.Features |= BlkFeatures
	g, err := Dial(path, opt)
	if err != nil {
		return nil, err
	}
	b, err := NewBlk(g, 0)
	if err != nil {
		g.Close()
		return nil, err
	}
	return b, nil
}

// NewBlk drives ring q of g as a virtio-blk request queue. The capacity is
// read from the config space when CONFIG was negotiated.
func NewBlk(g *Guest, q int) (*Blk, error) {
	if q < 0 || q >= len(g.Rings) {
		return nil, fmt.Errorf("virtio-blk: no ring %d", q)
	}
	b := &Blk{g: g, ring: g.Rings[q]}
	if g.Negotiated.ProtocolFeatures&vhostuser.ProtocolConfig != 0 {
		cfg, err := g.Client.GetConfig(0, blkConfigSize)
		if err != nil {
			return nil, fmt.Errorf("virtio-blk config: %w", err)
		}
		b.Config = BlkConfig{
			Capacity:  binary.LittleEndian.Uint64(cfg[0:]),
			SizeMax:   binary.LittleEndian.Uint32(cfg[8:]),
			SegMax:    binary.LittleEndian.Uint32(cfg[12:]),
			BlkSize:   binary.LittleEndian.Uint32(cfg[20:]),
			NumQueues: binary.LittleEndian.Uint16(cfg[34:]),
		}
	}
	return b, nil
}

// Guest returns the underlying guest.
func (b *Blk) Guest() *Guest { return b.g }

// Close closes the guest.
func (b *Blk) Close() error { return b.g.Close() }

// Read reads len(p) bytes (a multiple of 512) at sector.
func (b *Blk) Read(ctx context.Context, sector uint64, p []byte) error {
	return b.one(ctx, &BlkRequest{Type: BlkTIn, Sector: sector, Data: p})
}

// Write writes p (a multiple of 512 bytes) at sector.
func (b *Blk) Write(ctx context.Context, sector uint64, p []byte) error {
	return b.one(ctx, &BlkRequest{Type: BlkTOut, Sector: sector, Data: p})
}

// Flush asks the device to make written data durable.
func (b *Blk) Flush(ctx context.Context) error {
	return b.one(ctx, &BlkRequest{Type: BlkTFlush})
}

// GetID returns the device serial (up to 20 bytes).
func (b *Blk) GetID(ctx context.Context) (string, error) {
	p := make([]byte, 20)
	if err := b.one(ctx, &BlkRequest{Type: BlkTGetID, Data: p}); err != nil {
		return "", err
	}
	n := 0
	for n < len(p) && p[n] != 0 {
		n++
	}
	return string(p[:n]), nil
}

func (b *Blk) one(ctx context.Context, r *BlkRequest) error {
	if err := b.Do(ctx, []*BlkRequest{r}); err != nil {
		return err
	}
	return r.Err
}

func deviceWrites(t uint32) bool { return t == BlkTIn || t == BlkTGetID }

// Do submits the requests, keeping as many in flight as the ring and guest
// memory allow, and returns when all have completed (each has Status and
// Err set) or ctx ends. The returned error is a transport failure; request
// failures are in each request's Err.
func (b *Blk) Do(ctx context.Context, reqs []*BlkRequest) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	next, inflight := 0, 0
	defer func() { // on error, leave nothing allocated that the device cannot touch any more
		if inflight == 0 {
			return
		}
		for _, r := range reqs {
			if r.buf != 0 && r.Err == nil {
				r.Err = errors.New("abandoned while in flight")
			}
		}
	}()
	for next < len(reqs) || inflight > 0 {
		posted := 0
		for next < len(reqs) {
			r := reqs[next]
			err := b.post(r)
			if errors.Is(err, ErrRingFull) || errors.Is(err, ErrNoGuestMemory) {
				if inflight+posted == 0 {
					return err
				}
				break
			}
			if err != nil {
				return err
			}
			next++
			posted++
		}
		inflight += posted
		if posted > 0 {
			if _, err := b.ring.Kick(); err != nil {
				return err
			}
		}
		if inflight == 0 {
			break
		}
		done, err := b.ring.Wait(ctx)
		if err != nil {
			return err
		}
		for _, c := range done {
			r, ok := c.Token.(*BlkRequest)
			if !ok {
				return fmt.Errorf("virtio-blk: device completed descriptor %d that is not in flight", c.Head)
			}
			b.complete(r, c.Len)
			inflight--
		}
	}
	return nil
}

func (b *Blk) post(r *BlkRequest) error {
	r.Status, r.Written, r.Err = 0, 0, nil
	const dataOff = 4096
	size := uint64(dataOff + len(r.Data))
	buf, err := b.g.Mem.Alloc(size, 4096)
	if err != nil {
		return err
	}
	mem, _ := b.g.Mem.Bytes(buf, size)
	binary.LittleEndian.PutUint32(mem[0:], r.Type)
	binary.LittleEndian.PutUint64(mem[8:], r.Sector)
	mem[16] = 0xff // status, overwritten by the device
	segs := []Segment{{Addr: buf, Len: 16}}
	if len(r.Data) > 0 {
		if !deviceWrites(r.Type) {
			copy(mem[dataOff:], r.Data)
		}
		segs = append(segs, Segment{Addr: buf + dataOff, Len: uint32(len(r.Data)), Writable: deviceWrites(r.Type)})
	}
	segs = append(segs, Segment{Addr: buf + 16, Len: 1, Writable: true})
	if _, err := b.ring.Post(segs, r); err != nil {
		b.g.Mem.Free(buf)
		return err
	}
	r.buf = buf
	return nil
}

func (b *Blk) complete(r *BlkRequest, written uint32) {
	const dataOff = 4096
	mem, _ := b.g.Mem.Bytes(r.buf, uint64(dataOff+len(r.Data)))
	r.Written = written
	r.Status = mem[16]
	if deviceWrites(r.Type) && len(r.Data) > 0 {
		copy(r.Data, mem[dataOff:])
	}
	if r.Status != BlkSOK {
		r.Err = &BlkStatusError{Type: r.Type, Status: r.Status}
	}
	b.g.Mem.Free(r.buf)
	r.buf = 0
}
