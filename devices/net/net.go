// Package net is the virtio-net device model (virtio 1.2 section 5.1) whose
// other end is a stream of Ethernet frames in passt's framing: a 32-bit
// big-endian length, then the frame. The krun-plugin-net-passt plugin serves
// it over vhost-user; passt itself runs outside the plugin's sandbox and the
// plugin only holds its end of a socketpair.
//
// Queue 0 is rx (frames from passt to the guest), queue 1 is tx. Every frame
// carries a virtio-net header; with VIRTIO_NET_F_MRG_RXBUF a received frame
// may span several rx buffers. Frames longer than the MTU are dropped and
// counted, in both directions. When the rx ring has no buffers, frames wait
// in a queue bounded in frames and in the bytes of their buffers, and
// frames beyond it are dropped and counted (docs/NETWORK.md); the queue and
// the frame being delivered outlive a ring's stop and go to the next ring.
// When passt goes away the link goes down; the device keeps answering.
package net

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	stdnet "net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// virtio-net feature bits.
const (
	FeatureMTU      = 3  // VIRTIO_NET_F_MTU
	FeatureMAC      = 5  // VIRTIO_NET_F_MAC
	FeatureMrgRxbuf = 15 // VIRTIO_NET_F_MRG_RXBUF
	FeatureStatus   = 16 // VIRTIO_NET_F_STATUS
)

// DeviceType is the virtio device ID of a network card.
const DeviceType = 1

// StatusLinkUp is VIRTIO_NET_S_LINK_UP in the config space's status field.
const StatusLinkUp = 1

const (
	rxQueue = 0
	txQueue = 1

	ethHeaderLen = 14
	vlanLen      = 4
	// DefaultMTU is passt's default: the largest 802.3 MTU, rounded.
	DefaultMTU = 65520
	// maxRxBuffers bounds how many rx buffers (descriptors, an indirect
	// table's entries included) the device walks for one frame, beyond
	// the last chain it takes: a merged frame uses at most that many, and
	// a ring of long chains with no room in them costs at most that many
	// steps per frame passt sends (not 256 chains of 1024 descriptors,
	// walked again for every frame).
	maxRxBuffers = 256
	configLen    = 12
	// rxQueueFrames and rxQueueBytes bound what is held between passt and
	// the rx ring: about one large TCP window, so a burst passt sends
	// within the guest's window is not lost while the guest catches up.
	// Frames beyond that are dropped (and counted).
	rxQueueFrames = 8192
	rxQueueBytes  = 8 << 20
	// smallFrame is the buffer size for frames up to an Ethernet MTU;
	// longer frames get a buffer of the device's largest frame.
	smallFrame = 2048
	// txBatchSize is how many bytes of frames are gathered before one
	// write to passt.
	txBatchSize = 256 << 10
	// txStopGrace is how long a stopping tx ring lets a write to passt
	// that is in progress finish (a front-end that disconnects while
	// passt is busy must not cut a frame in half).
	txStopGrace = 2 * time.Second
	// rxReadBuffer is the read buffer on passt's socket: many small
	// frames per read system call.
	rxReadBuffer = 256 << 10
	// rxNotifyBatch is how many frames a long burst delivers between
	// interrupts.
	rxNotifyBatch = 64
	// poolSize bounds the spare buffers kept per size.
	poolSize = 1024
	// txStallLimit is how long a write to passt may wait before Check
	// calls passt hung: passt reads its socket at all times (it throttles
	// the guest's TCP with the windows it advertises, not by leaving
	// frames unread), so a batch it has not taken in this long will not
	// be taken.
	txStallLimit = 30 * time.Second
	// txCheckGap: Check calls further apart than this (krun-core asks
	// every 2 s) mean the process did not run meanwhile; a stall is
	// counted again from the later one.
	txCheckGap = 10 * time.Second
)

// Config describes one network device.
type Config struct {
	MAC    stdnet.HardwareAddr // 6 bytes
	MTU    uint16              // 0 means DefaultMTU
	Conn   *os.File            // our end of the socketpair whose other end is passt
	Logger hclog.Logger
}

