package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// Plugin time limits. Start-up gets more than pluginhost's default: on a
// loaded machine (or a nested guest) a plugin's handshake can take seconds.
// SetPluginHandshakeTimeout changes the start-up's.
const (
	pluginShutdownTimeout         = 10 * time.Second
	DefaultPluginHandshakeTimeout = 60 * time.Second
)

// virtio-net's config space: the status field and its link bit.
const (
	netConfigStatus = 6
	netTypeID       = 1
)

// pluginDevice is one plugin process and the transport that exposes it.
type pluginDevice struct {
	index  int
	spec   devspec.Spec
	opened *devspec.Opened
	plugin *pluginhost.Plugin
	info   *pluginhost.DeviceInfo
	sock   *os.File // the core's end of the vhost-user socket
	client *frontend.Client
	dev    *mmio.Device
	// stopBackendReq closes the back-end request channel (config changes
	// from the plugin); nil without one.
	stopBackendReq func()

	// An external back-end (external.go) has no plugin and no opened
	// files: it was connected to and negotiated with already
	// (negotiated), backend adjusts its config space, featureMask are
	// features never offered to the guest, and watch is a copy of its
	// socket that monitor polls for a hang-up. reconnect is the
	// interval between attempts to connect again once it is lost (0:
	// the device fails instead; see monitorExternal).
	external  *devspec.VhostUserSpec
	reconnect time.Duration
	// lossLog, failLog and backLog space the reconnection's lines (a
	// back-end that drops each new connection); lastReconnect is when one
	// last succeeded (monitor's goroutine only).
	lossLog, failLog, backLog ratelog.Limiter
	lastReconnect             time.Time
	negotiated                *frontend.Negotiated
	backend                   mmio.Backend
	featureMask               uint64
	watch                     atomic.Pointer[os.File]

	// essential says what the device is to a guest that cannot do
	// without it (Context.essential); "" for the others.
	essential string

	// Restarts (see restart): the Context that launched the plugin, the
	// restart budget (nil: the device is never restarted), what the first
	// attach negotiated and sent, the inflight region the plugin's
	// successors get, and usedIndex, which reads a used ring's index in
	// guest memory. gone carries a back-end failure the transport saw;
	// queueErr the rings whose error eventfd the plugin signalled;
	// monitorDone is closed when monitor returns.
	c           *Context
	log         hclog.Logger
	restarts    *pluginhost.Restarts
	attached    frontend.Negotiated
	regions     []frontend.MemRegion
	inflight    *frontend.Inflight
	usedIndex   func(usedGPA uint64) (uint16, error)
	gone        chan error
	queueErr    chan int
	monitorDone chan struct{}
	// backoff waits out a restart's back-off delay: false when ctx ended
	// first. Tests replace it to look at the device during the wait.
	backoff func(ctx context.Context, delay time.Duration) bool

	// liveMu guards plugin and client against the goroutines other than
	// the monitor's, which replaces them: stopVCPUs (cutOff) and a vCPU
	// thread that abandons the plugin (abandon). It is never held across
	// a call to the plugin or to the transport.
	liveMu sync.Mutex
	// exiting is set by cutOff: the VM is going away.
	exiting atomic.Bool

	closeOnce sync.Once
}

// setPlugin and setClient replace the plugin and the client (monitor's
// goroutine, or before the device runs).
func (d *pluginDevice) setPlugin(p *pluginhost.Plugin) {
	d.liveMu.Lock()
	d.plugin = p
	d.liveMu.Unlock()
}

func (d *pluginDevice) setClient(c *frontend.Client) {
	d.liveMu.Lock()
	d.client = c
	d.liveMu.Unlock()
}

// cutOff closes the connection to the back-end, so that a vCPU waiting on
// it gets an error (stopVCPUs, at VM exit). Any goroutine. The guest does
// not run again, so from then on the plugin is not abandoned (killed)
// when a stop fails: shutdown lets it flush and exit.
func (d *pluginDevice) cutOff() {
	d.exiting.Store(true)
	d.liveMu.Lock()
	c := d.client
	d.liveMu.Unlock()
	if c != nil {
		c.Close()
	}
}

// stopBudget bounds the time one guest access spends asking a plugin to
// stop rings (mmio.Config.StopBudget: each request gets at most what is
// left of it): with abandonWait, a vCPU is held under the 21 s after which
// a Linux guest reports an RCU stall.
const stopBudget = 15 * time.Second

