package vmm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// An external back-end (AddVhostUser, --vhost-user) is a vhost-user
// back-end that krun-core did not start: qemu-storage-daemon, virtiofsd, a
// vhost-device-* daemon, another krun-core serve. It is attached exactly
// as a plugin's back-end is (pluginDevice, attach): the same negotiation,
// memory table, rings, ioeventfds and irqfds. What differs: there is no
// plugin process, so the device's type and queues come from the user's
// options; the core connects to the back-end's socket instead of handing
// a socket pair to a plugin; a hang-up on that socket, not a process exit,
// fails the device; and where the back-end has no config space of its own
// the core serves one (an fs mount tag), as QEMU's vhost-user devices do.

// externalNegotiateTimeout bounds connecting to an external back-end and
// the negotiation: a socket whose owner never answers is an error, not a
// hang before the guest starts.
const externalNegotiateTimeout = 10 * time.Second

// Feature bits of the device types the core adjusts (virtio 1.2, 5.1.3,
// 5.2.3, 5.11.3).
const (
	netFCtrlGuestOffloads = 1 << 2
	netFMTU               = 1 << 3
	netFMAC               = 1 << 5
	netFStatus            = 1 << 16
	netFCtrlVQ            = 1 << 17
	netFCtrlRx            = 1 << 18
	netFCtrlVLAN          = 1 << 19
	netFGuestAnnounce     = 1 << 21
	netFMQ                = 1 << 22
	netFCtrlMACAddr       = 1 << 23
	netFHashReport        = 1 << 57
	netFRSS               = 1 << 60
	netFSpeedDuplex       = 1 << 63
	blkFMQ                = 1 << 12
	fsFNotification       = 1 << 0

	// netNeedsCtrlVQ are the net features that work through the control
	// queue, which QEMU emulates for a vhost-user-net back-end and the
	// core does not: never offered to the guest.
	netNeedsCtrlVQ = netFCtrlGuestOffloads | netFCtrlVQ | netFCtrlRx | netFCtrlVLAN | netFGuestAnnounce |
		netFMQ | netFCtrlMACAddr | netFHashReport | netFRSS
	// netNeedsConfig are the net features whose values live in the config
	// space: not offered when the back-end has none.
	netNeedsConfig = netFMTU | netFMAC | netFStatus | netFSpeedDuplex
)

// Config space offsets the core sets itself in a back-end's config space:
// the queue counts, which are the core's choice (the options), not the
// back-end's maximum.
const (
	blkConfigNumQueues       = 34 // le16 num_queues (virtio_blk_config)
	fsConfigNumRequestQueues = 36 // le32 num_request_queues (virtio_fs_config)
	fsConfigSize             = 40
)

// configSize is the size of a known device type's config space, as QEMU
// computes it for a vhost-user device: up to the last field a feature the
// back-end offers brings in (virtio 1.2, 5.1.4, 5.2.4; virtio_blk_config's
// zoned fields from 1.3). 0 for a type the core does not know.
func configSize(typ uint32, offered uint64) uint32 {
	type field struct {
		feature uint64
		end     uint32
	}
	var base uint32
	var fields []field
	switch typ {
	case devspec.VirtioBlk:
		// Up to num_queues; then discard, write zeroes, secure erase,
		// zoned.
		base = 36
		fields = []field{{1 << 13, 48}, {1 << 14, 60}, {1 << 16, 72}, {1 << 17, 96}}
	case devspec.VirtioNet:
		base = 6 // mac
		fields = []field{{netFStatus, 8}, {netFMQ, 10}, {netFMTU, 12}, {netFSpeedDuplex, 17}, {netFRSS | netFHashReport, 24}}
	case devspec.VirtioFS:
		return fsConfigSize
	default:
		return 0
	}
	for _, f := range fields {
		if offered&f.feature != 0 {
			base = max(base, f.end)
		}
	}
	return base
}

