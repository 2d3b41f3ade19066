package testguest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/krun-core/krun-core/vhostuser"
)

// virtio-net (virtio 1.2, 5.1).
const (
	NetDeviceID = 1

	NetFMTU      = 1 << 3
	NetFMAC      = 1 << 5
	NetFMrgRxbuf = 1 << 15
	NetFStatus   = 1 << 16

	// NetFeatures are the device features the driver acks when offered.
	NetFeatures = NetFMTU | NetFMAC | NetFMrgRxbuf | NetFStatus

	// NetHeaderLen is the virtio-net header of a VERSION_1 device.
	NetHeaderLen = 12
	netRxQueue   = 0
	netTxQueue   = 1
	// netConfigSize covers mac, status, max_virtqueue_pairs and mtu.
	netConfigSize = 12
)

// NetConfig is the virtio-net config space.
type NetConfig struct {
	MAC    [6]byte
	Status uint16
	MTU    uint16
}

// Net drives a virtio-net back-end as a frame link: WriteFrame queues an
// Ethernet frame on the tx ring, Flush kicks it, ReadFrame returns the next
// frame from the rx ring (assembling mergeable buffers). Every rx and tx
// buffer is allocated once, up front. One goroutine may read while another
// writes.
type Net struct {
	g      *Guest
	rx, tx *Ring
	Config NetConfig

	ctx    context.Context
	cancel context.CancelFunc

	// rx: fixed buffers, posted once and re-posted after each frame.
	// rxMu is held by ReadFrame; Close takes it (and txMu) before it
	// unmaps guest memory.
	rxMu      sync.Mutex
	closed    bool
	rxBufLen  uint32
	rxPending []Completion // used rx buffers not yet returned as frames

	// tx: one slot per descriptor; free slots on a stack.
	txMu      sync.Mutex
	txSlotLen uint32
	txFree    []uint64
	txQueued  bool
}

// DialNet connects to a vhost-user-net back-end at path. Options.NumQueues
// is forced to 2 (one rx/tx pair) and the net features are wanted.
func DialNet(path string, opt Options) (*Net, error) {
	opt.NumQueues = 2
	opt.Features |= NetFeatures
	opt.RequiredFeatures |= NetFMrgRxbuf
	// Indirect tables would be allocated per frame; frames are one
	// buffer each anyway.
	opt.NoIndirect = true
	if opt.MemSize == 0 {
		qs := uint64(opt.QueueSize)
		if qs == 0 {
			qs = 256
		}
		opt.MemSize = qs*(netRxBufLen+uint64(netTxSlotLen(0))) + 4<<20
	}
	g, err := Dial(path, opt)
	if err != nil {
		return nil, err
	}
	n, err := NewNet(g)
	if err != nil {
		g.Close()
		return nil, err
	}
	return n, nil
}

// netRxBufLen is the size of each rx buffer: what Linux's virtio-net uses
// for mergeable buffers, roughly.
const netRxBufLen = 4096

// netTxSlotLen is the tx buffer size for an MTU (0: passt's 65520).
func netTxSlotLen(mtu uint16) uint32 {
	if mtu == 0 {
		mtu = 65520
	}
	return uint32(NetHeaderLen+14+4) + uint32(mtu)
}

// NewNet drives rings 0 (rx) and 1 (tx) of g, which must have negotiated
// VIRTIO_NET_F_MRG_RXBUF. It fills the rx ring with buffers.
func NewNet(g *Guest) (*Net, error) {
	if len(g.Rings) < 2 {
		return nil, errors.New("virtio-net: want an rx and a tx ring")
	}
	if g.Features()&NetFMrgRxbuf == 0 {
		return nil, errors.New("virtio-net: the device does not offer mergeable rx buffers")
	}
	n := &Net{g: g, rx: g.Rings[netRxQueue], tx: g.Rings[netTxQueue], rxBufLen: netRxBufLen}
	if g.Negotiated.ProtocolFeatures&vhostuser.ProtocolConfig != 0 {
		cfg, err := g.Client.GetConfig(0, netConfigSize)
		if err != nil {
			return nil, fmt.Errorf("virtio-net config: %w", err)
		}
		copy(n.Config.MAC[:], cfg[0:6])
		n.Config.Status = binary.LittleEndian.Uint16(cfg[6:])
		n.Config.MTU = binary.LittleEndian.Uint16(cfg[10:])
	}
	n.txSlotLen = netTxSlotLen(n.Config.MTU)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	for i := 0; i < int(n.rx.Size()); i++ {
		addr, err := g.Mem.Alloc(uint64(n.rxBufLen), 64)
		if err != nil {
			return nil, fmt.Errorf("virtio-net rx buffers: %w", err)
		}
		if _, err := n.rx.Post([]Segment{{Addr: addr, Len: n.rxBufLen, Writable: true}}, addr); err != nil {
			return nil, err
		}
	}
	for i := 0; i < int(n.tx.Size()); i++ {
		addr, err := g.Mem.Alloc(uint64(n.txSlotLen), 64)
		if err != nil {
			return nil, fmt.Errorf("virtio-net tx buffers: %w", err)
		}
		n.txFree = append(n.txFree, addr)
	}
	if _, err := n.rx.Kick(); err != nil {
		return nil, err
	}
	return n, nil
}

// Guest returns the underlying guest.
func (n *Net) Guest() *Guest { return n.g }

// MaxFrame is the longest frame WriteFrame takes.
func (n *Net) MaxFrame() int { return int(n.txSlotLen) - NetHeaderLen }