// setupBudget bounds the time one guest access spends setting up rings in
// a plugin (mmio.Config.SetupBudget), however many it starts: a plugin
// sets up a ring in microseconds, and one that answers each request just
// inside its timeout would otherwise hold a vCPU for seven timeouts a ring,
// up to 256 rings (found in review).
const setupBudget = frontend.DefaultTimeout

// abandonWait bounds how long abandon waits for a killed plugin to be
// reaped: a process in uninterruptible sleep (a hung NFS read into guest
// memory) outlives SIGKILL, and the wait holds a vCPU and the device lock.
// Added to stopBudget, it stays under a Linux guest's RCU stall warning
// (21 s).
const abandonWait = 5 * time.Second

// abandon is the transport's Abandon: the plugin did not confirm that a
// ring stopped, or the device is suspended while it is replaced, and the
// driver is about to reuse the ring's memory, so the plugin is killed now
// and this returns once its process is gone; nothing of it writes guest
// memory after that. A process that is not reaped within abandonWait is
// an error (the transport fails the device). An external back-end has no
// process: its connection is closed, which is all the core can do. Runs
// on a vCPU thread (or the monitor's) with the device's lock held.
func (d *pluginDevice) abandon(why error) error {
	if d.exiting.Load() {
		return nil
	}
	d.liveMu.Lock()
	p, c := d.plugin, d.client
	d.liveMu.Unlock()
	if p == nil {
		if c != nil {
			c.Close()
		}
		return nil
	}
	select {
	case <-p.Done():
		return nil // already gone
	default:
	}
	if errors.Is(why, mmio.ErrReplaced) { // monitor's recover logs why
		d.log.Debug("killing the plugin before it is replaced", "device", d.index, "pid", p.Pid())
	} else {
		d.log.Warn("killing the plugin before the guest reuses its rings", "device", d.index, "pid", p.Pid(), "reason", why)
	}
	if !killReaped(p) {
		d.c.pluginLeft()
		return fmt.Errorf("plugin (pid %d) still runs %v after SIGKILL", p.Pid(), abandonWait)
	}
	return nil
}

// pluginLeft records that a plugin outlived SIGKILL and was left running
// (killReaped); c may be nil (a device built by a test).
func (c *Context) pluginLeft() {
	if c != nil {
		c.pluginsLeft.Store(true)
	}
}

// killReaped kills p and reports whether its process was reaped within
// abandonWait (the kill goes on in the background if not).
func killReaped(p *pluginhost.Plugin) bool {
	go p.Kill()
	t := time.NewTimer(abandonWait)
	defer t.Stop()
	select {
	case <-p.Done():
		return true
	case <-t.C:
		return false
	}
}

// restartable reports whether the core restarts the plugin of a device of
// spec s when it dies. A disk's plugin holds no state the image does not
// (and its requests in flight are resubmitted), a network plugin's
// connections are lost with it anyway, and a third-party plugin gets its
// requests resubmitted like the others. A virtio-fs plugin holds the
// guest's FUSE node ids and open handles, which a new process cannot
// honour without risking a wrong file, and the console plugin holds the
// stdio stream: those devices fail as before (docs/ARCHITECTURE.md).
func restartable(s devspec.Spec) bool {
	switch s.(type) {
	case *devspec.DiskSpec, *devspec.NetSpec, *devspec.PluginSpec:
		return true
	}
	return false
}

// launchPlugins starts one plugin per device, concurrently, and returns
// them configured and serving vhost-user. On error none is left running.
func (c *Context) launchPlugins(ctx context.Context) ([]*pluginDevice, error) {
	var sockets []string
	for _, s := range c.devices {
		if v, ok := s.(*devspec.VhostUserSpec); ok {
			sockets = append(sockets, v.Socket)
		}
	}
	if len(sockets) > 0 {
		c.log.Warn("external vhost-user back-ends are not sandboxed by krun-core: they run with whatever confinement their owner gave them",
			"sockets", strings.Join(sockets, ","))
	}
	devs := make([]*pluginDevice, len(c.devices))
	errs := make([]error, len(c.devices))
	var wg sync.WaitGroup
	for i, s := range c.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			devs[i], errs[i] = c.launchPlugin(ctx, i, s)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, d := range devs {
			if d != nil {
				d.shutdown(c.log)
			}
		}
		return nil, err
	}
	return devs, nil
}