// Device is a virtio-net device bridging a guest to passt.
type Device struct {
	mac  [6]byte
	mtu  uint16
	conn stdnet.Conn
	log  hclog.Logger

	features atomic.Uint64
	linkUp   atomic.Bool

	// rx: a reader goroutine drains passt into a bounded queue at all times,
	// so passt's writes never stall on a guest that posts no buffers; the rx
	// ring goroutine delivers from the queue.
	rxQueue   chan []byte        // frames read from passt, oldest first
	rxQueued  atomic.Int64       // bytes in rxQueue (and rxPending)
	rxSmall   chan []byte        // spare buffers of smallFrame bytes
	rxLarge   chan []byte        // spare buffers of maxFrame bytes
	rxPending []byte             // a frame taken from rxQueue, not yet delivered
	rxDone    chan struct{}      // closed when the reader goroutine ends
	rxReqs    []*backend.Request // buffers taken for the frame being delivered
	// tx: frames are framed into txBatch and written to passt together,
	// once the ring is drained or the batch is full.
	txBatch       []byte
	txBatchFrames uint64
	txBatchBytes  uint64
	// txUndo ends the previous tx ring's stop interruption (interruptOn).
	txUndo func()
	// txWrites counts the starts and ends of writes to passt: odd while
	// one is in progress, and its value names it. Check finds a passt that
	// stopped reading by it (stall*, under checkMu): a write seen in
	// progress by Check calls no further apart than txCheckGap for longer
	// than txStallLimit. Check's own clock, not the write's start: a
	// frozen process (a paused container, a suspended host) sees a gap
	// between its checks and starts counting again.
	txWrites     atomic.Uint64
	txStallLimit time.Duration
	txCheckGap   time.Duration
	checkMu      sync.Mutex
	stallWrite   uint64    // the write in progress Check last saw (0: none)
	stallFrom    time.Time // when Check first saw it, counting again after a gap
	lastCheck    time.Time

	stats Stats
	// closing is set by Close: the reader's error is then ours, not a
	// lost passt.
	closing atomic.Bool
	// configChanged has a value when the link status changed and the
	// front-end has not been told yet (backend.ConfigChanger).
	configChanged chan struct{}
	rxMu          sync.Mutex // one rx goroutine at a time, across ring restarts
	txMu          sync.Mutex
}

// Stats are the device's counters.
type Stats struct {
	TxFrames, TxBytes, TxOversize, TxMalformed, TxErrors atomic.Uint64
	RxFrames, RxBytes, RxOversize, RxMalformed, RxNoRoom atomic.Uint64
	RxQueueFull, LinkDown                                atomic.Uint64
	// RxWalked counts the rx buffers (descriptors) the device walked to
	// place frames, those of chains it gave back included: far more than
	// the frames need means a guest posting long chains (maxRxBuffers).
	RxWalked atomic.Uint64
}

// New makes a device over cfg.Conn. The device owns the connection.
func New(cfg Config) (*Device, error) {
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("virtio-net: MAC %q is not 6 bytes", cfg.MAC)
	}
	if cfg.Conn == nil {
		return nil, errors.New("virtio-net: no passt connection")
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < devopts.MinMTU {
		return nil, fmt.Errorf("virtio-net: MTU %d below the IPv4 minimum of %d", mtu, devopts.MinMTU)
	}
	if mtu > devopts.MaxMTU {
		return nil, fmt.Errorf("virtio-net: MTU %d: passt takes frames of at most %d bytes (MTU %d)", mtu, devopts.PasstMaxFrame, devopts.MaxMTU)
	}
	conn, err := stdnet.FileConn(cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("virtio-net: passt socket: %w", err)
	}
	cfg.Conn.Close() // FileConn made its own descriptor
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	d := &Device{mtu: mtu, conn: conn, log: log, txStallLimit: txStallLimit, txCheckGap: txCheckGap}
	copy(d.mac[:], cfg.MAC)
	d.linkUp.Store(true)
	maxFrame := d.maxFrame()
	d.txBatch = make([]byte, 0, txBatchSize+4+maxFrame)
	d.rxReqs = make([]*backend.Request, maxRxBuffers)
	d.rxQueue = make(chan []byte, rxQueueFrames)
	d.rxSmall = make(chan []byte, poolSize)
	d.rxLarge = make(chan []byte, poolSize/16)
	d.rxDone = make(chan struct{})
	d.configChanged = make(chan struct{}, 1)
	go d.readPasst()
	return d, nil
}

