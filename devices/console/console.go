// Package console is a virtio-console device (virtio 1.2 section 5.3) with
// VIRTIO_CONSOLE_F_MULTIPORT and exactly one port: a named generic port
// (not a console), which a Linux guest shows as /dev/vportNp0 with its name
// in /sys/class/virtio-ports/vportNp0/name. The port is a byte stream in
// each direction; what the bytes mean is the business of the user of Port
// (krun-plugin-console speaks the stdio frame protocol of guest/stdioframe
// over it).
//
// Queues: 0 is the port's receiveq (host to guest), 1 its transmitq (guest
// to host), 2 the control receiveq and 3 the control transmitq. The control
// protocol: the driver says DEVICE_READY; the device adds port 0
// (DEVICE_ADD); the driver says PORT_READY; the device names the port
// (PORT_NAME) and opens its end (PORT_OPEN 1); the driver says PORT_OPEN 1
// or 0 as a guest program opens or closes the port.
//
// Every byte the guest sends is bounded on its way: guest data waits in a
// bounded buffer until Port.Read takes it (the transmitq is not drained
// while it is full, so a guest writer blocks), and host data waits in a
// bounded buffer until the guest posts receive buffers (Port.Write blocks
// while it is full). Malformed chains (a transmit chain longer than any a
// driver makes among them) and control messages are counted and dropped;
// the device keeps serving.
package console

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// DeviceType is the virtio device ID of a console.
const DeviceType = 3

// Feature bits.
const (
	FeatureSize      = 0 // VIRTIO_CONSOLE_F_SIZE
	FeatureMultiport = 1 // VIRTIO_CONSOLE_F_MULTIPORT
)

// Queues.
const (
	portRx    = 0
	portTx    = 1
	controlRx = 2
	controlTx = 3
	numQueues = 4
)

// Control events (struct virtio_console_control.event).
const (
	evDeviceReady  = 0
	evDeviceAdd    = 1
	evDeviceRemove = 2
	evPortReady    = 3
	evConsolePort  = 4
	evResize       = 5
	evPortOpen     = 6
	evPortName     = 7
)

const (
	controlLen = 8 // le32 id, le16 event, le16 value
	configLen  = 12
	// MaxNameLen bounds the port name.
	MaxNameLen = 64
	// chunkSize is the largest piece of guest data kept in one buffer.
	chunkSize = 64 << 10
	// maxTxChain bounds the data of one transmit chain: a page of the
	// largest size (64 KiB) in each descriptor of the largest ring. A
	// longer chain is malformed (its descriptors may all point at the
	// same memory: one chain of 1024 x 4 GiB would keep the device
	// copying for the port's reader long after the guest stopped).
	maxTxChain = MaxQueueSize * 64 << 10
	// txChunks bounds the guest data waiting for Port.Read (in chunks of
	// up to chunkSize bytes).
	txChunks = 16
	// rxChunks bounds the host data waiting for receive buffers.
	rxChunks = 16
)

// Config describes the device.
type Config struct {
	// Name is the port's name, as the guest sees it (1..MaxNameLen bytes
	// of printable ASCII).
	Name   string
	Logger hclog.Logger
}

// Stats are the device's counters.
type Stats struct {
	TxBytes, RxBytes        atomic.Uint64
	Malformed, BadControl   atomic.Uint64
	GuestOpens, GuestCloses atomic.Uint64
}

// Device is a virtio-console device with one named port.
type Device struct {
	name string
	log  hclog.Logger

	features atomic.Uint64
	stats    Stats

	// Control state, under mu.
	mu            sync.Mutex
	ready         bool // the driver said DEVICE_READY
	added         bool // DEVICE_ADD sent for port 0
	named         bool // PORT_NAME and PORT_OPEN sent
	failWarned    bool // a driver set-up failure was logged (later ones are only counted)
	noMultiWarned bool // a driver without MULTIPORT was logged
	guestOpen     bool
	opened        chan struct{} // closed while the guest has the port open; replaced on close
	ctrlOut       [][]byte      // control messages waiting for control receive buffers
	ctrlWake      chan struct{} // a message was queued for the control receiveq

	tx       chan []byte // guest data for Port.Read
	txRest   []byte      // the unread part of the chunk Port.Read took last
	rx       chan []byte // host data for the guest
	rxRest   []byte      // the undelivered part of the chunk the rx ring took last
	closed   chan struct{}
	closeOne sync.Once

	rxMu, crxMu *sync.Mutex // one producer per receive ring, across restarts
}