func (c *Context) launchPlugin(ctx context.Context, i int, s devspec.Spec) (_ *pluginDevice, err error) {
	if v, ok := s.(*devspec.VhostUserSpec); ok {
		return c.connectExternal(ctx, i, v)
	}
	d := &pluginDevice{index: i, spec: s, c: c, gone: make(chan error, 1), queueErr: make(chan int, maxQueueErrors), essential: c.essential[s]}
	defer func() {
		if err != nil {
			d.shutdown(c.log)
			err = fmt.Errorf("device %d (%s): %w", i, s, err)
		}
	}()
	if d.opened, err = s.Open(d.openOptions()); err != nil {
		return nil, err
	}
	d.log = c.log.Named(d.opened.Kind)
	if restartable(s) {
		if r := pluginhost.NewRestarts(c.restartPolicy); r.Enabled() {
			d.restarts = r
		}
	}
	if d.info, err = d.startPlugin(ctx); err != nil {
		return nil, err
	}
	if d.restarts != nil && d.info.NoRestart {
		d.log.Info("the plugin's requests must not be carried out twice: it will not be restarted", "device", i)
		d.restarts = nil
	}
	if d.restarts == nil {
		// The plugin has its own copies; nobody needs ours. A plugin that
		// is restarted gets them again.
		d.opened.CloseFiles()
	}
	return d, nil
}

func (d *pluginDevice) openOptions() devspec.OpenOptions {
	// Helpers (passt) log into the core's log.
	return devspec.OpenOptions{HelperStderr: devspec.HelperLog(d.c.log.Named("helper")),
		Sandbox: d.launchConfig(), Log: d.c.log.Named(d.spec.Kind())}
}

// launchConfig is the sandbox the device's plugin is launched in (nil: the
// sandbox is off). Opening the device's files needs it too (a share
// becomes an ID-mapped mount for the plugin's ids).
func (d *pluginDevice) launchConfig() *sandbox.LaunchConfig {
	c := d.c
	if c.sandboxOff {
		return nil
	}
	lc := &sandbox.LaunchConfig{Kind: d.spec.Kind(), Disable: c.sandboxDisable, Log: c.log.Named(d.spec.Kind()),
		HostUID: c.pluginUID, HostGID: c.pluginGID, ReadOnlyDirs: devspec.ReadOnlyDirs(d.spec)}
	if _, ok := d.spec.(*devspec.PluginSpec); ok {
		lc.ExtraSyscalls = c.syscallGrants[d.spec.Kind()]
	}
	return lc
}

// startPlugin launches the plugin of d.opened on a new socket pair,
// configures and starts it, and returns the device it serves.
func (d *pluginDevice) startPlugin(ctx context.Context) (*pluginhost.DeviceInfo, error) {
	c := d.c
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vhost-user socketpair: %w", err)
	}
	d.sock = os.NewFile(uintptr(fds[0]), "vhost-user")
	theirs := os.NewFile(uintptr(fds[1]), "vhost-user-plugin")
	defer theirs.Close()

	files := make([]pluginhost.NamedFile, len(d.opened.Files))
	for j, f := range d.opened.Files {
		files[j] = pluginhost.NamedFile{Name: f.Name, File: f.File}
	}
	cfg := pluginhost.Config{
		Kind: d.opened.Kind, PluginDir: c.pluginDir, Socket: theirs, Files: files,
		Logger: d.log, SandboxOff: c.sandboxOff, HandshakeTimeout: c.handshakeTimeout(),
	}
	lc := d.launchConfig()
	if lc != nil {
		// A disk's plugin cannot grow its files past what the disk
		// needs (devspec.Opened.FileBytes), from their sizes now: a
		// restart starts from what the previous plugin left; a share's
		// may have open-files=.
		if lc.Limits, err = d.opened.Limits(lc.Limits); err != nil {
			return nil, err
		}
		cfg.Sandbox = *lc
	}
	p, err := pluginhost.LaunchContext(ctx, cfg)
	if err != nil {
		return nil, err
	}
	d.setPlugin(p)
	info, _, err := d.plugin.Configure(ctx, d.opened.Options)
	if err != nil {
		return nil, err
	}
	if lc != nil && info != nil {
		if err := d.opened.LimitFileBytes(p.Pid(), info.Config, d.log); err != nil {
			return nil, err
		}
	}
	if err := d.plugin.Start(ctx); err != nil {
		return nil, err
	}
	return info, nil
}