// externalBackend is the mmio.Backend of an external back-end: the
// vhost-user client, with the config space adjusted by the core.
type externalBackend struct {
	*frontend.Client
	// forward: the back-end has a config space (CONFIG negotiated);
	// otherwise local is the whole config space, read-only.
	forward bool
	// size, for a known type, is how much config space is read from the
	// back-end, always from offset 0: QEMU reads it that way, and
	// back-ends written against QEMU (qemu-storage-daemon) ignore
	// GET_CONFIG's offset and abort on a size beyond their own struct.
	// 0 forwards each read as it comes.
	size  uint32
	local []byte
	// patch holds config bytes the core sets over the back-end's, by
	// offset.
	patch map[uint32]byte
}

// GetConfig reads the back-end's config space (or the core's own) with the
// core's bytes laid over it.
func (b *externalBackend) GetConfig(offset, size uint32) ([]byte, error) {
	var p []byte
	switch {
	case b.forward && b.size > 0:
		if uint64(offset)+uint64(size) > uint64(b.size) {
			return nil, fmt.Errorf("config read of %d bytes at %#x: outside the %d-byte config space", size, offset, b.size)
		}
		all, err := b.Client.GetConfig(0, b.size)
		if err != nil {
			return nil, err
		}
		p = append([]byte(nil), all[offset:offset+size]...)
	case b.forward:
		var err error
		if p, err = b.Client.GetConfig(offset, size); err != nil {
			return nil, err
		}
	default:
		if uint64(offset)+uint64(size) > uint64(len(b.local)) {
			return nil, fmt.Errorf("config read of %d bytes at %#x: outside the %d-byte config space", size, offset, len(b.local))
		}
		p = append([]byte(nil), b.local[offset:offset+size]...)
	}
	for i := range p {
		if v, ok := b.patch[offset+uint32(i)]; ok {
			p[i] = v
		}
	}
	return p, nil
}

// SetConfig writes the back-end's config space; the core's own is
// read-only.
func (b *externalBackend) SetConfig(offset, flags uint32, data []byte) error {
	if !b.forward {
		return errors.New("the config space is read-only")
	}
	return b.Client.SetConfig(offset, flags, data)
}

// connectExternal connects to an external back-end and negotiates
// features and protocol features with it; attach does the rest, as for a
// plugin.
func (c *Context) connectExternal(ctx context.Context, i int, v *devspec.VhostUserSpec) (_ *pluginDevice, err error) {
	d := &pluginDevice{index: i, spec: v, external: v, reconnect: v.Reconnect, log: c.log.Named(v.Kind()), gone: make(chan error, 1)}
	defer func() {
		if err != nil {
			d.shutdown(c.log)
			err = fmt.Errorf("device %d (%s): %w", i, v, err)
		}
	}()
	limit, dctx, cancel := externalLimit(ctx)
	defer cancel()
	client, watch, err := dialExternal(dctx, v)
	if err != nil {
		return nil, err
	}
	d.watch.Store(watch)
	d.setClient(client)
	// The whole negotiation within limit: each request gets what is left.
	deadline, _ := dctx.Deadline()
	left, err := timeLeft(v, limit, deadline)
	if err != nil {
		return nil, err
	}
	d.client.SetTimeout(left)
	n, err := d.client.Negotiate(frontend.SetupConfig{
		Features:         ^uint64(0), // everything offered; the guest picks later
		ProtocolFeatures: frontend.SupportedProtocolFeatures,
	})
	d.client.SetTimeout(frontend.DefaultTimeout)
	if err != nil {
		return nil, negotiationError(v, limit, err)
	}
	if err := d.adjustExternal(v, n); err != nil {
		return nil, fmt.Errorf("vhost-user back-end %s: %w", v.Socket, err)
	}
	d.negotiated = &n
	d.info = &pluginhost.DeviceInfo{Type: v.Type, NumQueues: v.NumQueues(), MaxQueueSize: v.MaxQueueSize()}
	c.log.Debug("external vhost-user back-end connected", "device", i, "socket", v.Socket,
		"features", fmt.Sprintf("%#x", n.OfferedFeatures), "protocol_features", fmt.Sprintf("%#x", n.ProtocolFeatures),
		"max_queues", n.MaxQueues)
	return d, nil
}