// New returns a device whose port is called cfg.Name.
func New(cfg Config) (*Device, error) {
	if l := len(cfg.Name); l == 0 || l > MaxNameLen {
		return nil, fmt.Errorf("console port name %q: want 1 to %d bytes", cfg.Name, MaxNameLen)
	}
	for _, r := range cfg.Name {
		if r <= ' ' || r > '~' {
			return nil, fmt.Errorf("console port name %q: printable ASCII without spaces only", cfg.Name)
		}
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Device{
		name: cfg.Name, log: log,
		opened:   make(chan struct{}),
		ctrlWake: make(chan struct{}, 1),
		tx:       make(chan []byte, txChunks),
		rx:       make(chan []byte, rxChunks),
		closed:   make(chan struct{}),
		rxMu:     new(sync.Mutex),
		crxMu:    new(sync.Mutex),
	}, nil
}

// Stats returns the device's counters.
func (d *Device) Stats() *Stats { return &d.stats }

// Counters returns the counters by name (for the plugin's Stats RPC).
func (d *Device) Counters() map[string]uint64 {
	return map[string]uint64{
		"tx_bytes": d.stats.TxBytes.Load(), "rx_bytes": d.stats.RxBytes.Load(),
		"malformed": d.stats.Malformed.Load(), "bad_control": d.stats.BadControl.Load(),
		"guest_opens": d.stats.GuestOpens.Load(), "guest_closes": d.stats.GuestCloses.Load(),
	}
}

// DeviceFeatures are the feature bits offered.
func (d *Device) DeviceFeatures() uint64 { return 1 << FeatureMultiport }

// NumQueues is the number of virtqueues.
func (d *Device) NumQueues() int { return numQueues }

// ConfigSize is the config space's length, for the SDK to hand the core
// the whole of it at Configure (the guest's reads are then the core's).
func (d *Device) ConfigSize() int { return configLen }

// ReadConfig reads the config space: cols, rows (0: no size), max_nr_ports
// (1), emerg_wr.
func (d *Device) ReadConfig(offset uint32, p []byte) error {
	var cfg [configLen]byte
	binary.LittleEndian.PutUint32(cfg[4:], 1)
	if uint64(offset)+uint64(len(p)) > configLen {
		return fmt.Errorf("config read of %d bytes at %d beyond %d", len(p), offset, configLen)
	}
	copy(p, cfg[offset:])
	return nil
}

// WriteConfig accepts writes to emerg_wr and drops them (no emergency
// write feature is offered).
func (d *Device) WriteConfig(offset uint32, p []byte) error {
	if uint64(offset)+uint64(len(p)) > configLen {
		return fmt.Errorf("config write of %d bytes at %d beyond %d", len(p), offset, configLen)
	}
	return nil
}

// SetFeatures records the negotiated features.
func (d *Device) SetFeatures(f uint64) error {
	if f&(1<<FeatureMultiport) == 0 {
		// Without MULTIPORT the driver makes port 0 a console (hvc0)
		// and never learns its name; this device is for named ports.
		// Once per device: a guest renegotiates as often as it likes.
		d.mu.Lock()
		warn := !d.noMultiWarned
		d.noMultiWarned = true
		d.mu.Unlock()
		if warn {
			d.log.Warn("the driver did not accept MULTIPORT; the port is a plain console (logged once)")
		}
	}
	d.features.Store(f)
	return nil
}

// Reset forgets the driver's state (a new driver starts with
// DEVICE_READY). Data waiting in either direction stays.
func (d *Device) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ready, d.added, d.named = false, false, false
	d.ctrlOut = nil
	d.setGuestOpenLocked(false)
	d.features.Store(0)
}

// Close ends Port reads and writes in progress (they return io.EOF or
// io.ErrClosedPipe).
func (d *Device) Close() error {
	d.closeOne.Do(func() { close(d.closed) })
	return nil
}