// attachDevices connects to every plugin over vhost-user, gives it the
// guest memory and creates its virtio-mmio transport.
func (m *machine) attachDevices() error {
	regions := make([]frontend.MemRegion, 0, len(m.mem.Regions()))
	for _, r := range m.mem.Regions() {
		ua, err := m.hostAddr(uint64(r.GuestAddr), r.Size)
		if err != nil {
			return err
		}
		regions = append(regions, frontend.MemRegion{
			MemRegion: vhostuser.MemRegion{GuestAddr: uint64(r.GuestAddr), Size: r.Size, UserAddr: ua, MmapOffset: r.Offset},
			File:      m.memFile,
		})
	}
	for _, d := range m.devices {
		if err := m.attach(d, regions); err != nil {
			return fmt.Errorf("device %d (%s): %w", d.index, d.spec, err)
		}
	}
	return nil
}

// wiring is what connects eventfds to the guest: KVM, or a test's stand-in.
func (m *machine) wiring() mmio.Wiring {
	if m.testWiring != nil {
		return m.testWiring
	}
	return m.vm
}

// usedIndex reads the index of the used ring at gpa from guest memory,
// with one 16-bit load: a back-end judged lost may still be storing it
// (an external one whose connection dropped), and a byte-wise Read racing
// its store of 0x4d00 over 0x4cff returns 0x4dff. Every ring it is asked
// about is live, so its address passed the transport's alignment check
// (mmio ringLayout: 2 for the available ring, 4 for the used ring).
func (m *machine) usedIndex(gpa uint64) (uint16, error) {
	if gpa > ^uint64(0)-2 {
		return 0, fmt.Errorf("used ring at %#x", gpa)
	}
	return m.mem.Load16(guestmem.Addr(gpa + 2))
}

// guestBlkRing is the largest blk ring krun's guests are offered.
const guestBlkRing = 256