// externalLimit bounds connecting and negotiating with an external
// back-end: externalNegotiateTimeout, or less where ctx ends sooner.
func externalLimit(ctx context.Context) (time.Duration, context.Context, context.CancelFunc) {
	limit := externalNegotiateTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < limit {
		limit = time.Until(dl).Round(time.Millisecond)
	}
	dctx, cancel := context.WithTimeout(ctx, limit)
	return limit, dctx, cancel
}

// dialExternal connects to v's socket. It returns the vhost-user client
// and a copy of the socket for the hang-up watch (watchHangup).
func dialExternal(ctx context.Context, v *devspec.VhostUserSpec) (*frontend.Client, *os.File, error) {
	nc, err := (&net.Dialer{}).DialContext(ctx, "unix", v.Socket)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) {
			err = oe.Err
		}
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		return nil, nil, fmt.Errorf("connect to vhost-user back-end %s: %w", v.Socket, err)
	}
	uc := nc.(*net.UnixConn)
	watch, err := uc.File()
	if err != nil {
		uc.Close()
		return nil, nil, fmt.Errorf("vhost-user back-end %s: %w", v.Socket, err)
	}
	return frontend.New(vhostuser.NewUnixConn(uc)), watch, nil
}

// timeLeft is what is left until deadline for the negotiation's requests,
// or its timeout error once the deadline has passed: the client takes a
// timeout of 0 or less for no limit, so a deadline that passed between the
// dial and the first request (a loaded machine) let a back-end that never
// answers hold the VM's start, or a reconnection, for ever.
func timeLeft(v *devspec.VhostUserSpec, limit time.Duration, deadline time.Time) (time.Duration, error) {
	left := time.Until(deadline)
	if left <= 0 {
		return 0, negotiationError(v, limit, os.ErrDeadlineExceeded)
	}
	return left, nil
}

// negotiationError says why the negotiation with an external back-end
// failed, in one line.
func negotiationError(v *devspec.VhostUserSpec, limit time.Duration, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, frontend.ErrTimeout) {
		return fmt.Errorf("vhost-user back-end %s did not answer the negotiation within %v (is it a vhost-user back-end?)", v.Socket, limit)
	}
	return fmt.Errorf("vhost-user back-end %s refused the negotiation: %w", v.Socket, err)
}

// adjustExternal checks what the back-end negotiated against the options
// and sets up the device's config space and the features the guest is
// offered.
func (d *pluginDevice) adjustExternal(v *devspec.VhostUserSpec, n frontend.Negotiated) error {
	hasConfig := n.ProtocolFeatures&vhostuser.ProtocolConfig != 0
	if n.ProtocolFeatures&vhostuser.ProtocolMQ != 0 && uint64(v.NumQueues()) > n.MaxQueues {
		return fmt.Errorf("the back-end serves at most %d queue(s), the device needs %d (queues=)", n.MaxQueues, v.NumQueues())
	}
	b := &externalBackend{Client: d.client, forward: hasConfig, size: configSize(v.Type, n.OfferedFeatures), patch: map[uint32]byte{}}
	switch v.Type {
	case devspec.VirtioBlk:
		if !hasConfig {
			return errors.New("it does not offer a config space (VHOST_USER_PROTOCOL_F_CONFIG), which a vhost-user-blk device needs for the disk's capacity")
		}
		if v.RequestQueues() > 1 && n.OfferedFeatures&blkFMQ == 0 {
			return fmt.Errorf("queues=%d: the back-end does not offer VIRTIO_BLK_F_MQ", v.RequestQueues())
		}
		var q [2]byte
		binary.LittleEndian.PutUint16(q[:], uint16(v.RequestQueues()))
		b.patch[blkConfigNumQueues], b.patch[blkConfigNumQueues+1] = q[0], q[1]
	case devspec.VirtioFS:
		d.featureMask = fsFNotification // no notification queue
		var q [4]byte
		binary.LittleEndian.PutUint32(q[:], uint32(v.RequestQueues()))
		for j := range q {
			b.patch[fsConfigNumRequestQueues+uint32(j)] = q[j]
		}
		if !hasConfig {
			if v.Tag == "" {
				return errors.New("it has no config space (VHOST_USER_PROTOCOL_F_CONFIG) to give the mount tag: set it with tag=")
			}
			b.local = make([]byte, fsConfigSize)
			copy(b.local, v.Tag)
		}
	case devspec.VirtioNet:
		d.featureMask = netNeedsCtrlVQ
		if !hasConfig {
			d.featureMask |= netNeedsConfig // the guest picks its own MAC
			b.local = make([]byte, 0)
		}
	default:
		if !hasConfig {
			b.local = make([]byte, 0)
		}
	}
	d.backend = b
	return nil
}

