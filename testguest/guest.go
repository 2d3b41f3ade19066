package testguest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"golang.org/x/sys/unix"
)

// Options configure a Guest. Zero values pick defaults.
type Options struct {
	MemBase uint64 // guest physical base (page aligned); default 0
	MemSize uint64 // default 64 MiB
	// Regions splits the memory into this many regions of one memfd
	// (default 1). More than vhostuser.MaxMemTableRegions needs
	// CONFIGURE_MEM_SLOTS.
	Regions      int
	UseAddMemReg bool // send ADD_MEM_REG instead of SET_MEM_TABLE

	NumQueues int    // rings to set up; default 1
	QueueSize uint16 // default 256

	// Features are device-specific feature bits wanted (acked if offered);
	// RequiredFeatures must be offered. VIRTIO_F_VERSION_1 is always
	// required; EVENT_IDX and INDIRECT_DESC are wanted unless dropped.
	Features         uint64
	RequiredFeatures uint64
	NoEventIdx       bool
	NoIndirect       bool
	// DropProtocolFeatures removes protocol features from
	// frontend.SupportedProtocolFeatures before negotiation.
	DropProtocolFeatures uint64

	PollKick bool // no kick eventfds: the back-end polls
	PollCall bool // no call eventfds: the guest polls
	// DisabledQueues are set up but left disabled (SET_VRING_ENABLE 0).
	DisabledQueues []int
	// Inflight asks the back-end for an inflight region (GET_INFLIGHT_FD)
	// and gives it back (SET_INFLIGHT_FD) before the rings start, so that
	// Reconnect can carry requests in flight over to a new back-end.
	Inflight bool
	// UnsealedInflight makes the region an unsealed memfd the test may
	// truncate, as a hostile front-end's (frontend.GetInflightFD's own
	// is sealed).
	UnsealedInflight bool
	// EndWaitsOnHangup makes a ring's Wait fail with ErrBackendGone once
	// the back-end has closed its vhost-user socket, instead of waiting
	// for a call that can no longer come. Off by default: a test that
	// kills a back-end and Reconnects keeps its waiters across the gap.
	EndWaitsOnHangup bool
}

func (o *Options) defaults() {
	if o.MemSize == 0 {
		o.MemSize = 64 << 20
	}
	if o.Regions == 0 {
		o.Regions = 1
	}
	if o.NumQueues == 0 {
		o.NumQueues = 1
	}
	if o.QueueSize == 0 {
		o.QueueSize = 256
	}
}

// Guest is a driver connected to one vhost-user back-end.
type Guest struct {
	Client     *frontend.Client
	Mem        *Memory
	Rings      []*Ring
	Negotiated frontend.Negotiated
	// Inflight is the back-end's inflight region (Options.Inflight).
	Inflight *frontend.Inflight

	setup     frontend.SetupConfig // what Start installed
	disabled  map[int]bool
	protocolN bool
	// stopWatch ends the hang-up watcher (Options.EndWaitsOnHangup);
	// nil when none runs.
	stopWatch func()
}

// Dial connects to the back-end at path and starts the guest (Start).
func Dial(path string, opt Options) (*Guest, error) {
	c, err := frontend.Dial(path)
	if err != nil {
		return nil, err
	}
	g, err := Start(c, opt)
	if err != nil {
		c.Close()
		return nil, err
	}
	return g, nil
}

// Start negotiates features with the back-end behind c, creates guest
// memory, lays out the rings for the negotiated features and installs
// memory and rings. The Guest owns c from then on (also on error: c is
// not closed).
func Start(c *frontend.Client, opt Options) (*Guest, error) {
	opt.defaults()
	cfg := frontend.SetupConfig{
		Features:         opt.Features,
		RequiredFeatures: opt.RequiredFeatures | vhostuser.FeatureVersion1,
		ProtocolFeatures: frontend.SupportedProtocolFeatures &^ opt.DropProtocolFeatures,
		UseAddMemReg:     opt.UseAddMemReg,
	}
	if !opt.NoEventIdx {
		cfg.Features |= vhostuser.FeatureRingEventIdx
	}
	if !opt.NoIndirect {
		cfg.Features |= vhostuser.FeatureRingIndirectDesc
	}
	for i := 0; i < opt.NumQueues; i++ {
		cfg.Queues = append(cfg.Queues, frontend.QueueSetup{Index: uint32(i)})
	}
	n, err := c.Negotiate(cfg)
	if err != nil {
		return nil, fmt.Errorf("negotiate: %w", err)
	}
	mem, err := NewMemory(opt.MemBase, opt.MemSize)
	if err != nil {
		return nil, err
	}
	g := &Guest{Client: c, Mem: mem, Negotiated: n}
	ropt := RingOptions{
		Size:     opt.QueueSize,
		EventIdx: n.Features&vhostuser.FeatureRingEventIdx != 0,
		Indirect: n.Features&vhostuser.FeatureRingIndirectDesc != 0,
		PollKick: opt.PollKick,
		PollCall: opt.PollCall,
	}
	disabled := map[int]bool{}
	for _, i := range opt.DisabledQueues {
		disabled[i] = true
	}
	cfg.Queues = cfg.Queues[:0]
	for i := 0; i < opt.NumQueues; i++ {
		r, err := NewRing(mem, uint32(i), ropt)
		if err != nil {
			g.closeLocal()
			return nil, err
		}
		g.Rings = append(g.Rings, r)
		qs := r.Setup()
		qs.Disabled = disabled[i]
		cfg.Queues = append(cfg.Queues, qs)
	}
	cfg.Regions = mem.Regions(opt.Regions)
	if opt.Inflight {
		if g.Inflight, err = c.GetInflightFD(uint16(opt.NumQueues), opt.QueueSize); err != nil {
			g.closeLocal()
			return nil, fmt.Errorf("inflight region: %w", err)
		}
		if opt.UnsealedInflight {
			if err := unsealInflight(g.Inflight); err != nil {
				g.closeLocal()
				return nil, err
			}
		}
		if err := c.SetInflightFD(g.Inflight); err != nil {
			g.closeLocal()
			return nil, fmt.Errorf("inflight region: %w", err)
		}
	}
	if err := c.Install(cfg, n); err != nil {
		g.closeLocal()
		return nil, fmt.Errorf("install memory and queues: %w", err)
	}
	g.setup, g.disabled = cfg, disabled
	g.protocolN = n.Features&vhostuser.FeatureProtocolFeatures != 0
	if opt.EndWaitsOnHangup {
		g.watchHangup(c)
	}
	return g, nil
}