func (m *machine) attach(d *pluginDevice, regions []frontend.MemRegion) error {
	info := d.info
	if info.NumQueues < 1 || info.NumQueues > 256 {
		return fmt.Errorf("plugin reports %d queues", info.NumQueues)
	}
	qmax := info.MaxQueueSize
	if qmax < 1 || qmax > 32768 || qmax&(qmax-1) != 0 {
		return fmt.Errorf("plugin reports maximum queue size %d", qmax)
	}
	if info.Type == devspec.VirtioBlk && d.external == nil {
		// The guest's rings on a blk plugin stop at 256, as QEMU's own
		// virtio-blk offers, whatever larger ring the plugin takes
		// (1024, for QEMU users of `serve`): a guest queue as deep as
		// the ring buys nothing at the depths guests use, and costs a
		// guest kernel older than 5.17 seg_max+2 preallocated
		// scatterlist entries per request of that depth. An external
		// back-end's ring is what its queue-size= says.
		qmax = min(qmax, guestBlkRing)
	}
	client := d.client
	var n frontend.Negotiated
	if d.negotiated != nil { // an external back-end, negotiated with already
		n = *d.negotiated
	} else {
		var err error
		if client, err = frontend.NewFromFile(d.sock); err != nil {
			return err
		}
		d.setClient(client)
		n, err = client.Negotiate(frontend.SetupConfig{
			Features:         ^uint64(0), // everything offered; the guest picks later
			ProtocolFeatures: frontend.SupportedProtocolFeatures,
		})
		if err != nil {
			return fmt.Errorf("vhost-user negotiation: %w", err)
		}
	}
	if err := client.SetMemTable(regions); err != nil {
		return fmt.Errorf("vhost-user memory table: %w", err)
	}
	if d.restarts != nil {
		// A plugin the core restarts tracks its requests in an inflight
		// region the core keeps for its successors; one that cannot is
		// not restarted.
		if err := d.setupInflight(client, n, info.NumQueues, qmax); err != nil {
			d.log.Warn("plugin keeps no inflight region; it will not be restarted", "error", err)
			d.restarts = nil
		}
	}
	switch {
	case d.reconnect == 0:
	case n.ProtocolFeatures&vhostuser.ProtocolInflightSHMFD != 0:
		// The same for an external back-end the core reconnects to.
		if err := d.setupInflight(client, n, info.NumQueues, qmax); err != nil {
			return fmt.Errorf("vhost-user inflight region: %w", err)
		}
	default:
		// One without (qemu-storage-daemon 7.2) is reconnected only when
		// it is lost with no request outstanding (reconnectExternal).
		d.log.Warn("vhost-user back-end keeps no inflight region (INFLIGHT_SHMFD): it is reconnected only if lost with no request outstanding",
			"device", d.index, "socket", d.external.Socket)
	}
	d.attached, d.regions, d.usedIndex = n, regions, m.usedIndex
	var backend mmio.Backend = client
	configSpace := n.ProtocolFeatures&vhostuser.ProtocolConfig != 0
	configSize := 0
	configData := info.Config
	if d.backend != nil {
		backend, configSpace = d.backend, true
		if eb, ok := d.backend.(*externalBackend); ok {
			switch {
			case !eb.forward:
				// The back-end has no config space: the core's own
				// (a virtio-fs tag, or none at all for a net device
				// whose config features are masked) is served as it
				// is; bytes beyond it read as zero.
				b, err := eb.GetConfig(0, uint32(len(eb.local)))
				if err != nil {
					return fmt.Errorf("config space: %w", err)
				}
				configData = append([]byte{}, b...)
			case eb.size > 0:
				// An external back-end has no Configure data: the
				// core reads its config space once at attach and
				// serves the guest from that copy, so no vCPU waits
				// on the back-end.
				configSize = int(eb.size)
			}
		}
	}
	cfg := mmio.Config{
		DeviceID:           info.Type,
		Base:               MMIOBase + uint64(d.index)*MMIOStride,
		GSI:                FirstDeviceGSI + uint32(d.index),
		NumQueues:          info.NumQueues,
		QueueSizeMax:       uint16(min(qmax, 32768)),
		Features:           n.OfferedFeatures &^ d.featureMask,
		ProtocolNegotiated: n.Features&vhostuser.FeatureProtocolFeatures != 0,
		ConfigSpace:        configSpace,
		ConfigData:         configData,
		ConfigSize:         configSize,
		Backend:            backend,
		Wiring:             m.wiring(),
		Translate:          m.hostAddr,
		Log:                m.log.Named(fmt.Sprintf("virtio-mmio.%d", d.index)),
	}
	cfg.Abandon = d.abandon
	cfg.StopBudget = stopBudget
	cfg.SetupBudget = setupBudget
	if what := d.essential; what != "" {
		cfg.OnFail = func(err error) {
			if _, done := m.status.exitStatus(); done {
				// The command has exited and reported its status: the
				// guest is powering off, and the run ends with the
				// status, not with the failure.
				d.log.Debug("device failed after the command exited", "error", err)
				return
			}
			m.event(event{err: fmt.Errorf("%s failed; %w: %w", what, ErrEssentialDevice, err)})
		}
	}
	// The back-end's device state (a virtio-fs session, a console's
	// ports) goes with the guest's reset, as QEMU does it.
	cfg.ResetBackend = n.ProtocolFeatures&vhostuser.ProtocolResetDevice != 0
	if d.reconnect != 0 {
		cfg.Recover = d.backendGone
	}
	if d.restarts != nil || d.inflight != nil {
		cfg.Recover = d.backendGone
		inflight := d.inflight
		cfg.OnReset = func() {
			if err := inflight.Reset(); err != nil {
				d.log.Warn("device reset: inflight region", "error", err)
			}
		}
		cfg.OnQueueLost = func(i int) {
			if err := inflight.ResetQueue(i); err != nil {
				d.log.Warn("queue stopped while the plugin was away: inflight region", "queue", i, "error", err)
			}
		}
	}
	// A ring the back-end stopped on its own (it signalled the ring's
	// error eventfd): a plugin is asked whether it failed (monitor); an
	// external back-end cannot be, and the ring serves nothing more
	// either way, so the device needs a reset. With reconnect= only once
	// the back-end has had time to go away: one that failed on its own
	// may be replaced (another krun-core serve restarts its plugin, which
	// ends the connection), and the new one takes the ring over where it
	// was; a reset needed by then would outlive that (no live ring to
	// hand over), and a Linux guest never resets for it. A replacement
	// (Resume) or the driver's reset meanwhile makes the late report
	// stale: QueueBroken does nothing then.
	switch {
	case d.external != nil && d.reconnect == 0:
		cfg.OnQueueError = func(q int) { d.dev.QueueBroken(q) }
	case d.external != nil:
		cfg.OnQueueError = func(q int) {
			time.AfterFunc(externalQueueErrorGrace, func() { d.dev.QueueBroken(q) })
		}
	default:
		cfg.OnQueueError = func(q int) {
			select {
			case d.queueErr <- q:
			default: // full: maxQueueErrors reports wait already
			}
		}
	}
	var err error
	if d.dev, err = mmio.New(cfg); err != nil {
		return err
	}
	// A plugin whose config space changes on its own (net: link down)
	// says so on the back-end request channel; the guest gets a
	// config-change interrupt.
	if n.ProtocolFeatures&vhostuser.ProtocolBackendReq != 0 {
		if d.stopBackendReq, err = client.BackendRequests(d.dev.ConfigChanged); err != nil {
			return fmt.Errorf("vhost-user back-end request channel: %w", err)
		}
	}
	return nil
}

