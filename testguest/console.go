package testguest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"
)

// virtio-console (virtio 1.2, 5.3) with VIRTIO_CONSOLE_F_MULTIPORT.
const (
	ConsoleDeviceID   = 3
	ConsoleFMultiport = 1 << 1

	consoleRxQueue   = 0
	consoleTxQueue   = 1
	consoleCtrlRx    = 2
	consoleCtrlTx    = 3
	consoleBufLen    = 4096
	consoleCtrlBufs  = 16
	consoleSetupWait = 10 * time.Second

	// Control events.
	ConsoleDeviceReady = 0
	ConsoleDeviceAdd   = 1
	ConsolePortReady   = 3
	ConsoleConsolePort = 4
	ConsolePortOpen    = 6
	ConsolePortName    = 7
)

// ConsoleControl is one control message from the device.
type ConsoleControl struct {
	ID    uint32
	Event uint16
	Value uint16
	Data  []byte
}

// Console drives port 0 of a multiport virtio-console back-end the way
// Linux's virtio_console does: DEVICE_READY, PORT_READY for the port the
// device adds, then the port's name and open state from the device's
// control messages. Read and Write move bytes on the port; Open and
// CloseGuest send PORT_OPEN.
type Console struct {
	g                *Guest
	rx, tx, crx, ctx *Ring

	// Name is the port's name (PORT_NAME); HostOpen says whether the
	// device opened its end (PORT_OPEN 1).
	Name     string
	HostOpen bool
	// Controls lists every control message received, in order.
	Controls []ConsoleControl

	cctx   context.Context
	cancel context.CancelFunc
	txMu   sync.Mutex
	rxMu   sync.Mutex
	rxRest []byte
}

// DialConsole connects to a vhost-user console back-end at path and sets
// up its port (NewConsole).
func DialConsole(path string, opt Options) (*Console, error) {
	opt.NumQueues = 4
	opt.Features |= ConsoleFMultiport
	opt.RequiredFeatures |= ConsoleFMultiport
	g, err := Dial(path, opt)
	if err != nil {
		return nil, err
	}
	c, err := NewConsole(g)
	if err != nil {
		g.Close()
		return nil, err
	}
	return c, nil
}

// NewConsole posts receive buffers, says DEVICE_READY and waits until the
// device has added, named and opened port 0.
func NewConsole(g *Guest) (*Console, error) {
	if len(g.Rings) < 4 {
		return nil, errors.New("virtio-console: want 4 rings (port 0 and control)")
	}
	c := &Console{g: g, rx: g.Rings[consoleRxQueue], tx: g.Rings[consoleTxQueue], crx: g.Rings[consoleCtrlRx], ctx: g.Rings[consoleCtrlTx]}
	c.cctx, c.cancel = context.WithCancel(context.Background())
	for i := 0; i < consoleCtrlBufs; i++ {
		if err := c.postRx(c.crx); err != nil {
			return nil, err
		}
	}
	for i := 0; i < int(c.rx.Size())/2; i++ {
		if err := c.postRx(c.rx); err != nil {
			return nil, err
		}
	}
	if _, err := c.crx.Kick(); err != nil {
		return nil, err
	}
	if _, err := c.rx.Kick(); err != nil {
		return nil, err
	}
	if err := c.SendControl(0, ConsoleDeviceReady, 1); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(c.cctx, consoleSetupWait)
	defer cancel()
	for c.Name == "" || !c.HostOpen {
		ms, err := c.NextControls(ctx)
		if err != nil {
			return nil, fmt.Errorf("virtio-console setup (name %q, host open %v): %w", c.Name, c.HostOpen, err)
		}
		for _, m := range ms {
			if m.Event == ConsoleDeviceAdd {
				if err := c.SendControl(m.ID, ConsolePortReady, 1); err != nil {
					return nil, err
				}
			}
		}
	}
	return c, nil
}

func (c *Console) postRx(r *Ring) error {
	addr, err := c.g.Mem.Alloc(consoleBufLen, 64)
	if err != nil {
		return fmt.Errorf("virtio-console buffers: %w", err)
	}
	_, err = r.Post([]Segment{{Addr: addr, Len: consoleBufLen, Writable: true}}, addr)
	return err
}

// Guest returns the underlying guest.
func (c *Console) Guest() *Guest { return c.g }