// readPasst reads frames from passt until the connection ends, queueing
// them for the rx ring. A frame that finds the queue full is dropped.
func (d *Device) readPasst() {
	defer close(d.rxDone)
	fr := frameReader{alloc: d.rxBuffer}
	max := d.maxFrame()
	in := bufio.NewReaderSize(d.conn, rxReadBuffer)
	for {
		err := fr.read(in, max)
		switch {
		case err == nil:
		case errors.Is(err, errFrameTooLong):
			d.stats.RxOversize.Add(1)
			continue
		default:
			if !d.closing.Load() {
				d.setLinkDown(err)
			}
			return
		}
		frame := fr.frame()
		fr.consume()
		// The bound counts the memory held: a frame just over smallFrame
		// holds a buffer of the largest frame.
		if d.rxQueued.Load()+int64(cap(frame)) > rxQueueBytes {
			d.stats.RxQueueFull.Add(1)
			d.recycle(frame)
			continue
		}
		select {
		case d.rxQueue <- frame:
			d.rxQueued.Add(int64(cap(frame)))
		default:
			d.stats.RxQueueFull.Add(1)
			d.recycle(frame)
		}
	}
}

// rxBuffer returns a buffer for an n-byte frame, a spare one if there is.
func (d *Device) rxBuffer(n int) []byte {
	pool, size := d.rxSmall, smallFrame
	if n > smallFrame {
		pool, size = d.rxLarge, d.maxFrame()
	}
	select {
	case b := <-pool:
		return b[:n]
	default:
		return make([]byte, n, size)
	}
}

// recycle returns a frame buffer for reuse.
func (d *Device) recycle(b []byte) {
	pool := d.rxSmall
	if cap(b) > smallFrame {
		pool = d.rxLarge
	}
	select {
	case pool <- b[:cap(b)]:
	default:
	}
}

// maxFrame is the longest Ethernet frame accepted: MTU plus the Ethernet
// header and one VLAN tag, and never more than passt takes (a full-size
// VLAN-tagged frame at the default MTU of 65520 is dropped, not sent).
func (d *Device) maxFrame() int {
	return min(int(d.mtu)+ethHeaderLen+vlanLen, devopts.PasstMaxFrame)
}

// DeviceFeatures are the virtio-net feature bits offered.
func (d *Device) DeviceFeatures() uint64 {
	return 1<<FeatureMAC | 1<<FeatureStatus | 1<<FeatureMrgRxbuf | 1<<FeatureMTU
}

// NumQueues is 2: one rx/tx pair.
func (d *Device) NumQueues() int { return 2 }

// ReadConfig reads the config space: mac, status, max_virtqueue_pairs, mtu.
func (d *Device) ReadConfig(offset uint32, p []byte) error {
	var cfg [configLen]byte
	copy(cfg[0:6], d.mac[:])
	var status uint16
	if d.linkUp.Load() {
		status = StatusLinkUp
	}
	binary.LittleEndian.PutUint16(cfg[6:], status)
	binary.LittleEndian.PutUint16(cfg[8:], 1)
	binary.LittleEndian.PutUint16(cfg[10:], d.mtu)
	if uint64(offset)+uint64(len(p)) > configLen {
		return fmt.Errorf("virtio-net config read %d+%d beyond %d bytes", offset, len(p), configLen)
	}
	copy(p, cfg[offset:])
	return nil
}

// WriteConfig refuses writes: every field is read-only for a modern driver.
func (d *Device) WriteConfig(offset uint32, p []byte) error {
	return fmt.Errorf("virtio-net config is read-only (write %d+%d)", offset, len(p))
}

// SetFeatures records the negotiated features.
func (d *Device) SetFeatures(f uint64) error {
	d.features.Store(f)
	return nil
}