// setupInflight gets the plugin's inflight region (GET_INFLIGHT_FD) for
// queues of up to qmax and gives it back (SET_INFLIGHT_FD).
func (d *pluginDevice) setupInflight(client *frontend.Client, n frontend.Negotiated, queues, qmax int) error {
	if n.ProtocolFeatures&vhostuser.ProtocolInflightSHMFD == 0 {
		return errors.New("INFLIGHT_SHMFD not offered")
	}
	in, err := client.GetInflightFD(uint16(queues), uint16(qmax))
	if err != nil {
		return err
	}
	if err := client.SetInflightFD(in); err != nil {
		in.Close()
		return err
	}
	d.inflight = in
	return nil
}

// backendGone is the transport's Recover: a back-end call found the plugin
// gone. It wakes monitor, which restarts the plugin (or fails the device
// when the budget is spent), and suspends the device meanwhile. It runs
// with the device's lock held and must not block.
func (d *pluginDevice) backendGone(err error) bool {
	if d.exiting.Load() {
		return true // the VM is going away: nothing to restart
	}
	select {
	case d.gone <- err:
	default:
	}
	return true
}

// startMonitor runs monitor on a goroutine of its own.
func (d *pluginDevice) startMonitor(ctx context.Context) {
	d.monitorDone = make(chan struct{})
	go d.monitor(ctx)
}

// monitor watches the plugin: when it exits, stops answering Health,
// reports a failed back-end, is found gone by the transport, or its helper
// (passt) exits, the plugin is restarted (restart) within its budget; a
// device that cannot be restarted fails (the guest sees a broken device,
// the VM runs on).
func (d *pluginDevice) monitor(ctx context.Context) {
	if d.external != nil {
		d.monitorExternal(ctx)
		return
	}
	defer close(d.monitorDone)
	health := time.NewTicker(healthInterval)
	defer health.Stop()
	for {
		var why error
		select {
		case <-ctx.Done():
			return
		case <-d.plugin.Done():
			why = d.plugin.Err()
			if why == nil {
				why = errors.New("plugin exited")
			}
		case err := <-d.gone:
			why = fmt.Errorf("plugin stopped serving vhost-user: %w", err)
		case <-d.opened.HelperExited():
			why = errors.New("passt exited")
		case q := <-d.queueErr:
			if why = d.queueError(ctx, q); why == nil {
				continue
			}
		case <-health.C:
			if why = d.checkHealth(ctx); why == nil {
				continue
			}
		}
		if ctx.Err() != nil || d.exiting.Load() {
			return
		}
		if d.restarts == nil || d.restarts.Total() == 0 {
			// The first passt refused its arguments or its set-up (a
			// bad passt-arg): each restart's would too, whichever way
			// its end is noticed first (its exit, or the plugin's lost
			// link).
			if err := d.opened.HelperStartFailure(); err != nil {
				d.log.Error("passt failed; the network device fails and is not restarted", "device", d.index, "error", err)
				d.dev.Fail(err)
				return
			}
		}
		if !d.recover(ctx, why) {
			return
		}
	}
}

// healthInterval is how often monitor asks a plugin's Health
// (pluginhost.HealthInterval); a variable for the tests.
var healthInterval = pluginhost.HealthInterval

// checkHealth asks the plugin for its state: nil while it serves.
func (d *pluginDevice) checkHealth(ctx context.Context) error {
	hctx, cancel := context.WithTimeout(ctx, pluginhost.HealthTimeout)
	defer cancel()
	st, msg, err := d.plugin.Health(hctx)
	switch {
	case ctx.Err() != nil:
		return nil
	case errors.Is(err, pluginhost.ErrExited):
		return nil // Done reports it
	case err != nil:
		return fmt.Errorf("plugin stopped answering (Health): %w", err)
	case st == pluginhost.HealthFailed || st == pluginhost.HealthStopped:
		if msg == "" {
			msg = "back-end stopped"
		}
		return fmt.Errorf("plugin stopped serving: %s", msg)
	}
	return nil
}