// hangupEvery is how often the watcher looks at the socket.
const hangupEvery = 100 * time.Millisecond

// watchHangup starts a goroutine that looks at c's socket every
// hangupEvery and, once the back-end has closed its end, marks every
// ring gone and wakes its waiters.
func (g *Guest) watchHangup(c *frontend.Client) {
	for _, r := range g.Rings {
		r.gone.Store(false)
	}
	done := make(chan struct{})
	exited := make(chan struct{})
	g.stopWatch = func() {
		close(done)
		<-exited
	}
	uc := c.Conn().UnixConn()
	rings := g.Rings
	go func() {
		defer close(exited)
		t := time.NewTicker(hangupEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			if socketHungUp(uc) {
				for _, r := range rings {
					r.markGone()
				}
				return
			}
		}
	}()
}

// unwatch stops the hang-up watcher, if one runs.
func (g *Guest) unwatch() {
	if g.stopWatch != nil {
		g.stopWatch()
		g.stopWatch = nil
	}
}

// socketHungUp says whether the peer of uc has closed its end, without
// reading from it (the replies stay for the Client).
func socketHungUp(uc *net.UnixConn) bool {
	rc, err := uc.SyscallConn()
	if err != nil {
		return true
	}
	hung := false
	if err := rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		n, err := unix.Poll(p, 0)
		hung = err == nil && n > 0 && p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
	}); err != nil {
		return true // closed on our side
	}
	return hung
}

// Reconnect carries the guest over to a new back-end behind c after the
// previous one died or disconnected: memory, features, the inflight
// region and every ring, each resumed at its used index in guest memory
// (the new back-end resubmits what the region says was in flight). The
// old client is closed; the Guest owns c from then on (also on error).
// Requests posted before keep their tokens: their completions come from
// the new back-end.
func (g *Guest) Reconnect(c *frontend.Client) error {
	watched := g.stopWatch != nil
	g.unwatch()
	g.Client.Close()
	g.Client = c
	cfg := g.setup
	cfg.Features = g.Negotiated.Features &^ vhostuser.FeatureProtocolFeatures
	cfg.RequiredFeatures = cfg.Features
	n, err := c.Reattach(cfg, g.Negotiated, g.Inflight)
	if err != nil {
		return fmt.Errorf("reattach: %w", err)
	}
	if n.Features != g.Negotiated.Features {
		return fmt.Errorf("reattach: features %#x, had %#x", n.Features, g.Negotiated.Features)
	}
	for i, r := range g.Rings {
		qs := r.Setup()
		qs.Base = r.UsedIdx()
		qs.Disabled = g.disabled[i]
		if err := c.SetupQueue(qs, g.protocolN); err != nil {
			return fmt.Errorf("ring %d: %w", i, err)
		}
	}
	if watched {
		g.watchHangup(c)
	}
	return nil
}

// Features are the acked virtio features.
func (g *Guest) Features() uint64 { return g.Negotiated.Features }

// StopQueue stops ring i (GET_VRING_BASE) and returns the back-end's next
// available index.
func (g *Guest) StopQueue(i int) (uint32, error) {
	if i < 0 || i >= len(g.Rings) {
		return 0, errors.New("no such ring")
	}
	return g.Client.GetVringBase(uint32(i))
}

func (g *Guest) closeLocal() {
	for _, r := range g.Rings {
		r.Close()
	}
	g.Inflight.Close()
	g.Mem.Close()
}

// Close disconnects from the back-end and releases memory and eventfds.
func (g *Guest) Close() error {
	g.unwatch()
	err := g.Client.Close()
	g.closeLocal()
	return err
}

// unsealInflight replaces in's file with an unsealed memfd of its size.
func unsealInflight(in *frontend.Inflight) error {
	fd, err := unix.MemfdCreate("testguest-inflight", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("inflight region: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inflight")
	if err := f.Truncate(int64(in.MmapOffset + in.MmapSize)); err != nil {
		f.Close()
		return fmt.Errorf("inflight region: %w", err)
	}
	in.File.Close()
	in.File = f
	return nil
}
