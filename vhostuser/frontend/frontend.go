// Package frontend is the front-end (driver) side of vhost-user: a Client
// with one typed method per request, REPLY_ACK handling, and Setup, which
// runs the whole negotiation and queue set-up sequence. The core's
// virtio-mmio transport and the test guest use it against any back-end.
package frontend

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
)

// ErrNacked is wrapped by the error of a request the back-end answered with
// a non-zero REPLY_ACK status.
var ErrNacked = errors.New("back-end reported failure")

// ErrTimeout is wrapped by the error of a request the back-end did not
// take or answer within the client's timeout. The connection is closed
// then (the stream cannot be resynchronised), and every later request
// fails with ErrBroken.
var ErrTimeout = errors.New("back-end did not answer in time")

// ErrBroken is wrapped by the error of a request made after one timed out
// or one whose reply could not be received.
var ErrBroken = errors.New("vhost-user connection broken by an earlier failure")

// ErrDisconnected is wrapped by the error of a request whose message could
// not be sent or whose reply could not be received: the back-end closed the
// connection (it died) or the socket failed. Like ErrTimeout and ErrBroken,
// it says that the back-end is gone rather than that it refused. A reply
// that could not be received closes the connection, and every later
// request fails with ErrBroken.
var ErrDisconnected = errors.New("vhost-user back-end disconnected")

// Gone reports whether err says that the back-end is gone (it timed out,
// disconnected or died) rather than that it refused a request.
func Gone(err error) bool {
	return errors.Is(err, ErrTimeout) || errors.Is(err, ErrBroken) || errors.Is(err, ErrDisconnected)
}

// DefaultTimeout bounds each request and its reply unless SetTimeout says
// otherwise. A back-end answers in microseconds; the bound is for one that
// hangs, since the core calls it from vCPU threads.
const DefaultTimeout = 5 * time.Second

// DefaultStopTimeout bounds the requests that stop a ring (GET_VRING_BASE,
// SET_VRING_ENABLE 0) unless SetStopTimeout says otherwise: a back-end
// answers them once the ring's requests in flight are done, and a slow
// disk's flush or a network share's read is not a dead back-end. The core
// bounds all the stop requests of one guest access further (core/mmio's
// StopBudget, through GetVringBaseWithin and DisableVringWithin).
const DefaultStopTimeout = 10 * time.Second

// Client talks to one back-end over a connected socket. Its methods are
// safe for concurrent use; requests are serialized, and each one, with its
// reply, must complete within the client's timeout.
type Client struct {
	conn *vhostuser.Conn

	mu       sync.Mutex
	protocol uint64 // acked protocol features
	timeout  time.Duration
	stop     time.Duration // the timeout of the requests that stop a ring
	broken   error

	configEvery time.Duration // BackendRequests: spacing of config changes
}

// New wraps a connected Conn; the Client owns it.
func New(conn *vhostuser.Conn) *Client {
	return &Client{conn: conn, timeout: DefaultTimeout, stop: DefaultStopTimeout, configEvery: ConfigChangeInterval}
}

// SetTimeout sets how long a request and its reply may take (0: no
// limit), the requests that stop a ring excepted (SetStopTimeout).
func (c *Client) SetTimeout(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.timeout = d
}

// SetStopTimeout sets how long GET_VRING_BASE and SET_VRING_ENABLE 0 may
// take (0: no limit).
func (c *Client) SetStopTimeout(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stop = d
}

// Dial connects to a back-end listening on a unix socket at path.
func Dial(path string) (*Client, error) {
	c, err := vhostuser.Dial(path)
	if err != nil {
		return nil, err
	}
	return New(c), nil
}

// NewFromFile wraps a connected unix socket file (duplicated; the caller
// keeps f).
func NewFromFile(f *os.File) (*Client, error) {
	c, err := vhostuser.NewConn(f)
	if err != nil {
		return nil, err
	}
	return New(c), nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn returns the underlying connection.
func (c *Client) Conn() *vhostuser.Conn { return c.conn }

// ProtocolFeatures returns the protocol features acked with
// SetProtocolFeatures.
func (c *Client) ProtocolFeatures() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.protocol
}