func (d *Device) setGuestOpenLocked(open bool) {
	if open == d.guestOpen {
		return
	}
	d.guestOpen = open
	if open {
		d.stats.GuestOpens.Add(1)
		close(d.opened)
	} else {
		d.stats.GuestCloses.Add(1)
		d.opened = make(chan struct{})
	}
}

// GuestOpen returns a channel closed while a guest program has the port
// open (Linux drops data sent to a port nobody has open).
func (d *Device) GuestOpen() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.opened
}

// Read reads bytes the guest wrote to the port. It blocks until there are
// some, and returns io.EOF after Close.
func (d *Device) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(d.txRest) == 0 {
		select {
		case b := <-d.tx:
			d.txRest = b
		case <-d.closed:
			return 0, io.EOF
		}
	}
	n := copy(p, d.txRest)
	d.txRest = d.txRest[n:]
	return n, nil
}

// Write queues p for the guest. It blocks while the queue is full (the
// guest takes no data) and fails with io.ErrClosedPipe after Close.
func (d *Device) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), chunkSize)
		b := append([]byte(nil), p[:k]...)
		select {
		case d.rx <- b:
		case <-d.closed:
			return n, io.ErrClosedPipe
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// handleTx moves one chain of guest data into the tx buffer; it blocks
// while the buffer is full (the guest writer waits), until the ring stops.
// A chain with writable buffers, or longer than maxTxChain, is dropped.
func (d *Device) handleTx(ctx context.Context, c *virtq.Chain) {
	if c.WritableLen() != 0 || c.ReadableLen() > maxTxChain {
		d.stats.Malformed.Add(1)
		return
	}
	for c.RemainingRead() > 0 {
		b := make([]byte, min(c.RemainingRead(), chunkSize))
		if err := c.ReadFull(b); err != nil {
			d.stats.Malformed.Add(1)
			return
		}
		select {
		case d.tx <- b:
			d.stats.TxBytes.Add(uint64(len(b)))
		case <-ctx.Done():
			// The ring stops: this chain's data is lost like bytes on a
			// cable pulled mid-transfer. The chain is completed so the
			// driver gets its buffer back.
			return
		}
	}
}

// handleControlTx handles one of the driver's control messages.
func (d *Device) handleControlTx(_ context.Context, c *virtq.Chain) {
	var msg [controlLen]byte
	if c.WritableLen() != 0 || c.RemainingRead() < controlLen {
		d.stats.BadControl.Add(1)
		return
	}
	if err := c.ReadFull(msg[:]); err != nil {
		d.stats.BadControl.Add(1)
		return
	}
	d.control(binary.LittleEndian.Uint32(msg[0:]), binary.LittleEndian.Uint16(msg[4:]), binary.LittleEndian.Uint16(msg[6:]))
}

// takeBuffer waits for a receive buffer the guest posted: it returns nil
// when the ring stops. Malformed chains are completed empty and counted
// in bad.
func takeBuffer(ctx context.Context, b *backend.Buffers, bad *atomic.Uint64) (*backend.Request, error) {
	for {
		req, err := b.Take()
		switch {
		case err != nil && req == nil:
			return nil, err
		case err != nil:
			bad.Add(1)
			req.Complete(0)
			if err := b.Publish(); err != nil {
				return nil, err
			}
			continue
		case req != nil:
			return req, nil
		}
		if b.EnableKicks() {
			continue
		}
		if err := b.WaitKick(); err != nil {
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, nil
		}
	}
}

// complete hands a filled receive buffer to the driver.
func complete(b *backend.Buffers, req *backend.Request) error {
	req.Complete(req.Chain().Written())
	if err := b.Publish(); err != nil {
		return err
	}
	return b.Notify()
}

func controlMsg(id uint32, event, value uint16, data []byte) []byte {
	m := make([]byte, controlLen+len(data))
	binary.LittleEndian.PutUint32(m[0:], id)
	binary.LittleEndian.PutUint16(m[4:], event)
	binary.LittleEndian.PutUint16(m[6:], value)
	copy(m[controlLen:], data)
	return m
}

// setupFailed counts a failure the driver reported (bad_control) and logs
// the first one only: the guest sends these at whatever rate it likes, and
// must not flood the host's log. Called with mu held.
func (d *Device) setupFailed(msg string, args ...any) {
	d.stats.BadControl.Add(1)
	if d.failWarned {
		return
	}
	d.failWarned = true
	d.log.Warn(msg+" (further failures are only counted: bad_control)", args...)
}

// control acts on one driver control message.
func (d *Device) control(id uint32, event, value uint16) {
	d.mu.Lock()
	defer d.mu.Unlock()
	queue := func(m []byte) {
		d.ctrlOut = append(d.ctrlOut, m)
		select {
		case d.ctrlWake <- struct{}{}:
		default:
		}
	}
	switch event {
	case evDeviceReady:
		if value != 1 {
			d.setupFailed("the guest's console driver failed to set up", "value", value)
			return
		}
		d.ready = true
		if !d.added {
			d.added = true
			queue(controlMsg(0, evDeviceAdd, 0, nil))
		}
	case evPortReady:
		if id != 0 || !d.added {
			d.stats.BadControl.Add(1)
			return
		}
		if value != 1 {
			d.setupFailed("the guest could not set up the console port", "port", id)
			return
		}
		if !d.named {
			d.named = true
			queue(controlMsg(0, evPortName, 0, []byte(d.name)))
			queue(controlMsg(0, evPortOpen, 1, nil))
		}
	case evPortOpen:
		if id != 0 {
			d.stats.BadControl.Add(1)
			return
		}
		d.setGuestOpenLocked(value == 1)
	default:
		// DEVICE_ADD, DEVICE_REMOVE, CONSOLE_PORT, RESIZE and PORT_NAME
		// go the other way; anything else is unknown.
		d.stats.BadControl.Add(1)
	}
}

// serveControlRx delivers queued control messages into the driver's
// control receive buffers.
func (d *Device) serveControlRx(ctx context.Context, b *backend.Buffers) error {
	for {
		d.mu.Lock()
		pending := len(d.ctrlOut)
		d.mu.Unlock()
		if pending == 0 {
			select {
			case <-d.ctrlWake:
				continue
			case <-ctx.Done():
				return nil
			}
		}
		req, err := takeBuffer(ctx, b, &d.stats.BadControl)
		if req == nil {
			return err
		}
		c := req.Chain()
		d.mu.Lock()
		m := d.ctrlOut[0]
		d.mu.Unlock()
		if c.ReadableLen() != 0 || c.WritableLen() < uint64(len(m)) {
			// Linux posts buffers of a page; a driver whose buffer cannot
			// take the message gets it back empty.
			d.stats.BadControl.Add(1)
			if err := complete(b, req); err != nil {
				return err
			}
			continue
		}
		if _, err := c.Write(m); err != nil {
			d.stats.BadControl.Add(1)
		}
		d.mu.Lock()
		d.ctrlOut = d.ctrlOut[1:]
		d.mu.Unlock()
		if err := complete(b, req); err != nil {
			return err
		}
	}
}

// serveRx moves host data into the guest's receive buffers, once a guest
// program has the port open.
func (d *Device) serveRx(ctx context.Context, b *backend.Buffers) error {
	for {
		if len(d.rxRest) == 0 {
			select {
			case d.rxRest = <-d.rx:
				continue
			case <-ctx.Done():
				return nil
			}
		}
		select {
		case <-d.GuestOpen():
		case <-ctx.Done():
			return nil
		}
		req, err := takeBuffer(ctx, b, &d.stats.Malformed)
		if req == nil {
			return err
		}
		c := req.Chain()
		if c.ReadableLen() != 0 {
			d.stats.Malformed.Add(1)
			if err := complete(b, req); err != nil {
				return err
			}
			continue
		}
		// Fill this buffer with as much waiting data as fits.
		for c.RemainingWrite() > 0 {
			if len(d.rxRest) == 0 {
				select {
				case d.rxRest = <-d.rx:
				default:
				}
				if len(d.rxRest) == 0 {
					break
				}
			}
			n, err := c.Write(d.rxRest)
			d.rxRest = d.rxRest[n:]
			d.stats.RxBytes.Add(uint64(n))
			if err != nil {
				break
			}
		}
		if err := complete(b, req); err != nil {
			return err
		}
	}
}