// externalQueueErrorGrace is how long an external back-end with
// reconnect= that signalled a ring's error eventfd has to go away (and be
// replaced) before its device is made to need a reset: krun-core serve
// notices its plugin's failure at its next health check
// (pluginhost.HealthInterval), or gives up on one that does not answer
// (pluginhost.HealthTimeout), and restarts it. A variable for the tests.
var externalQueueErrorGrace = pluginhost.HealthInterval + pluginhost.HealthTimeout

// maxQueueErrors bounds the reports of failed rings waiting for monitor
// (a device has at most 256 queues).
const maxQueueErrors = 256

// queueError handles the plugin's signal that it stopped serving ring q on
// its own. A plugin that reports itself failed (a panic in its device, a
// fault in guest memory) is replaced like any failed plugin: the error
// says why. One that serves on stopped a ring the guest broke (virtio
// 1.2's DEVICE_NEEDS_RESET case: an available index moved by more than the
// queue's size, a head past the table), which a new plugin would read and
// fail again: the device needs a reset, which the driver's next reset
// clears (nil). The plugin reports its failure before it signals
// (backend.Server.RingFailed), so its health answers truly.
func (d *pluginDevice) queueError(ctx context.Context, q int) error {
	if why := d.checkHealth(ctx); why != nil {
		return why
	}
	select {
	case <-ctx.Done():
		return nil
	case <-d.plugin.Done():
		return nil // its exit is reported next
	default:
	}
	d.dev.QueueBroken(q)
	return nil
}