// Reset forgets the negotiated features; the passt stream stays.
func (d *Device) Reset() { d.features.Store(0) }

// ConfigChanges delivers a value when the config space changed (the link
// went down), for the vhost-user framework to tell the front-end.
func (d *Device) ConfigChanges() <-chan struct{} { return d.configChanged }

// LinkUp reports whether passt is still connected.
func (d *Device) LinkUp() bool { return d.linkUp.Load() }

// Counters returns the device's counters by name.
func (d *Device) Counters() map[string]uint64 {
	s := &d.stats
	return map[string]uint64{
		"tx_frames": s.TxFrames.Load(), "tx_bytes": s.TxBytes.Load(),
		"tx_dropped_oversize": s.TxOversize.Load(), "tx_malformed": s.TxMalformed.Load(),
		"tx_errors": s.TxErrors.Load(),
		"rx_frames": s.RxFrames.Load(), "rx_bytes": s.RxBytes.Load(),
		"rx_dropped_oversize": s.RxOversize.Load(), "rx_malformed": s.RxMalformed.Load(),
		"rx_dropped_no_room": s.RxNoRoom.Load(), "rx_buffers_walked": s.RxWalked.Load(), "rx_dropped_queue_full": s.RxQueueFull.Load(),
		"link_down": s.LinkDown.Load(),
	}
}

// Close ends the passt connection and waits for the reader to stop.
func (d *Device) Close() error {
	d.closing.Store(true)
	err := d.conn.Close()
	<-d.rxDone
	return err
}

// hdrLen is the virtio-net header length for the negotiated features.
func (d *Device) hdrLen() int {
	f := d.features.Load()
	if f&(1<<virtq.FeatureVersion1|1<<FeatureMrgRxbuf) != 0 {
		return 12
	}
	return 10
}

func (d *Device) mergeable() bool { return d.features.Load()&(1<<FeatureMrgRxbuf) != 0 }

// Queue serves rx (0) and tx (1) through the back-end's ring engine: rx as
// a producer that takes the guest's buffers when passt has a frame for
// them, tx as a handler that gathers frames and writes them to passt each
// time the ring is drained.
func (d *Device) Queue(ctx context.Context, idx int) (backend.QueueConfig, error) {
	switch idx {
	case rxQueue:
		return backend.QueueConfig{Producer: rxProducer{d}}, nil
	case txQueue:
		d.txMu.Lock()
		defer d.txMu.Unlock()
		if d.txUndo != nil {
			d.txUndo() // the previous ring's deadline callback is done
		}
		d.txUndo = interruptOn(ctx, d.conn.SetWriteDeadline, txStopGrace)
		return backend.QueueConfig{Handler: &txHandler{d: d, ctx: ctx}}, nil
	}
	return backend.QueueConfig{}, fmt.Errorf("virtio-net has no queue %d", idx)
}

// rxProducer runs the rx ring.
type rxProducer struct{ d *Device }

func (p rxProducer) Produce(ctx context.Context, b *backend.Buffers) error {
	p.d.rxMu.Lock() // one rx ring at a time, across ring restarts
	defer p.d.rxMu.Unlock()
	return p.d.serveRx(ctx, b)
}

// txHandler serves the tx ring: its requests and drains run on the ring's
// goroutine, one after the other.
type txHandler struct {
	d   *Device
	ctx context.Context // the ring's
}

func (h *txHandler) Handle(req *backend.Request) {
	h.d.transmit(h.ctx, req.Chain())
	req.Complete(0)
}

// Drained writes the frames gathered from the ring to passt.
func (h *txHandler) Drained() { h.d.flushTx(h.ctx) }

// Check says whether the device can go on (pluginsdk.Checker, asked at
// each Health): not once its link is down (passt's stream ended or was cut;
// a passt that is alive but cut off never comes back by itself), nor while
// a write to passt has waited longer than txStallLimit (a passt that is
// alive but hung, stopped or deadlocked: the guest's transmissions wait
// behind it for good, and passt never exits, which is what krun-core
// restarts on otherwise). The plugin then reports itself failed, and
// krun-core restarts it with a new passt, the hung one killed.
func (d *Device) Check() error {
	if err := d.checkStall(); err != nil {
		return err
	}
	if !d.linkUp.Load() && !d.closing.Load() {
		return errors.New("the connection to passt is lost (link down)")
	}
	return nil
}