// errUnresponsive marks a back-end that stopped answering but did not
// close its connection: it may still be serving the rings, and since the
// core cannot kill a process it did not start, it is not replaced.
var errUnresponsive = errors.New("it still holds the connection, so it may still be using the rings; not reconnected")

// monitorExternal watches an external back-end's connection. When the
// back-end closes it (it exited, or dropped the connection) or stops
// answering, the device fails (the guest sees a broken device, as when a
// plugin dies, and the VM runs on), unless reconnect= was given and the
// back-end closed its connection: then the device is suspended and the
// core connects again every reconnect= interval until a back-end takes
// over, with the requests in flight replayed from the inflight region (as
// QEMU's reconnect= does).
func (d *pluginDevice) monitorExternal(ctx context.Context) {
	if d.monitorDone != nil {
		defer close(d.monitorDone)
	}
	for {
		why := d.watchHangup(ctx)
		if why == nil || ctx.Err() != nil || d.exiting.Load() {
			return
		}
		if d.reconnect == 0 || errors.Is(why, errUnresponsive) {
			if d.dev != nil {
				d.dev.Fail(why)
			}
			return
		}
		if !d.reconnectExternal(ctx, why) {
			return
		}
	}
}

// watchHangup waits until the external back-end closes its end of the
// socket, or the transport finds it gone (Recover: a call failed), and
// says which (errUnresponsive: it failed a call but holds the connection);
// nil when ctx ended first or there is nothing to watch. The watched copy
// of the socket is closed on return, so a back-end that stopped answering
// sees the connection end.
func (d *pluginDevice) watchHangup(ctx context.Context) error {
	f := d.watch.Swap(nil)
	if f == nil {
		return nil // shut down already
	}
	defer f.Close()
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return nil
	}
	defer unix.Close(stop)
	done := make(chan struct{})
	var gone error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-ctx.Done():
		case gone = <-d.gone:
		case <-done:
			return
		}
		var one [8]byte
		one[0] = 1
		unix.Write(stop, one[:])
	}()
	var once sync.Once
	finish := func() { once.Do(func() { close(done); wg.Wait() }) }
	defer finish() // before stop is closed: no write to a reused fd number
	const hungUp = unix.POLLRDHUP | unix.POLLHUP | unix.POLLERR
	fds := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLRDHUP}, {Fd: int32(stop), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return nil
		}
		if fds[0].Revents&hungUp != 0 {
			return fmt.Errorf("vhost-user back-end %s disconnected", d.external.Socket)
		}
		if fds[1].Revents != 0 {
			finish()
			if gone == nil || ctx.Err() != nil {
				return nil
			}
			// A call failed: a closed connection is a disconnection
			// (the peer's close is seen at once), anything else a
			// back-end that stopped answering.
			p := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLRDHUP}}
			if n, err := unix.Poll(p, 0); err == nil && n > 0 && p[0].Revents&hungUp != 0 {
				return fmt.Errorf("vhost-user back-end %s disconnected", d.external.Socket)
			}
			return fmt.Errorf("vhost-user back-end %s stopped answering (%v): %w", d.external.Socket, gone, errUnresponsive)
		}
	}
}