// call sends one request and, if the request has a reply body or REPLY_ACK
// is negotiated, waits for and validates the reply.
func (c *Client) call(req vhostuser.Request, payload []byte, files []*os.File) (any, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.callLocked(req, payload, files)
}

// stopCall is call for a request that stops a ring: bounded by the stop
// timeout.
func (c *Client) stopCall(req vhostuser.Request, payload []byte, limit time.Duration) (any, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.callWithin(req, payload, nil, within(c.stop, limit))
}

// within is timeout, or limit where that is shorter (0: no limit).
func within(timeout, limit time.Duration) time.Duration {
	if limit > 0 && (timeout <= 0 || limit < timeout) {
		return limit
	}
	return timeout
}

func (c *Client) callLocked(req vhostuser.Request, payload []byte, files []*os.File) (any, error) {
	return c.callWithin(req, payload, files, c.timeout)
}

func (c *Client) callWithin(req vhostuser.Request, payload []byte, files []*os.File, timeout time.Duration) (any, error) {
	if c.broken != nil {
		return nil, fmt.Errorf("%v: %w (%v)", req, ErrBroken, c.broken)
	}
	if timeout > 0 {
		uc := c.conn.UnixConn()
		uc.SetDeadline(time.Now().Add(timeout))
		defer uc.SetDeadline(time.Time{})
	}
	v, err := c.exchangeLocked(req, payload, files)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		c.broken = err
		c.conn.Close()
		return nil, fmt.Errorf("%v: %w (%v): %w", req, ErrTimeout, timeout, err)
	}
	return v, err
}

func (c *Client) exchangeLocked(req vhostuser.Request, payload []byte, files []*os.File) (any, error) {
	flags := vhostuser.Version
	ack := false
	if !vhostuser.HasReply(req) && c.protocol&vhostuser.ProtocolReplyAck != 0 {
		flags |= vhostuser.FlagNeedReply
		ack = true
	}
	if err := c.conn.Send(req, flags, payload, files); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, vhostuser.ErrNotSent) {
			// A message this side could not make (too many or closed
			// files, too large) is this side's mistake, not the back-end
			// gone: reporting it as gone would have it restarted.
			return nil, err
		}
		return nil, fmt.Errorf("%v: %w: %w", req, ErrDisconnected, err)
	}
	if !ack && !vhostuser.HasReply(req) {
		return nil, nil
	}
	m, err := c.conn.Recv()
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("reply to %v: %w", req, err)
		}
		// Recv leaves the stream in an unknown state (a refused header
		// leaves its payload unread, which a back-end can make look like
		// the next reply): the connection ends here.
		err = fmt.Errorf("reply to %v: %w: %w", req, ErrDisconnected, err)
		c.broken = err
		c.conn.Close()
		return nil, err
	}
	defer m.CloseFiles()
	v, err := vhostuser.ParseReply(req, ack, m)
	if errors.Is(err, vhostuser.ErrBadHeader) {
		// Not a reply to this request (no reply flag, another request's
		// code): a message the back-end sent beside its replies, so its
		// reply to this request may still be in the stream, where the
		// next request would take it for its own. The connection ends
		// here, as after a reply that could not be received. (A reply
		// with the wrong payload or descriptors was this request's,
		// fully read: the stream is in step and stays open.)
		err = fmt.Errorf("%w: %w", ErrDisconnected, err)
		c.broken = err
		c.conn.Close()
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	if in, ok := v.(vhostuser.Inflight); ok {
		return inflightReply{in, m.TakeFile(0)}, nil
	}
	if ack {
		if status := v.(uint64); status != 0 {
			return nil, fmt.Errorf("%v: %w (status %d)", req, ErrNacked, status)
		}
		return nil, nil
	}
	return v, nil
}

func (c *Client) getU64(req vhostuser.Request) (uint64, error) {
	v, err := c.call(req, nil, nil)
	if err != nil {
		return 0, err
	}
	return v.(uint64), nil
}

// GetFeatures returns the back-end's virtio feature bits.
func (c *Client) GetFeatures() (uint64, error) { return c.getU64(vhostuser.GetFeatures) }

// SetFeatures acks virtio feature bits.
func (c *Client) SetFeatures(f uint64) error {
	_, err := c.call(vhostuser.SetFeatures, vhostuser.EncodeU64(f), nil)
	return err
}