// checkStall is Check's part for a write to passt that does not end.
func (d *Device) checkStall() error {
	now := time.Now() // monotonic
	w := d.txWrites.Load()
	d.checkMu.Lock()
	defer d.checkMu.Unlock()
	gap := !d.lastCheck.IsZero() && now.Sub(d.lastCheck) > d.txCheckGap
	d.lastCheck = now
	switch {
	case w%2 == 0:
		d.stallWrite = 0
	case w != d.stallWrite || gap:
		d.stallWrite, d.stallFrom = w, now
	default:
		if waited := now.Sub(d.stallFrom); waited > d.txStallLimit {
			return fmt.Errorf("passt has not read a frame for %v (hung?)", waited.Round(time.Second))
		}
	}
	return nil
}

// setLinkDown records that passt is gone.
//
// The connection is then unusable for good (a write may have been cut in
// the middle of a frame), so the device ends its half of the stream:
// passt, started with --fd (one-off), sees the end and exits, and the
// host's restart brings a new passt and plugin. Without that, passt
// would wait for the rest of a cut frame, alive, and nothing would
// restart it.
func (d *Device) setLinkDown(err error) {
	if d.linkUp.Swap(false) {
		if cw, ok := d.conn.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		d.stats.LinkDown.Add(1)
		d.log.Warn("passt connection lost, link down", "error", err)
		select {
		case d.configChanged <- struct{}{}:
		default: // a change is already pending
		}
	}
}

// interruptOn sets a deadline on the connection grace after ctx ends, so
// blocking socket I/O of a stopping ring returns, but an I/O in progress
// that can finish in time does (a write cut mid-frame ends passt's stream
// for good). The returned function undoes it and waits for a concurrently
// running callback.
func interruptOn(ctx context.Context, set func(time.Time) error, grace time.Duration) func() {
	set(time.Time{})
	done := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(done)
		set(time.Now().Add(grace))
	})
	return func() {
		if !stop() {
			<-done
		}
		set(time.Time{})
	}
}