// WriteFrame queues one Ethernet frame (without virtio-net header) on the
// tx ring; Flush makes the device see it. It waits for a free tx buffer
// when all are in flight.
func (n *Net) WriteFrame(frame []byte) error {
	if len(frame) > n.MaxFrame() {
		return fmt.Errorf("virtio-net: %d-byte frame exceeds the %d-byte tx buffer", len(frame), n.MaxFrame())
	}
	n.txMu.Lock()
	defer n.txMu.Unlock()
	if n.closed {
		return errors.New("virtio-net: closed")
	}
	for len(n.txFree) == 0 {
		n.reapTx()
		if len(n.txFree) > 0 {
			break
		}
		if n.txQueued {
			if _, err := n.tx.Kick(); err != nil {
				return err
			}
			n.txQueued = false
		}
		done, err := n.tx.Wait(n.ctx)
		if err != nil {
			return fmt.Errorf("virtio-net tx: %w", err)
		}
		n.freeTx(done)
	}
	addr := n.txFree[len(n.txFree)-1]
	b, err := n.g.Mem.Bytes(addr, uint64(NetHeaderLen+len(frame)))
	if err != nil {
		return err
	}
	clear(b[:NetHeaderLen])
	copy(b[NetHeaderLen:], frame)
	if _, err := n.tx.Post([]Segment{{Addr: addr, Len: uint32(len(b))}}, addr); err != nil {
		return err
	}
	n.txFree = n.txFree[:len(n.txFree)-1]
	n.txQueued = true
	return nil
}

func (n *Net) reapTx() { n.freeTx(n.tx.Reap()) }

// freeTx returns the buffers of completed tx frames to the free stack.
func (n *Net) freeTx(done []Completion) {
	for _, c := range done {
		n.txFree = append(n.txFree, c.Token.(uint64))
	}
}

// Flush kicks the tx ring if frames were queued since the last kick.
func (n *Net) Flush() error {
	n.txMu.Lock()
	defer n.txMu.Unlock()
	if n.closed {
		return errors.New("virtio-net: closed")
	}
	n.reapTx()
	if !n.txQueued {
		return nil
	}
	n.txQueued = false
	_, err := n.tx.Kick()
	return err
}

// ReadFrame waits for the next received frame and copies it (without the
// virtio-net header) into buf, returning its length. A frame longer than
// buf is an error; the frame is consumed.
func (n *Net) ReadFrame(buf []byte) (int, error) {
	n.rxMu.Lock()
	defer n.rxMu.Unlock()
	if n.closed {
		return 0, errors.New("virtio-net: closed")
	}
	for len(n.rxPending) == 0 {
		done, err := n.rx.Wait(n.ctx)
		if err != nil {
			return 0, fmt.Errorf("virtio-net rx: %w", err)
		}
		n.rxPending = append(n.rxPending, done...)
	}
	first := n.rxPending[0]
	hdr, err := n.rxBytes(first)
	if err != nil {
		return 0, err
	}
	if len(hdr) < NetHeaderLen {
		return 0, n.repost(1, fmt.Errorf("virtio-net rx: %d-byte buffer, shorter than the header", len(hdr)))
	}
	nbuf := int(binary.LittleEndian.Uint16(hdr[10:]))
	if nbuf == 0 || nbuf > int(n.rx.Size()) {
		return 0, n.repost(1, fmt.Errorf("virtio-net rx: num_buffers %d", nbuf))
	}
	for len(n.rxPending) < nbuf {
		done, err := n.rx.Wait(n.ctx)
		if err != nil {
			return 0, fmt.Errorf("virtio-net rx: %w", err)
		}
		n.rxPending = append(n.rxPending, done...)
	}
	total := 0
	var ferr error
	for i := 0; i < nbuf; i++ {
		b, err := n.rxBytes(n.rxPending[i])
		if err != nil {
			return 0, err
		}
		if i == 0 {
			b = b[NetHeaderLen:]
		}
		if total+len(b) > len(buf) {
			ferr = fmt.Errorf("virtio-net rx: frame longer than %d bytes", len(buf))
			continue
		}
		total += copy(buf[total:], b)
	}
	if err := n.repost(nbuf, nil); err != nil {
		return 0, err
	}
	if ferr != nil {
		return 0, ferr
	}
	return total, nil
}

func (n *Net) rxBytes(c Completion) ([]byte, error) {
	if c.Len > n.rxBufLen {
		return nil, fmt.Errorf("virtio-net rx: device wrote %d bytes into a %d-byte buffer", c.Len, n.rxBufLen)
	}
	return n.g.Mem.Bytes(c.Token.(uint64), uint64(c.Len))
}

// repost gives the first k pending rx buffers back to the device.
func (n *Net) repost(k int, err error) error {
	for _, c := range n.rxPending[:k] {
		if _, perr := n.rx.Post([]Segment{{Addr: c.Token.(uint64), Len: n.rxBufLen, Writable: true}}, c.Token); perr != nil {
			return perr
		}
	}
	n.rxPending = append(n.rxPending[:0], n.rxPending[k:]...)
	if _, kerr := n.rx.Kick(); kerr != nil {
		return kerr
	}
	return err
}

// Close ends waits in ReadFrame and WriteFrame, waits for them to return,
// and closes the guest (unmapping its memory).
func (n *Net) Close() error {
	n.cancel()
	n.rxMu.Lock()
	defer n.rxMu.Unlock()
	n.txMu.Lock()
	defer n.txMu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	return n.g.Close()
}