// recover restarts the plugin after why, retrying within the budget. It
// returns false when the device failed instead (no budget, or none left).
func (d *pluginDevice) recover(ctx context.Context, why error) bool {
	if d.restarts == nil {
		d.dev.Fail(why)
		return false
	}
	if err := d.suspendForReplacement(); err != nil {
		// The old plugin could not be killed (Suspend failed the
		// device), or the device failed on its own meanwhile: no new
		// plugin would be let in.
		d.log.Error("plugin lost and the device failed; it is not restarted", "device", d.index, "reason", why, "error", err)
		return false
	}
	for {
		delay, err := d.restarts.Next(time.Now())
		if err != nil {
			d.log.Error("plugin lost and will not be restarted again; the device fails", "device", d.index, "reason", why, "limit", err)
			d.dev.Fail(fmt.Errorf("%w (%v)", why, err))
			return false
		}
		d.log.Warn("plugin lost; restarting it", "device", d.index, "reason", why,
			"restart", d.restarts.Total(), "delay", delay)
		// The old plugin goes now, not after the delay: one that only
		// stopped answering (a call or Health timed out) still maps guest
		// memory and could go on writing it while the device waits.
		d.dropPlugin()
		wait := d.backoff
		if wait == nil {
			wait = sleepCtx
		}
		if !wait(ctx, delay) {
			return false
		}
		start := time.Now()
		if why = d.restart(ctx); why == nil {
			d.log.Warn("plugin restarted; the device serves again", "device", d.index, "pid", d.plugin.Pid(),
				"took", time.Since(start).Round(time.Millisecond))
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		why = fmt.Errorf("restart failed: %w", why)
		if err := d.dev.Failed(); err != nil {
			// A Resume that failed and could not abandon the new
			// plugin failed the device: no later plugin would be let
			// in, and each would only be launched and killed (from
			// review, helper-148).
			d.log.Error("plugin restart failed and the device failed; it is not restarted again", "device", d.index, "reason", why, "error", err)
			return false
		}
	}
}

// suspendForReplacement suspends the device while its back-end is
// replaced (a plugin restarted, an external back-end reconnected); the
// device's error when it failed instead. A report of the same loss the
// transport made before the suspension is dropped (it would replace the
// next back-end for nothing; while suspended no report is made), and a
// network device's link goes down: the guest's stack learns that its
// connections are gone, and sees the link come back when the new
// back-end's config space is read.
func (d *pluginDevice) suspendForReplacement() error {
	d.dev.Suspend()
	if err := d.dev.Failed(); err != nil {
		return err
	}
	select {
	case <-d.gone:
	default:
	}
	if d.info.Type == netTypeID {
		d.dev.OverrideConfig(netConfigStatus, []byte{0, 0})
	}
	return nil
}

// sleepCtx waits for delay: false when ctx ended first.
func sleepCtx(ctx context.Context, delay time.Duration) bool {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// restart replaces the plugin: the old process (if it still runs) is
// killed, a network device's passt is started afresh, the same plugin is
// launched with the same sandbox, files and options, and the device's
// state is installed into it: memory table, inflight region, the driver's
// features, every live queue at its used index in guest memory (the
// plugin resubmits the requests that were in flight), config space.
func (d *pluginDevice) restart(ctx context.Context) error {
	d.dropPlugin()
	if n, ok := d.spec.(*devspec.NetSpec); ok {
		// passt's stream may have been cut in the middle of a frame, and
		// its connections belong to the guest stack that just lost its
		// link: a new passt, with the same MAC.
		mac, err := devspec.ParseMAC(d.opened.Options[devopts.OptMAC])
		if err != nil {
			return fmt.Errorf("MAC: %w", err)
		}
		d.opened.Close()
		spec := *n
		spec.MAC = mac
		opened, err := spec.Open(d.openOptions())
		if err != nil {
			return err
		}
		d.opened = opened
	}
	// d.info stays the device the guest knows until a plugin that
	// serves the same one is accepted: a refused or failed attempt
	// must not become the next one's yardstick.
	old := d.info
	info, err := d.startPlugin(ctx)
	if err != nil {
		d.dropPlugin()
		return err
	}
	if info.Type != old.Type || info.NumQueues != old.NumQueues || info.MaxQueueSize != old.MaxQueueSize {
		d.dropPlugin()
		return fmt.Errorf("the new plugin serves device type %d with %d queues of %d, the old one type %d with %d of %d",
			info.Type, info.NumQueues, info.MaxQueueSize, old.Type, old.NumQueues, old.MaxQueueSize)
	}
	d.info = info
	client, err := frontend.NewFromFile(d.sock)
	if err != nil {
		d.dropPlugin()
		return err
	}
	d.setClient(client)
	n, err := client.Reattach(frontend.SetupConfig{
		Features:         ^uint64(0),
		ProtocolFeatures: frontend.SupportedProtocolFeatures,
		Regions:          d.regions,
	}, d.attached, d.inflight)
	if err == nil && n.ProtocolFeatures&vhostuser.ProtocolBackendReq != 0 {
		d.stopBackendReq, err = client.BackendRequests(d.dev.ConfigChanged)
	}
	if err == nil {
		err = d.dev.Resume(client, d.usedIndex)
	}
	if err != nil {
		d.dropPlugin()
		return err
	}
	return nil
}

// killWait kills the plugin and waits for its process to be reaped, at
// most abandonWait: one in uninterruptible sleep outlives SIGKILL, and the
// VM's exit does not wait for it.
func (d *pluginDevice) killWait(log hclog.Logger) {
	if !killReaped(d.plugin) {
		d.c.pluginLeft()
		log.Error("plugin still runs after SIGKILL; leaving it", "device", d.index, "pid", d.plugin.Pid(), "waited", abandonWait)
	}
}

// dropPlugin ends the plugin process and its connection, if any.
func (d *pluginDevice) dropPlugin() {
	if d.stopBackendReq != nil {
		d.stopBackendReq()
		d.stopBackendReq = nil
	}
	d.liveMu.Lock()
	c := d.client
	d.client = nil
	d.liveMu.Unlock()
	if c != nil {
		c.Close()
	}
	if d.sock != nil {
		d.sock.Close()
		d.sock = nil
	}
	if d.plugin != nil {
		d.plugin.Kill()
	}
}

// shutdown stops the transport, asks the plugin to flush and exit (killing
// it if it does not) and releases what the device opened. Idempotent. The
// monitor must have been stopped (its context done).
func (d *pluginDevice) shutdown(log hclog.Logger) {
	d.closeOnce.Do(func() {
		if d.monitorDone != nil {
			<-d.monitorDone // a restart or reconnection under way finishes first
		}
		if d.stopBackendReq != nil {
			d.stopBackendReq()
		}
		if d.dev != nil {
			d.dev.Close()
		}
		if d.client != nil {
			d.client.Close()
		}
		if d.sock != nil {
			d.sock.Close()
		}
		if f := d.watch.Swap(nil); f != nil { // monitor never ran
			f.Close()
		}
		if d.plugin != nil {
			ctx, cancel := context.WithTimeout(context.Background(), pluginShutdownTimeout)
			if err := d.plugin.Shutdown(ctx); err != nil {
				log.Warn("plugin shutdown", "device", d.index, "error", err)
				d.killWait(log)
			}
			cancel()
		}
		if d.opened != nil {
			d.opened.Close()
		}
		d.inflight.Close()
	})
}

func (m *machine) shutdownDevices() {
	var wg sync.WaitGroup
	for _, d := range m.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.shutdown(m.log)
		}()
	}
	wg.Wait()
}