// reconnectExternal suspends the device and connects to the back-end's
// socket again, at once and then every reconnect= interval, until a
// back-end takes over (true), or the VM is going away or the device
// failed (false).
func (d *pluginDevice) reconnectExternal(ctx context.Context, why error) bool {
	if err := d.suspendForReplacement(); err != nil {
		d.log.Error("vhost-user back-end lost and the device failed; not reconnecting", "device", d.index, "reason", why, "error", err)
		return false
	}
	// Without an inflight region a new back-end starts at the used index:
	// exact only when nothing is outstanding. Checked at the loss and
	// again after any attempt that handed the rings to a back-end.
	checkIdle := d.inflight == nil
	d.lossLog.Warn(d.log, "vhost-user back-end lost; reconnecting", "device", d.index, "reason", why, "every", d.reconnect)
	start := time.Now()
	// A back-end that drops each new connection gets one attempt per
	// interval, not a busy loop.
	if time.Since(d.lastReconnect) < d.reconnect && !sleepCtx(ctx, d.reconnect) {
		return false
	}
	for attempt := 1; ; attempt++ {
		if ctx.Err() != nil || d.exiting.Load() {
			return false
		}
		if err := d.dev.Failed(); err != nil {
			d.log.Error("the device failed while its back-end was away; not reconnecting", "device", d.index, "error", err)
			return false
		}
		if checkIdle {
			q, err := d.dev.Outstanding(d.usedIndex)
			if err == nil && q >= 0 {
				err = fmt.Errorf("queue %d had requests in flight, and the back-end keeps no inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) from which a new one could replay them", q)
			}
			if err != nil {
				d.log.Error("vhost-user back-end lost; not reconnecting", "device", d.index, "reason", why, "error", err)
				d.dev.Fail(fmt.Errorf("%w; not reconnected: %w", why, err))
				return false
			}
			checkIdle = false
		}
		handed, err := d.reattachExternal(ctx)
		if err == nil {
			d.lastReconnect = time.Now()
			d.backLog.Warn(d.log, "reconnected to the vhost-user back-end; the device serves again", "device", d.index,
				"socket", d.external.Socket, "attempts", attempt, "took", time.Since(start).Round(time.Millisecond))
			return true
		}
		checkIdle = d.inflight == nil && handed
		if ctx.Err() != nil || d.exiting.Load() {
			return false
		}
		d.failLog.Warn(d.log, "reconnect failed; trying again", "device", d.index, "error", err, "in", d.reconnect)
		if !sleepCtx(ctx, d.reconnect) {
			return false
		}
	}
}

// reattachExternal connects to the back-end's socket, negotiates, checks
// the new back-end as the first one was checked (and that it offers what
// the first one had), gives it the memory table and the inflight region,
// and resumes the device on it. handed reports whether the rings were
// handed to the new back-end (Resume was reached), even if it failed
// after that. The attempt ends when ctx does.
func (d *pluginDevice) reattachExternal(ctx context.Context) (handed bool, err error) {
	d.dropPlugin() // the lost connection: there is no process
	limit, dctx, cancel := externalLimit(ctx)
	defer cancel()
	client, watch, err := dialExternal(dctx, d.external)
	if err != nil {
		return false, err
	}
	// A back-end that accepts and then does not answer holds the attempt
	// for at most limit, and never the VM's exit.
	defer context.AfterFunc(ctx, func() { client.Close() })()
	defer func() {
		if err != nil {
			watch.Close()
			d.dropPlugin()
		}
	}()
	d.setClient(client)
	deadline, _ := dctx.Deadline()
	left, err := timeLeft(d.external, limit, deadline)
	if err != nil {
		return false, err
	}
	client.SetTimeout(left)
	n, err := client.Reattach(frontend.SetupConfig{
		Features:         ^uint64(0),
		ProtocolFeatures: frontend.SupportedProtocolFeatures,
		Regions:          d.regions,
	}, d.attached, d.inflight)
	client.SetTimeout(frontend.DefaultTimeout)
	if err != nil {
		return false, negotiationError(d.external, limit, err)
	}
	if err := d.adjustExternal(d.external, n); err != nil {
		return false, fmt.Errorf("vhost-user back-end %s: %w", d.external.Socket, err)
	}
	if n.ProtocolFeatures&vhostuser.ProtocolBackendReq != 0 {
		if d.stopBackendReq, err = client.BackendRequests(d.dev.ConfigChanged); err != nil {
			return false, fmt.Errorf("vhost-user back-end request channel: %w", err)
		}
	}
	if err := d.dev.Resume(d.backend, d.usedIndex); err != nil {
		return true, err
	}
	d.watch.Store(watch)
	return true, nil
}