// GetProtocolFeatures returns the back-end's protocol feature bits.
func (c *Client) GetProtocolFeatures() (uint64, error) {
	return c.getU64(vhostuser.GetProtocolFeatures)
}

// SetProtocolFeatures acks protocol feature bits. From then on, if
// REPLY_ACK is among them, every request without a reply body asks for an
// acknowledgement.
func (c *Client) SetProtocolFeatures(f uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.callLocked(vhostuser.SetProtocolFeatures, vhostuser.EncodeU64(f), nil); err != nil {
		return err
	}
	c.protocol = f
	return nil
}

// SetOwner claims the session.
func (c *Client) SetOwner() error {
	_, err := c.call(vhostuser.SetOwner, nil, nil)
	return err
}

// ResetDevice asks the back-end to disable every ring and return the
// device to its initial state (the guest reset it); it needs
// ProtocolResetDevice. Like a ring's stop, it is bounded by the stop
// timeout: a vCPU waits for it.
func (c *Client) ResetDevice() error { return c.ResetDeviceWithin(0) }

// ResetDeviceWithin is ResetDevice within limit, when shorter than the stop
// timeout (0: the stop timeout).
func (c *Client) ResetDeviceWithin(limit time.Duration) error {
	_, err := c.stopCall(vhostuser.ResetDevice, nil, limit)
	return err
}

// ResetOwner asks the back-end to disable every ring (deprecated message).
func (c *Client) ResetOwner() error {
	_, err := c.call(vhostuser.ResetOwner, nil, nil)
	return err
}

// MemRegion is a memory region together with the file that backs it.
type MemRegion struct {
	vhostuser.MemRegion
	File *os.File
}

// SetMemTable replaces the back-end's memory table (at most
// vhostuser.MaxMemTableRegions regions).
func (c *Client) SetMemTable(regions []MemRegion) error {
	if len(regions) == 0 || len(regions) > vhostuser.MaxMemTableRegions {
		return fmt.Errorf("set mem table: %d regions, want 1..%d", len(regions), vhostuser.MaxMemTableRegions)
	}
	rs := make([]vhostuser.MemRegion, len(regions))
	fs := make([]*os.File, len(regions))
	for i, r := range regions {
		rs[i], fs[i] = r.MemRegion, r.File
	}
	_, err := c.call(vhostuser.SetMemTable, vhostuser.EncodeMemTable(rs), fs)
	return err
}

// GetMaxMemSlots returns how many regions the back-end can hold
// (CONFIGURE_MEM_SLOTS).
func (c *Client) GetMaxMemSlots() (uint64, error) { return c.getU64(vhostuser.GetMaxMemSlots) }

// AddMemReg adds one memory region (CONFIGURE_MEM_SLOTS).
func (c *Client) AddMemReg(r MemRegion) error {
	_, err := c.call(vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(r.MemRegion), []*os.File{r.File})
	return err
}

// RemMemReg removes the region with r's guest address, user address and
// size (CONFIGURE_MEM_SLOTS).
func (c *Client) RemMemReg(r vhostuser.MemRegion) error {
	_, err := c.call(vhostuser.RemMemReg, vhostuser.EncodeSingleMemRegion(r), nil)
	return err
}

// SetVringNum sets the size of ring idx.
func (c *Client) SetVringNum(idx, num uint32) error {
	_, err := c.call(vhostuser.SetVringNum, vhostuser.VringState{Index: idx, Num: num}.Encode(), nil)
	return err
}

// SetVringAddr sets the ring addresses (front-end virtual addresses).
func (c *Client) SetVringAddr(a vhostuser.VringAddr) error {
	_, err := c.call(vhostuser.SetVringAddr, a.Encode(), nil)
	return err
}

// SetVringBase sets the next available index of ring idx.
func (c *Client) SetVringBase(idx, base uint32) error {
	_, err := c.call(vhostuser.SetVringBase, vhostuser.VringState{Index: idx, Num: base}.Encode(), nil)
	return err
}

// GetVringBase stops ring idx and returns its next available index.
func (c *Client) GetVringBase(idx uint32) (uint32, error) { return c.GetVringBaseWithin(idx, 0) }

