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
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// Plugin time limits. Start-up gets more than pluginhost's default: on a
// loaded machine (or a nested guest) a plugin's handshake can take seconds.
const (
	pluginShutdownTimeout  = 10 * time.Second
	pluginHandshakeTimeout = 60 * time.Second
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
	// socket that monitor polls for a hang-up.
	external    *devspec.VhostUserSpec
	negotiated  *frontend.Negotiated
	backend     mmio.Backend
	featureMask uint64
	watch       atomic.Pointer[os.File]

	closeOnce sync.Once
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
	d := &pluginDevice{index: i, spec: s}
	defer func() {
		if err != nil {
			d.shutdown(c.log)
			err = fmt.Errorf("device %d (%s): %w", i, s, err)
		}
	}()
	// Helpers (passt) log into the core's log.
	helperLog := devspec.HelperLog(c.log.Named("helper"))
	if d.opened, err = s.Open(devspec.OpenOptions{HelperStderr: helperLog}); err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vhost-user socketpair: %w", err)
	}
	d.sock = os.NewFile(uintptr(fds[0]), "vhost-user")
	theirs := os.NewFile(uintptr(fds[1]), "vhost-user-plugin")
	defer theirs.Close()

	log := c.log.Named(d.opened.Kind)
	files := make([]pluginhost.NamedFile, len(d.opened.Files))
	for j, f := range d.opened.Files {
		files[j] = pluginhost.NamedFile{Name: f.Name, File: f.File}
	}
	cfg := pluginhost.Config{
		Kind: d.opened.Kind, PluginDir: c.pluginDir, Socket: theirs, Files: files,
		Logger: log, SandboxOff: c.sandboxOff, HandshakeTimeout: pluginHandshakeTimeout,
	}
	if !c.sandboxOff {
		cfg.Sandbox = sandbox.LaunchConfig{Kind: d.opened.Kind, Disable: c.sandboxDisable, Log: log,
			HostUID: c.pluginUID, HostGID: c.pluginGID}
	}
	if d.plugin, err = pluginhost.Launch(cfg); err != nil {
		return nil, err
	}
	if d.info, _, err = d.plugin.Configure(ctx, d.opened.Options); err != nil {
		return nil, err
	}
	d.opened.CloseFiles() // the plugin has its own copies now
	if err := d.plugin.Start(ctx); err != nil {
		return nil, err
	}
	return d, nil
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

func (m *machine) attach(d *pluginDevice, regions []frontend.MemRegion) error {
	info := d.info
	if info.NumQueues < 1 || info.NumQueues > 256 {
		return fmt.Errorf("plugin reports %d queues", info.NumQueues)
	}
	qmax := info.MaxQueueSize
	if qmax < 1 || qmax > 32768 || qmax&(qmax-1) != 0 {
		return fmt.Errorf("plugin reports maximum queue size %d", qmax)
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
		d.client = client
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
	var backend mmio.Backend = client
	configSpace := n.ProtocolFeatures&vhostuser.ProtocolConfig != 0
	configSize := 0
	if d.backend != nil {
		backend, configSpace = d.backend, true
		if eb, ok := d.backend.(*externalBackend); ok && eb.size > 0 {
			// An external back-end has no Configure data: the core reads
			// its config space once at attach and serves the guest from
			// that copy, so no vCPU waits on the back-end.
			configSize = int(eb.size)
		}
	}
	var err error
	d.dev, err = mmio.New(mmio.Config{
		DeviceID:           info.Type,
		Base:               MMIOBase + uint64(d.index)*MMIOStride,
		GSI:                FirstDeviceGSI + uint32(d.index),
		NumQueues:          info.NumQueues,
		QueueSizeMax:       uint16(min(qmax, 32768)),
		Features:           n.OfferedFeatures &^ d.featureMask,
		ProtocolNegotiated: n.Features&vhostuser.FeatureProtocolFeatures != 0,
		ConfigSpace:        configSpace,
		ConfigData:         info.Config,
		ConfigSize:         configSize,
		Backend:            backend,
		Wiring:             m.vm,
		Translate:          m.hostAddr,
		Log:                m.log.Named(fmt.Sprintf("virtio-mmio.%d", d.index)),
	})
	if err != nil {
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

// monitor fails the device when its plugin process dies; the guest sees a
// broken device, the VM runs on.
func (d *pluginDevice) monitor(ctx context.Context) {
	if d.external != nil {
		d.watchHangup(ctx)
		return
	}
	select {
	case <-ctx.Done():
	case <-d.plugin.Done():
		err := d.plugin.Err()
		if err == nil {
			err = errors.New("plugin exited")
		}
		if d.dev != nil {
			d.dev.Fail(err)
		}
	}
}

// shutdown stops the transport, asks the plugin to flush and exit (killing
// it if it does not) and releases what the device opened. Idempotent.
func (d *pluginDevice) shutdown(log hclog.Logger) {
	d.closeOnce.Do(func() {
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
				d.plugin.Kill()
			}
			cancel()
		}
		if d.opened != nil {
			d.opened.Close()
		}
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