func isTimeout(err error) bool {
	var ne stdnet.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// transmit sends one tx chain's frame to passt, or drops and counts it.
func (d *Device) transmit(ctx context.Context, c *virtq.Chain) {
	hdr := d.hdrLen()
	if c.RemainingRead() < uint64(hdr) || c.WritableLen() != 0 {
		d.stats.TxMalformed.Add(1)
		return
	}
	if err := c.SkipRead(uint64(hdr)); err != nil {
		d.stats.TxMalformed.Add(1)
		return
	}
	n := c.RemainingRead()
	if n < ethHeaderLen {
		d.stats.TxMalformed.Add(1)
		return
	}
	if n > uint64(d.maxFrame()) {
		d.stats.TxOversize.Add(1)
		return
	}
	if !d.linkUp.Load() {
		d.stats.TxErrors.Add(1)
		return
	}
	start := len(d.txBatch)
	buf := d.txBatch[start : start+4+int(n)]
	binary.BigEndian.PutUint32(buf, uint32(n))
	if err := c.ReadFull(buf[4:]); err != nil {
		d.stats.TxMalformed.Add(1)
		return
	}
	d.txBatch = d.txBatch[:start+len(buf)]
	d.txBatchFrames++
	d.txBatchBytes += n
	if len(d.txBatch) >= txBatchSize {
		d.flushTx(ctx)
	}
}

// flushTx writes the gathered frames to passt.
func (d *Device) flushTx(ctx context.Context) {
	if len(d.txBatch) == 0 {
		return
	}
	d.txWrites.Add(1) // odd: in progress
	_, err := d.conn.Write(d.txBatch)
	d.txWrites.Add(1)
	frames, bytes := d.txBatchFrames, d.txBatchBytes
	d.txBatch, d.txBatchFrames, d.txBatchBytes = d.txBatch[:0], 0, 0
	if err != nil {
		if ctx.Err() != nil && isTimeout(err) {
			// The ring is stopping; the frames are lost like on a cable
			// pulled mid-send. passt's stream may now be cut mid-frame,
			// so the connection is no longer usable.
			d.setLinkDown(fmt.Errorf("write interrupted by ring stop: %w", err))
		} else {
			d.setLinkDown(err)
		}
		d.stats.TxErrors.Add(frames)
		return
	}
	d.stats.TxFrames.Add(frames)
	d.stats.TxBytes.Add(bytes)
}

// serveRx moves queued frames from passt into the rx ring.
func (d *Device) serveRx(ctx context.Context, b *backend.Buffers) error {
	unnotified := 0 // frames delivered since the last interrupt
	armed := false  // a kick was asked for since the last delivery
	for {
		if d.rxPending == nil {
			select {
			case d.rxPending = <-d.rxQueue:
			case <-ctx.Done():
				// Frames delivered in the burst so far still get their
				// interrupt: the next ring's queue does not owe it.
				if unnotified > 0 {
					return b.Notify()
				}
				return nil
			}
		}
		delivered, err := d.deliver(b, d.rxPending)
		if err != nil {
			return fmt.Errorf("rx queue: %w", err)
		}
		if delivered {
			d.rxQueued.Add(-int64(cap(d.rxPending)))
			d.recycle(d.rxPending)
			d.rxPending = nil
			armed = false
			unnotified++
			// Interrupt once a burst of queued frames is delivered, and
			// every rxNotifyBatch frames of a long one.
			if len(d.rxQueue) == 0 || unnotified >= rxNotifyBatch {
				unnotified = 0
				if err := b.Notify(); err != nil {
					return err
				}
			}
			continue
		}
		// No room: hand the driver what was delivered (it refills the
		// ring as it takes frames), then wait for it to add buffers; the
		// frame waits, and passt's further frames wait in the bounded
		// queue. The buffers already available may be too few for this
		// frame, so ask for a kick on the next ones added, and look once
		// more for buffers added before the request was visible.
		unnotified = 0
		if err := b.Notify(); err != nil {
			return err
		}
		if !armed {
			b.EnableKicksForMore()
			armed = true
			continue
		}
		armed = false
		if err := b.WaitKick(); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// deliver places one frame into rx buffers. It reports false, having taken
// nothing from the ring, when the available buffers cannot hold the frame
// yet. A frame that can never fit is dropped and counted (reported as
// delivered).
func (d *Device) deliver(b *backend.Buffers, frame []byte) (bool, error) {
	hdrLen := d.hdrLen()
	total := uint64(hdrLen + len(frame))
	mrg := d.mergeable()
	taken, slots, bufs := 0, 0, 0
	var room uint64
	for room < total {
		if taken == len(d.rxReqs) || bufs >= maxRxBuffers || (!mrg && taken == 1) {
			// The frame needs more buffers than it may use (without
			// mergeable buffers: one chain; with them, maxRxBuffers
			// descriptors, however they are chained). Give them back
			// to the ring untouched, for the next frame, and drop
			// this one.
			if err := b.Untake(d.rxReqs[:taken]); err != nil {
				return false, err
			}
			d.stats.RxNoRoom.Add(1)
			return true, nil
		}
		req, err := b.Take()
		if err != nil && req == nil {
			// The ring is unusable; what was taken goes back first (the
			// Producer contract), then the error ends the ring.
			if uerr := b.Untake(d.rxReqs[:taken]); uerr != nil {
				return false, errors.Join(err, uerr)
			}
			return false, err
		}
		if err != nil {
			// Malformed: complete the broken chain and any we took
			// before it with nothing in them; the frame is dropped.
			d.stats.RxMalformed.Add(1)
			for _, r := range d.rxReqs[:taken] {
				r.Complete(0)
			}
			req.Complete(0)
			return true, b.Publish()
		}
		if req == nil {
			if err := b.Untake(d.rxReqs[:taken]); err != nil {
				return false, err
			}
			if slots >= b.QueueSize() {
				// Every descriptor of the ring was available and they
				// do not hold the frame: no more can come (the driver
				// has none left), so it can never fit.
				d.stats.RxNoRoom.Add(1)
				return true, nil
			}
			return false, nil
		}
		d.rxReqs[taken] = req
		taken++
		slots += req.Chain().Slots()
		bufs += req.Chain().Buffers()
		d.stats.RxWalked.Add(uint64(req.Chain().Buffers()))
		room += req.Chain().WritableLen()
	}
	// Header: all offload fields zero; num_buffers with mergeable buffers.
	var hdr [12]byte
	if mrg || hdrLen == 12 {
		binary.LittleEndian.PutUint16(hdr[10:], uint16(taken))
	}
	rest := [2][]byte{hdr[:hdrLen], frame}
	part := 0
	for _, req := range d.rxReqs[:taken] {
		c := req.Chain()
		for part < len(rest) && c.RemainingWrite() > 0 {
			n, err := c.Write(rest[part])
			rest[part] = rest[part][n:]
			if len(rest[part]) == 0 {
				part++
			}
			if err != nil && !errors.Is(err, virtq.ErrNoSpace) {
				break // the guest rewrote the chain: what fits is written
			}
		}
		req.Complete(c.Written())
	}
	if err := b.Publish(); err != nil {
		return false, err
	}
	d.stats.RxFrames.Add(1)
	d.stats.RxBytes.Add(uint64(len(frame)))
	return true, nil
}

// errFrameTooLong reports a frame from passt longer than the MTU allows (or
// shorter than an Ethernet header).
var errFrameTooLong = errors.New("frame from passt longer than the MTU")

// errStreamBroken reports a length prefix passt never sends (above
// devopts.PasstMaxFrame): the stream is out of step, and skipping that
// many bytes would swallow the frames after it (up to 4 GiB of them) or
// end inside one and read its bytes as the next length, with the link
// still up. The reader stops; readPasst takes the link down, and the host
// restarts passt.
var errStreamBroken = errors.New("passt's stream is broken")

// frameReader reads passt's length-prefixed frames.
type frameReader struct {
	hdr     [4]byte
	hdrHave int
	length  int // frame length once the prefix is complete
	have    int // frame bytes read (or skipped) so far
	skip    bool
	buf     []byte
	scratch []byte // where skipped frames are read
	// alloc returns a buffer of n bytes for the next frame.
	alloc func(n int) []byte
}

func (f *frameReader) read(r io.Reader, max int) error {
	for f.hdrHave < 4 {
		n, err := r.Read(f.hdr[f.hdrHave:])
		f.hdrHave += n
		if err != nil {
			if errors.Is(err, io.EOF) && f.hdrHave == 0 {
				return fmt.Errorf("passt closed the connection: %w", err)
			}
			if f.hdrHave < 4 {
				return err
			}
		}
		if f.hdrHave == 4 {
			f.length = int(binary.BigEndian.Uint32(f.hdr[:]))
			if f.length > devopts.PasstMaxFrame {
				return fmt.Errorf("%w: a frame length of %d bytes, above the %d passt ever sends", errStreamBroken, f.length, devopts.PasstMaxFrame)
			}
			f.have = 0
			f.skip = f.length > max || f.length < ethHeaderLen
			if f.skip {
				if f.scratch == nil {
					f.scratch = make([]byte, 4096)
				}
			} else {
				f.buf = f.alloc(f.length)
			}
		}
	}
	for f.have < f.length {
		var dst []byte
		if f.skip {
			dst = f.scratch[:min(len(f.scratch), f.length-f.have)]
		} else {
			dst = f.buf[f.have:f.length]
		}
		n, err := r.Read(dst)
		f.have += n
		if err != nil && f.have < f.length {
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("passt closed the connection mid-frame: %w", io.ErrUnexpectedEOF)
			}
			return err
		}
	}
	if f.skip {
		f.hdrHave = 0
		return errFrameTooLong
	}
	return nil
}

func (f *frameReader) frame() []byte { return f.buf[:f.length] }

func (f *frameReader) consume() {
	f.hdrHave = 0
}