// GetVringBaseWithin is GetVringBase within limit, when it is shorter
// than the stop timeout (0: the stop timeout).
func (c *Client) GetVringBaseWithin(idx uint32, limit time.Duration) (uint32, error) {
	v, err := c.stopCall(vhostuser.GetVringBase, vhostuser.VringState{Index: idx}.Encode(), limit)
	if err != nil {
		return 0, err
	}
	s := v.(vhostuser.VringState)
	if s.Index != idx {
		return 0, fmt.Errorf("reply to %v: for ring %d, asked %d", vhostuser.GetVringBase, s.Index, idx)
	}
	return s.Num, nil
}

func (c *Client) setVringFD(req vhostuser.Request, idx uint32, f *os.File) error {
	if idx > uint32(vhostuser.VringIdxMask) {
		return fmt.Errorf("%v: ring index %d does not fit in 8 bits", req, idx)
	}
	var files []*os.File
	if f != nil {
		files = []*os.File{f}
	}
	_, err := c.call(req, vhostuser.EncodeVringFD(idx, f == nil), files)
	return err
}

// SetVringKick sets the kick eventfd of ring idx; nil selects polling (the
// no-fd flag). The back-end starts the ring.
func (c *Client) SetVringKick(idx uint32, f *os.File) error {
	return c.setVringFD(vhostuser.SetVringKick, idx, f)
}

// SetVringCall sets the call eventfd of ring idx; nil selects polling.
func (c *Client) SetVringCall(idx uint32, f *os.File) error {
	return c.setVringFD(vhostuser.SetVringCall, idx, f)
}

// SetVringErr sets the error eventfd of ring idx; nil clears it.
func (c *Client) SetVringErr(idx uint32, f *os.File) error {
	return c.setVringFD(vhostuser.SetVringErr, idx, f)
}

// SetVringEnable enables or disables ring idx (needs
// VHOST_USER_F_PROTOCOL_FEATURES).
func (c *Client) SetVringEnable(idx uint32, enable bool) error {
	if !enable {
		return c.DisableVringWithin(idx, 0)
	}
	_, err := c.call(vhostuser.SetVringEnable, vhostuser.VringState{Index: idx, Num: 1}.Encode(), nil)
	return err
}

// DisableVringWithin is SetVringEnable(idx, false) within limit, when it
// is shorter than the stop timeout (0: the stop timeout).
func (c *Client) DisableVringWithin(idx uint32, limit time.Duration) error {
	_, err := c.stopCall(vhostuser.SetVringEnable, vhostuser.VringState{Index: idx}.Encode(), limit)
	return err
}

// GetQueueNum returns the most queues the back-end supports (MQ).
func (c *Client) GetQueueNum() (uint64, error) { return c.getU64(vhostuser.GetQueueNum) }

// GetConfig reads size bytes of the device config space at offset (CONFIG).
func (c *Client) GetConfig(offset, size uint32) ([]byte, error) {
	if size > vhostuser.MaxConfigSize {
		return nil, fmt.Errorf("get config: %d bytes, at most %d", size, vhostuser.MaxConfigSize)
	}
	req := vhostuser.ConfigSpace{Offset: offset, Data: make([]byte, size)}
	v, err := c.call(vhostuser.GetConfig, req.Encode(), nil)
	if err != nil {
		return nil, err
	}
	cs := v.(vhostuser.ConfigSpace)
	if cs.Offset != offset || uint32(len(cs.Data)) != size {
		return nil, fmt.Errorf("reply to %v: got %d bytes at %#x, asked %d at %#x", vhostuser.GetConfig, len(cs.Data), cs.Offset, size, offset)
	}
	return append([]byte(nil), cs.Data...), nil
}

// SetConfig writes data into the device config space at offset (CONFIG).
func (c *Client) SetConfig(offset, flags uint32, data []byte) error {
	if len(data) > vhostuser.MaxConfigSize {
		return fmt.Errorf("set config: %d bytes, at most %d", len(data), vhostuser.MaxConfigSize)
	}
	_, err := c.call(vhostuser.SetConfig, vhostuser.ConfigSpace{Offset: offset, Flags: flags, Data: data}.Encode(), nil)
	return err
}