// NextControls waits for control messages from the device, records them
// (Name, HostOpen, Controls), gives their buffers back and returns them.
func (c *Console) NextControls(ctx context.Context) ([]ConsoleControl, error) {
	done, err := c.crx.Wait(ctx)
	if err != nil {
		return nil, err
	}
	var out []ConsoleControl
	for _, d := range done {
		addr := d.Token.(uint64)
		if d.Len < 8 || d.Len > consoleBufLen {
			return out, fmt.Errorf("virtio-console: control message of %d bytes", d.Len)
		}
		b, err := c.g.Mem.Bytes(addr, uint64(d.Len))
		if err != nil {
			return out, err
		}
		m := ConsoleControl{ID: binary.LittleEndian.Uint32(b), Event: binary.LittleEndian.Uint16(b[4:]),
			Value: binary.LittleEndian.Uint16(b[6:]), Data: append([]byte(nil), b[8:]...)}
		switch m.Event {
		case ConsolePortName:
			c.Name = string(m.Data)
		case ConsolePortOpen:
			c.HostOpen = m.Value == 1
		}
		c.Controls = append(c.Controls, m)
		out = append(out, m)
		if _, err := c.crx.Post([]Segment{{Addr: addr, Len: consoleBufLen, Writable: true}}, addr); err != nil {
			return out, err
		}
	}
	_, err = c.crx.Kick()
	return out, err
}

// SendControl sends one control message to the device and waits for the
// device to take it.
func (c *Console) SendControl(id uint32, event, value uint16) error {
	return c.send(c.ctx, func(b []byte) int {
		binary.LittleEndian.PutUint32(b, id)
		binary.LittleEndian.PutUint16(b[4:], event)
		binary.LittleEndian.PutUint16(b[6:], value)
		return 8
	})
}

// send posts one device-readable buffer filled by fill, kicks and waits for
// its completion.
func (c *Console) send(r *Ring, fill func([]byte) int) error {
	c.txMu.Lock()
	defer c.txMu.Unlock()
	addr, err := c.g.Mem.Alloc(consoleBufLen, 64)
	if err != nil {
		return err
	}
	defer c.g.Mem.Free(addr)
	b, err := c.g.Mem.Bytes(addr, consoleBufLen)
	if err != nil {
		return err
	}
	n := fill(b)
	if _, err := r.Post([]Segment{{Addr: addr, Len: uint32(n)}}, addr); err != nil {
		return err
	}
	if err := r.KickAlways(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.cctx, consoleSetupWait)
	defer cancel()
	for {
		done, err := r.Wait(ctx)
		if err != nil {
			return fmt.Errorf("virtio-console: buffer not taken: %w", err)
		}
		for _, d := range done {
			if d.Token.(uint64) == addr {
				return nil
			}
		}
	}
}

// Open tells the device a guest program opened the port (PORT_OPEN 1);
// until then the device sends it nothing.
func (c *Console) Open() error { return c.SendControl(0, ConsolePortOpen, 1) }

// CloseGuest tells the device the guest program closed the port.
func (c *Console) CloseGuest() error { return c.SendControl(0, ConsolePortOpen, 0) }

// Write sends p on the port in buffers of up to 4 KiB, waiting for each.
func (c *Console) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), consoleBufLen)
		if err := c.send(c.tx, func(b []byte) int { return copy(b, p[:k]) }); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// Read returns bytes the device sent on the port, waiting for some.
func (c *Console) Read(p []byte) (int, error) {
	return c.ReadContext(c.cctx, p)
}

// ReadContext is Read with a context.
func (c *Console) ReadContext(ctx context.Context, p []byte) (int, error) {
	c.rxMu.Lock()
	defer c.rxMu.Unlock()
	for len(c.rxRest) == 0 {
		done, err := c.rx.Wait(ctx)
		if err != nil {
			return 0, err
		}
		for _, d := range done {
			addr := d.Token.(uint64)
			if d.Len > consoleBufLen {
				return 0, fmt.Errorf("virtio-console: device wrote %d bytes into a %d-byte buffer", d.Len, consoleBufLen)
			}
			b, err := c.g.Mem.Bytes(addr, uint64(d.Len))
			if err != nil {
				return 0, err
			}
			c.rxRest = append(c.rxRest, b...)
			if _, err := c.rx.Post([]Segment{{Addr: addr, Len: consoleBufLen, Writable: true}}, addr); err != nil {
				return 0, err
			}
		}
		if _, err := c.rx.Kick(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.rxRest)
	c.rxRest = c.rxRest[n:]
	return n, nil
}

// Close ends waits and closes the guest.
func (c *Console) Close() error {
	c.cancel()
	c.txMu.Lock()
	defer c.txMu.Unlock()
	c.rxMu.Lock()
	defer c.rxMu.Unlock()
	return c.g.Close()
}
