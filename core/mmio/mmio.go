// Package mmio is the core's virtio-mmio (version 2) transport for one
// plugin device. The core answers the guest's register reads and writes;
// features, config space and queue set-up go to the plugin over vhost-user.
//
// The data path bypasses the core: once a queue runs, the guest's
// QueueNotify write is matched by a KVM ioeventfd bound to the plugin's kick
// eventfd, and the plugin's call eventfd is a KVM irqfd that raises the
// device's interrupt. Because the core never sees those interrupts,
// InterruptStatus reports "used buffer" (bit 0) whenever a queue is live;
// the guest's handler then looks at its used rings, which is what it would
// do anyway. Config-change interrupts (bit 1) are raised by the core itself,
// when the plugin fails or reports a config change.
//
// A guest's config-space reads never reach the plugin: the core keeps a
// copy of the config space, filled from what the plugin reported at
// Configure and refreshed (off the vCPU threads) when the plugin reports a
// change. The calls a vCPU thread does make to the plugin (features, queue
// set-up and stop, config writes) are bounded by the Backend's deadline
// (frontend.Client's timeout, which also covers all the requests of one
// ring's set-up together), and the set-up and stop requests of one guest
// access by a budget for the access (Config.SetupBudget, StopBudget): a
// plugin that hangs, or answers each request just in time, fails or loses
// its device after that, the vCPU goes on.
//
// A device whose back-end can be replaced (a plugin the core restarts)
// has a Recover function: a back-end that is gone (it timed out,
// disconnected, died) then suspends the device instead of failing it.
// While suspended the device keeps every guest-visible state and records
// what the guest does (features, queues made ready or stopped, a reset)
// without calling any back-end; Resume installs that state into the new
// back-end: its features, then every live queue at the used index in guest
// memory (the back-end resubmits what its inflight region says was in
// flight), then it re-reads the config space and interrupts the guest, so
// that completions the dead back-end published without an interrupt are
// seen. The guest sees a pause, no reset.
package mmio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// Register offsets (virtio 1.2, 4.2.2).
const (
	RegMagic            = 0x000
	RegVersion          = 0x004
	RegDeviceID         = 0x008
	RegVendorID         = 0x00c
	RegDeviceFeatures   = 0x010
	RegDeviceFeatSel    = 0x014
	RegDriverFeatures   = 0x020
	RegDriverFeatSel    = 0x024
	RegQueueSel         = 0x030
	RegQueueNumMax      = 0x034
	RegQueueNum         = 0x038
	RegQueueReady       = 0x044
	RegQueueNotify      = 0x050
	RegInterruptStatus  = 0x060
	RegInterruptACK     = 0x064
	RegStatus           = 0x070
	RegQueueDescLow     = 0x080
	RegQueueDescHigh    = 0x084
	RegQueueDriverLow   = 0x090
	RegQueueDriverHigh  = 0x094
	RegQueueDeviceLow   = 0x0a0
	RegQueueDeviceHigh  = 0x0a4
	RegSHMSel           = 0x0ac
	RegSHMLenLow        = 0x0b0
	RegSHMLenHigh       = 0x0b4
	RegSHMBaseLow       = 0x0b8
	RegSHMBaseHigh      = 0x0bc
	RegConfigGeneration = 0x0fc
	RegConfig           = 0x100

	// Size is the MMIO window of one device.
	Size = 0x200
	// ConfigSpaceMax is how much config space the window leaves.
	ConfigSpaceMax = Size - RegConfig

	Magic   = 0x74726976 // "virt"
	Version = 2
	// VendorID is "KRUN" in little-endian byte order.
	VendorID = 0x4e55524b
)

// Device status bits.
const (
	StatusAcknowledge    = 1
	StatusDriver         = 2
	StatusDriverOK       = 4
	StatusFeaturesOK     = 8
	StatusDeviceNeedsRst = 64
	StatusFailed         = 128
)

// Interrupt status bits.
const (
	IntVring  = 1 << 0
	IntConfig = 1 << 1
)

// Feature bits the transport handles itself.
const (
	featureVersion1 = 1 << 32
	// transportRefused are feature bits the core never passes to the
	// guest: the vhost-user protocol-features bit and vhost's log-all bit
	// (neither is a virtio feature: libvhost-user back-ends offer
	// VHOST_F_LOG_ALL to every front-end, and a guest that acked it would
	// turn on dirty-page logging with no log region), an IOMMU, packed
	// rings (the plugins drive split rings), SR-IOV, notification data,
	// notification config data, ring reset and an admin virtqueue, none
	// of which this transport implements.
	transportRefused = vhostuser.FeatureProtocolFeatures | vhostuser.FeatureLogAll | vhostuser.FeatureAccessPlatform |
		vhostuser.FeatureRingPacked | 1<<37 | 1<<38 | 1<<39 | 1<<40 | 1<<41
)

// Backend is the vhost-user side of the device. *frontend.Client
// implements it.
type Backend interface {
	SetFeatures(f uint64) error
	GetConfig(offset, size uint32) ([]byte, error)
	SetConfig(offset, flags uint32, data []byte) error
	SetupQueue(q frontend.QueueSetup, protocolNegotiated bool) error
	GetVringBase(idx uint32) (uint32, error)
	SetVringEnable(idx uint32, enable bool) error
}

// Wiring connects eventfds to the guest: *kvm.VM implements it.
type Wiring interface {
	RegisterIOEventFD(addr uint64, width uint32, datamatch uint64, fd int) error
	UnregisterIOEventFD(addr uint64, width uint32, datamatch uint64, fd int) error
	RegisterIRQFD(fd int, gsi uint32) error
	UnregisterIRQFD(fd int, gsi uint32) error
	IRQLine(gsi uint32, high bool) error
}

// Translator maps a guest physical range to the front-end (core) virtual
// address that the memory table gave the plugin for it.
type Translator func(gpa, size uint64) (uint64, error)

// Config describes one device.
type Config struct {
	DeviceID     uint32 // virtio device type (2: block)
	Base         uint64 // guest physical address of the register window
	GSI          uint32
	NumQueues    int
	QueueSizeMax uint16 // power of two
	// Features are the back-end's offer (GET_FEATURES).
	Features uint64
	// ProtocolNegotiated: VHOST_USER_F_PROTOCOL_FEATURES was acked, so
	// SET_FEATURES must keep it and SET_VRING_ENABLE is used.
	ProtocolNegotiated bool
	// ConfigSpace: the CONFIG protocol feature was negotiated, so config
	// space reads are served from ConfigData and writes are forwarded
	// (otherwise it reads as zero).
	ConfigSpace bool
	// ConfigData is the device's config space as the plugin reported it
	// at Configure (at most ConfigSpaceMax bytes; bytes beyond it read as
	// zero). ConfigChanged refreshes it from the plugin. Without it, New
	// reads ConfigSize bytes from the back-end once; without either (a
	// back-end whose config size is unknown) every guest read is
	// forwarded, bounded by the Backend's deadline.
	ConfigData []byte
	ConfigSize int
	// Backend is the plugin. Its calls must be bounded in time: they are
	// made from vCPU threads (*frontend.Client is, by its timeout).
	Backend   Backend
	Wiring    Wiring
	Translate Translator
	Log       hclog.Logger
	// Recover, when set, is called (with the device's lock held; it must
	// not block or call the device) when a back-end call fails because
	// the back-end is gone (frontend.Gone). If it returns true the
	// device is suspended until Resume instead of failed.
	Recover func(err error) bool
	// OnReset, when set, runs at each device reset (status 0), after the
	// queues are stopped: the core zeroes the inflight region there.
	OnReset func()
	// ResetBackend: the back-end negotiated RESET_DEVICE and implements
	// DeviceResetter. At each device reset, after the queues are stopped,
	// it is asked to reset its device state, within what is left of the
	// access's stop budget; not while the device is suspended (its
	// successor starts afresh) or failed.
	ResetBackend bool
	// Abandon, when set, is called (with the device's lock held) when a
	// back-end did not confirm that a ring it served stopped (the stop
	// timed out, the back-end refused it or is gone), and when the
	// device is suspended (Suspend, or a back-end found gone): it must
	// end the back-end's access to guest memory (kill its process and
	// wait for it) before it returns, since the driver reuses a ring's
	// memory as soon as its queue stop or reset returns, and a suspended
	// device stops queues without asking the back-end. why says what
	// happened. A non-nil error says the access could not be ended (the
	// process did not go away in time): the device fails. It is not
	// called once Close has begun: the guest no longer runs.
	Abandon func(why error) error
	// StopBudget, when positive, bounds how long one guest access (a
	// queue stop, a reset) spends asking the back-end to stop rings: each
	// request gets at most what is left of it (a Backend that implements
	// BoundedStopper; others are only not asked once it is spent), and
	// once it is spent the back-end is abandoned instead of asked, so
	// the access holds the vCPU for about StopBudget plus Abandon's wait,
	// however many queues it stops. Close spends at most StopBudget too.
	StopBudget time.Duration
	// SetupBudget, when positive, bounds how long one guest access (the
	// DRIVER_OK write, a QUEUE_READY write) spends setting up rings in
	// the back-end, however many it starts: each ring's set-up gets at
	// most what is left of it (a Backend that implements BoundedSetup;
	// each ring's set-up is bounded by the Backend's own deadline
	// anyway), and once it is spent the back-end is taken for gone
	// (Recover) or the device fails. Resume's set-up has a budget of its
	// own of the same length.
	SetupBudget time.Duration
	// OnQueueLost, when set, is called (with the device's lock held) when
	// a live queue is stopped without its back-end's GET_VRING_BASE (the
	// device is suspended, or the back-end was abandoned): what the lost
	// back-end tracked for the ring no longer applies, as a clean stop
	// would have told it. The core forgets the queue's part of the
	// inflight region there.
	OnQueueLost func(queue int)
	// OnFail, when set, is called once, on a goroutine of its own, when
	// the device fails (Fail, or a back-end it gave up on), with why: a
	// device the guest cannot do without (the root file system of `run
	// -- CMD`) ends the VM there instead of leaving it to hang. The device
	// then logs its failure at debug level only: OnFail's owner reports it.
	OnFail func(err error)
	// OnQueueError, when set, gives each ring an error eventfd (SET_VRING_
	// ERR) and is called, on a goroutine of the device's, without its
	// lock, when the back-end signals one while its ring is live: the
	// back-end stopped serving that ring on its own. Its owner decides
	// why: a back-end that failed is replaced or fails the device; one
	// that stays healthy stopped a ring the driver broke, and QueueBroken
	// makes the device need a reset.
	OnQueueError func(queue int)
}

// Errors.
var (
	ErrConfig = errors.New("invalid virtio-mmio device configuration")
	ErrFailed = errors.New("device failed")

	// ErrReplaced is the reason Suspend gives Config.Abandon.
	ErrReplaced = errors.New("the back-end is being replaced")

	errAbandoned = errors.New("back-end abandoned")
)

type queue struct {
	num               uint16
	ready             bool
	desc, avail, used uint64
	kick, call        *os.File
	// errFD is the ring's error eventfd (SET_VRING_ERR), nil without
	// Config.OnQueueError.
	errFD *os.File
	live  bool // set up in the back-end, fds wired
	// errSeen: the back-end signalled errFD while the ring was live, and
	// this ring has not been stopped since (QueueBroken acts on it).
	errSeen bool
}

// Device is one virtio-mmio transport. Its methods are safe for concurrent
// use by several vCPU threads.
type Device struct {
	cfg       Config
	log       hclog.Logger
	guestWarn ratelog.Limiter // warnGuest

	mu         sync.Mutex
	status     uint32
	devFeatSel uint32
	drvFeatSel uint32
	drvFeat    uint64
	queueSel   uint32
	intStatus  uint32 // config-change bit; the vring bit is derived
	configGen  uint32
	shmSel     uint32
	queues     []queue
	failed     error
	// guestErr: the driver set a queue up badly; DEVICE_NEEDS_RESET until
	// its next reset, which clears it (the back-end is fine).
	guestErr error
	config   []byte // the config space copy
	cached   bool   // config holds the config space (else reads are forwarded)
	// configWrites counts the guest's config writes into the copy: a
	// refresh whose read they overlapped reads again (ConfigChanged).
	configWrites uint64
	// suspended: the back-end is gone and a new one is coming (Resume);
	// no back-end is called meanwhile.
	suspended bool
	// closing: Close has begun; the guest no longer runs, so a back-end
	// that does not confirm a stop is not abandoned (its owner shuts it
	// down, letting it flush).
	closing bool
	// stopBy: when the current guest access's stop budget ends (zero:
	// no ring stopped yet in this access).
	stopBy time.Time
	// setupBy: when the current guest access's set-up budget ends (zero:
	// not started).
	setupBy time.Time
	// abandoning: Config.Abandon is running (a failure it causes does
	// not call it again).
	abandoning bool
	// watchers: the goroutines that wait on the error eventfds.
	watchers sync.WaitGroup
}

// New creates the device and its kick and call eventfds.
func New(cfg Config) (*Device, error) {
	if cfg.NumQueues < 1 || cfg.NumQueues > 256 {
		return nil, fmt.Errorf("%w: %d queues", ErrConfig, cfg.NumQueues)
	}
	if q := cfg.QueueSizeMax; q == 0 || q&(q-1) != 0 || q > 32768 {
		return nil, fmt.Errorf("%w: queue size %d", ErrConfig, q)
	}
	if cfg.Base&0xfff != 0 {
		return nil, fmt.Errorf("%w: base %#x not page aligned", ErrConfig, cfg.Base)
	}
	if cfg.Backend == nil || cfg.Wiring == nil || cfg.Translate == nil {
		return nil, fmt.Errorf("%w: backend, wiring and translator are required", ErrConfig)
	}
	if len(cfg.ConfigData) > ConfigSpaceMax || cfg.ConfigSize < 0 || cfg.ConfigSize > ConfigSpaceMax {
		return nil, fmt.Errorf("%w: config space of %d/%d bytes, at most %d", ErrConfig, len(cfg.ConfigData), cfg.ConfigSize, ConfigSpaceMax)
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	d := &Device{cfg: cfg, log: cfg.Log, queues: make([]queue, cfg.NumQueues)}
	switch {
	case cfg.ConfigData != nil:
		d.config, d.cached = append([]byte(nil), cfg.ConfigData...), true
	case cfg.ConfigSpace && cfg.ConfigSize > 0:
		b, err := cfg.Backend.GetConfig(0, uint32(cfg.ConfigSize))
		if err != nil {
			return nil, fmt.Errorf("read the config space: %w", err)
		}
		if len(b) != cfg.ConfigSize {
			return nil, fmt.Errorf("read the config space: %d bytes, asked %d", len(b), cfg.ConfigSize)
		}
		d.config, d.cached = b, true
	}
	for i := range d.queues {
		var err error
		if d.queues[i].kick, err = newEventFD(fmt.Sprintf("kick%d", i)); err == nil {
			d.queues[i].call, err = newEventFD(fmt.Sprintf("call%d", i))
		}
		if err == nil && cfg.OnQueueError != nil {
			d.queues[i].errFD, err = newEventFD(fmt.Sprintf("err%d", i))
		}
		if err != nil {
			d.Close()
			return nil, err
		}
	}
	if cfg.OnQueueError != nil {
		for i := range d.queues {
			d.watchers.Add(1)
			go d.watchErrors(i, d.queues[i].errFD)
		}
	}
	return d, nil
}

// watchErrors waits for the back-end to signal ring i's error eventfd,
// until Close closes it, and reports a signal that came while the ring was
// live (Config.OnQueueError). The eventfd is read under the device's lock,
// and stopQueueLocked drains it once the back-end has confirmed the stop
// (a back-end signals before that): a signal about a ring the driver
// stopped since is never taken for one about the ring it started next.
func (d *Device) watchErrors(i int, f *os.File) {
	defer d.watchers.Done()
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	for {
		report, stop := false, false
		// A non-blocking eventfd: Read waits in Go's poller while the
		// function returns false.
		err := rc.Read(func(fd uintptr) bool {
			d.mu.Lock()
			defer d.mu.Unlock()
			if d.closing {
				stop = true
				return true
			}
			// Never a blocking read: the plugin shares the eventfd's
			// open file description, and may have cleared O_NONBLOCK
			// and read its own signal back (readEventFD).
			if _, err := readEventFD(int(fd)); err != nil {
				if err == unix.EAGAIN || err == unix.EINTR {
					return false // drained meanwhile: wait for the next
				}
				stop = true // unreadable: nothing more comes
				return true
			}
			q := &d.queues[i]
			if q.live && d.failed == nil && !d.suspended && d.guestErr == nil {
				q.errSeen, report = true, true
			}
			return true
		})
		if err != nil || stop {
			return // closed (Close), or unreadable
		}
		if report {
			d.cfg.OnQueueError(i)
		}
	}
}

func newEventFD(name string) (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// Close stops live queues and closes the eventfds.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closing = true
	d.stopBy = time.Time{}
	d.stopAllLocked()
	var errFDs []*os.File
	for i := range d.queues {
		q := &d.queues[i]
		for _, f := range []*os.File{q.kick, q.call} {
			if f != nil {
				f.Close()
			}
		}
		if q.errFD != nil {
			errFDs = append(errFDs, q.errFD)
		}
		q.kick, q.call, q.errFD = nil, nil, nil
	}
	d.mu.Unlock()
	// Closed without the lock: a watcher reads under it, and a close
	// waits for a read under way to return.
	for _, f := range errFDs {
		f.Close()
	}
	d.watchers.Wait() // their reads end with the close
	return nil
}

// Base is the guest address of the register window.
func (d *Device) Base() uint64 { return d.cfg.Base }

// GSI is the device's interrupt.
func (d *Device) GSI() uint32 { return d.cfg.GSI }

// offered is what the guest sees in DeviceFeatures.
func (d *Device) offered() uint64 {
	return d.cfg.Features&^transportRefused | featureVersion1
}

// Read handles a guest read of len(data) bytes at offset into the window.
func (d *Device) Read(offset uint64, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range data {
		data[i] = 0
	}
	if offset >= RegConfig {
		d.readConfigLocked(offset-RegConfig, data)
		return
	}
	if len(data) != 4 || offset&3 != 0 {
		d.log.Debug("ignored misaligned register read", "offset", offset, "len", len(data))
		return
	}
	binary.LittleEndian.PutUint32(data, d.readRegLocked(offset))
}

func (d *Device) readRegLocked(offset uint64) uint32 {
	switch offset {
	case RegMagic:
		return Magic
	case RegVersion:
		return Version
	case RegDeviceID:
		return d.cfg.DeviceID
	case RegVendorID:
		return VendorID
	case RegDeviceFeatures:
		if d.devFeatSel > 1 {
			return 0
		}
		return uint32(d.offered() >> (32 * d.devFeatSel))
	case RegQueueNumMax:
		if d.selected() != nil {
			return uint32(d.cfg.QueueSizeMax)
		}
	case RegQueueNum:
		if q := d.selected(); q != nil {
			return uint32(q.num)
		}
	case RegQueueReady:
		if q := d.selected(); q != nil && q.ready {
			return 1
		}
	case RegQueueDescLow, RegQueueDescHigh, RegQueueDriverLow, RegQueueDriverHigh, RegQueueDeviceLow, RegQueueDeviceHigh:
		if q := d.selected(); q != nil {
			v := q.used
			switch offset &^ 4 {
			case RegQueueDescLow:
				v = q.desc
			case RegQueueDriverLow:
				v = q.avail
			}
			if offset&4 != 0 {
				return uint32(v >> 32)
			}
			return uint32(v)
		}
	case RegInterruptStatus:
		s := d.intStatus
		if d.anyLiveLocked() {
			s |= IntVring
		}
		return s
	case RegStatus:
		return d.status
	case RegSHMLenLow, RegSHMLenHigh:
		return 0xffffffff // no shared memory regions
	case RegSHMBaseLow, RegSHMBaseHigh:
		return 0xffffffff
	case RegConfigGeneration:
		return d.configGen
	}
	return 0
}

func (d *Device) selected() *queue {
	if d.queueSel >= uint32(len(d.queues)) {
		return nil
	}
	return &d.queues[d.queueSel]
}

func (d *Device) anyLiveLocked() bool {
	for i := range d.queues {
		if d.queues[i].live {
			return true
		}
	}
	return false
}

// Write handles a guest write of data at offset into the window.
func (d *Device) Write(offset uint64, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stopBy = time.Time{}  // each access has its own stop budget
	d.setupBy = time.Time{} // and set-up budget
	if offset >= RegConfig {
		d.writeConfigLocked(offset-RegConfig, data)
		return
	}
	if len(data) != 4 || offset&3 != 0 {
		d.log.Debug("ignored misaligned register write", "offset", offset, "len", len(data))
		return
	}
	v := binary.LittleEndian.Uint32(data)
	switch offset {
	case RegDeviceFeatSel:
		d.devFeatSel = v
	case RegDriverFeatSel:
		d.drvFeatSel = v
	case RegDriverFeatures:
		if d.status&StatusFeaturesOK != 0 || d.drvFeatSel > 1 {
			return // features are frozen once FEATURES_OK is set
		}
		shift := 32 * d.drvFeatSel
		d.drvFeat = d.drvFeat&^(0xffffffff<<shift) | uint64(v)<<shift
	case RegQueueSel:
		d.queueSel = v
	case RegQueueNum:
		if q := d.selected(); q != nil && !q.ready {
			q.num = 0 // too large: refused when the queue is made ready
			if v <= 0xffff {
				q.num = uint16(v)
			}
		}
	case RegQueueDescLow, RegQueueDescHigh, RegQueueDriverLow, RegQueueDriverHigh, RegQueueDeviceLow, RegQueueDeviceHigh:
		q := d.selected()
		if q == nil || q.ready {
			return
		}
		var p *uint64
		switch offset &^ 4 {
		case RegQueueDescLow:
			p = &q.desc
		case RegQueueDriverLow:
			p = &q.avail
		default:
			p = &q.used
		}
		if offset&4 != 0 {
			*p = *p&0xffffffff | uint64(v)<<32
		} else {
			*p = *p&^0xffffffff | uint64(v)
		}
	case RegQueueReady:
		q := d.selected()
		if q == nil {
			return
		}
		switch {
		case v == 1 && !q.ready:
			q.ready = true
			if d.status&StatusDriverOK != 0 {
				d.startQueueLocked(int(d.queueSel))
			}
		case v == 0 && q.ready:
			d.stopQueueLocked(int(d.queueSel))
			q.ready = false
		}
	case RegQueueNotify:
		d.notifyLocked(v)
	case RegInterruptACK:
		d.intStatus &^= v
	case RegStatus:
		d.writeStatusLocked(v)
	case RegSHMSel:
		d.shmSel = v
	}
}

// notifyLocked handles a QueueNotify that reached the core (no ioeventfd
// yet, or an index the ioeventfds do not match): it kicks by hand.
func (d *Device) notifyLocked(v uint32) {
	idx := v & 0xffff
	if idx >= uint32(len(d.queues)) {
		return
	}
	q := &d.queues[idx]
	if !q.ready || q.kick == nil {
		return
	}
	if err := signalEventFD(q.kick); err != nil {
		d.warnGuest("kick by hand failed", "queue", idx, "error", err)
	}
}

// warnGuest logs a warning the guest can cause at will (a refused
// feature, a driver giving up, over and over): spaced out by one limiter
// per device (ratelog), so a guest cannot flood the host's log.
func (d *Device) warnGuest(msg string, args ...any) {
	d.guestWarn.Warn(d.log, msg, args...)
}

func (d *Device) writeStatusLocked(v uint32) {
	if v == 0 {
		d.resetLocked()
		return
	}
	v &= 0xff
	added := v &^ d.status
	if d.status&^v != 0 {
		// Clearing bits other than by a reset is not allowed.
		d.log.Debug("ignored status write that clears bits", "old", d.status, "new", v)
		return
	}
	if added&StatusFeaturesOK != 0 {
		if err := d.acceptFeaturesLocked(); err != nil {
			d.warnGuest("refused driver features", "features", fmt.Sprintf("%#x", d.drvFeat), "error", err)
			v &^= StatusFeaturesOK
		}
	}
	if added&StatusDriverOK != 0 && v&StatusFeaturesOK == 0 {
		v &^= StatusDriverOK // DRIVER_OK without FEATURES_OK
	}
	d.status = v | d.status&StatusDeviceNeedsRst
	if added&StatusDriverOK != 0 && d.status&StatusDriverOK != 0 {
		for i := range d.queues {
			if d.queues[i].ready {
				d.startQueueLocked(i)
			}
		}
	}
	if added&StatusFailed != 0 {
		d.warnGuest("guest driver gave up on the device")
	}
}

func (d *Device) acceptFeaturesLocked() error {
	if d.failed != nil {
		return d.failed
	}
	if extra := d.drvFeat &^ d.offered(); extra != 0 {
		return fmt.Errorf("features %#x not offered", extra)
	}
	if d.drvFeat&featureVersion1 == 0 {
		return errors.New("legacy driver (VIRTIO_F_VERSION_1 not acked)")
	}
	if d.suspended {
		return nil // Resume sends them
	}
	if err := d.cfg.Backend.SetFeatures(d.backendFeatures()); err != nil {
		if d.recoverLocked(err) {
			return nil
		}
		d.failLocked(fmt.Errorf("SET_FEATURES: %w", err))
		return err
	}
	return nil
}

// backendFeatures is what SET_FEATURES sends: the driver's features, and
// the vhost-user protocol-features bit when it was negotiated.
func (d *Device) backendFeatures() uint64 {
	f := d.drvFeat
	if d.cfg.ProtocolNegotiated {
		f |= vhostuser.FeatureProtocolFeatures
	}
	return f
}

// recoverLocked suspends the device when err says the back-end is gone and
// a new one can take over (Config.Recover); it reports whether it did.
func (d *Device) recoverLocked(err error) bool {
	if d.suspended {
		return true
	}
	abandoned := errors.Is(err, errAbandoned)
	gone := frontend.Gone(err) || abandoned
	if d.cfg.Recover == nil || !gone || !d.cfg.Recover(err) {
		return false
	}
	if !abandoned && !d.abandonLocked(err) {
		return true // failed instead
	}
	d.suspended = true
	d.log.Debug("virtio device back-end is gone; the device waits for a new one", "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
	return true
}

// abandonLocked ends the back-end's access to guest memory before the
// device stops a queue without it (Config.Abandon). It reports false when
// that could not be confirmed: the device has failed then. It does
// nothing while Abandon runs already (the failure it causes stops the
// queues).
func (d *Device) abandonLocked(why error) bool {
	if d.cfg.Abandon == nil || d.closing || d.abandoning {
		return true
	}
	d.abandoning = true
	defer func() { d.abandoning = false }()
	if err := d.cfg.Abandon(why); err != nil {
		err = fmt.Errorf("%w; abandoning the back-end: %w", why, err)
		if d.failed != nil {
			d.log.Error("failed device's back-end could not be abandoned", "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
		}
		d.failLocked(err)
		return false
	}
	return true
}

// ringLayout checks a queue's size and ring addresses (virtio 1.2, 2.7:
// alignment 16/2/4) and returns the three ranges' sizes.
func ringLayout(q *queue, max uint16) (desc, avail, used uint64, err error) {
	n := uint64(q.num)
	if n == 0 || n > uint64(max) || n&(n-1) != 0 {
		return 0, 0, 0, fmt.Errorf("queue size %d (max %d, power of two)", q.num, max)
	}
	if q.desc&15 != 0 || q.avail&1 != 0 || q.used&3 != 0 {
		return 0, 0, 0, fmt.Errorf("misaligned ring addresses desc %#x avail %#x used %#x", q.desc, q.avail, q.used)
	}
	return 16 * n, 6 + 2*n, 6 + 8*n, nil
}

// queueSetup checks queue i's layout and translates its rings to the
// back-end's addresses.
func (d *Device) queueSetup(i int) (frontend.QueueSetup, error) {
	q := &d.queues[i]
	dsz, asz, usz, err := ringLayout(q, d.cfg.QueueSizeMax)
	if err != nil {
		return frontend.QueueSetup{}, fmt.Errorf("queue %d: %w", i, err)
	}
	var ua [3]uint64
	for j, r := range []struct{ gpa, size uint64 }{{q.desc, dsz}, {q.avail, asz}, {q.used, usz}} {
		if ua[j], err = d.cfg.Translate(r.gpa, r.size); err != nil {
			return frontend.QueueSetup{}, fmt.Errorf("queue %d: ring at %#x: %w", i, r.gpa, err)
		}
	}
	return frontend.QueueSetup{
		Index: uint32(i), Size: q.num, Desc: ua[0], Avail: ua[1], Used: ua[2],
		Kick: q.kick, Call: q.call, Err: q.errFD,
	}, nil
}

func (d *Device) startQueueLocked(i int) {
	q := &d.queues[i]
	if q.live || d.failed != nil || d.guestErr != nil {
		return
	}
	qs, err := d.queueSetup(i)
	if err != nil {
		d.guestErrorLocked(err)
		return
	}
	notify := d.cfg.Base + RegQueueNotify
	if err := d.cfg.Wiring.RegisterIRQFD(int(q.call.Fd()), d.cfg.GSI); err != nil {
		d.failLocked(fmt.Errorf("queue %d: %w", i, err))
		return
	}
	if err := d.cfg.Wiring.RegisterIOEventFD(notify, 4, uint64(i), int(q.kick.Fd())); err != nil {
		d.cfg.Wiring.UnregisterIRQFD(int(q.call.Fd()), d.cfg.GSI)
		d.failLocked(fmt.Errorf("queue %d: %w", i, err))
		return
	}
	q.live = true
	if d.suspended {
		return // Resume sets it up in the new back-end
	}
	limit, err := d.setupLimitLocked()
	if err == nil {
		err = d.setupRing(d.cfg.Backend, qs, limit)
	}
	if err != nil {
		if d.recoverLocked(err) {
			return
		}
		d.failLocked(fmt.Errorf("queue %d set-up: %w", i, err))
		return
	}
	d.log.Debug("queue live", "queue", i, "size", q.num)
}

// stopQueueLocked takes a live queue down: ring stopped in the back-end,
// eventfds unwired.
func (d *Device) stopQueueLocked(i int) {
	q := &d.queues[i]
	if !q.live {
		return
	}
	q.live, q.errSeen = false, false
	// A signal about this ring is in the eventfd by the time the
	// back-end confirms the stop: gone with it (watchErrors).
	defer drain(q.errFD)
	d.cfg.Wiring.UnregisterIOEventFD(d.cfg.Base+RegQueueNotify, 4, uint64(i), int(q.kick.Fd()))
	d.cfg.Wiring.UnregisterIRQFD(int(q.call.Fd()), d.cfg.GSI)
	if d.failed != nil {
		return
	}
	if d.suspended {
		d.queueLostLocked(i)
		return
	}
	if d.cfg.ProtocolNegotiated {
		limit, err := d.stopLimitLocked()
		if err == nil {
			err = d.disableRing(uint32(i), limit)
		}
		if err != nil {
			d.stopFailedLocked(i, fmt.Errorf("disable queue %d: %w", i, err))
			return
		}
	}
	limit, err := d.stopLimitLocked()
	if err == nil {
		_, err = d.getVringBase(uint32(i), limit)
	}
	if err != nil {
		d.stopFailedLocked(i, fmt.Errorf("stop queue %d: %w", i, err))
	}
}

// DeviceResetter is implemented by a Backend that can reset its device
// state (VHOST_USER_RESET_DEVICE) within a time limit (*frontend.Client).
type DeviceResetter interface {
	ResetDeviceWithin(limit time.Duration) error
}

var _ DeviceResetter = (*frontend.Client)(nil)

// resetBackendLocked asks the back-end to reset its device state
// (Config.ResetBackend), after the queues stopped. The rings are stopped
// already, so a back-end that does not answer holds no guest memory it
// could still write: a gone one is replaced (Recover), others are logged.
func (d *Device) resetBackendLocked() {
	r, ok := d.cfg.Backend.(DeviceResetter)
	if !d.cfg.ResetBackend || !ok || d.suspended || d.failed != nil || d.closing {
		return
	}
	limit, err := d.stopLimitLocked()
	if err == nil {
		err = r.ResetDeviceWithin(limit)
	}
	if err == nil || d.recoverLocked(err) {
		return
	}
	// The guest resets at will: spaced out, as its other warnings.
	d.warnGuest("device reset: the back-end did not reset its device state", "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
}

// BoundedSetup is implemented by a Backend whose ring set-up can be given
// a shorter time limit than its own (*frontend.Client): the device passes
// what is left of the access's set-up budget.
type BoundedSetup interface {
	SetupQueueWithin(q frontend.QueueSetup, protocolNegotiated bool, limit time.Duration) error
}

var _ BoundedSetup = (*frontend.Client)(nil)

func (d *Device) setupRing(b Backend, qs frontend.QueueSetup, limit time.Duration) error {
	if bs, ok := b.(BoundedSetup); ok {
		return bs.SetupQueueWithin(qs, d.cfg.ProtocolNegotiated, limit)
	}
	return b.SetupQueue(qs, d.cfg.ProtocolNegotiated)
}

// setupLimitLocked returns how long the next ring set-up may take within
// the set-up budget of the current guest access (Config.SetupBudget; 0:
// no limit of the device's), or an error that says the back-end is gone
// once it is spent: one that takes that long to start rings is not
// serving them.
func (d *Device) setupLimitLocked() (time.Duration, error) {
	if d.cfg.SetupBudget <= 0 {
		return 0, nil
	}
	return budgetLeft(d.cfg.SetupBudget, &d.setupBy, "setting up rings")
}

// budgetLeft is what is left of budget b of the current guest access for
// doing what, whose end is *by (set now if zero), or an error that says
// the back-end is gone once it is spent.
func budgetLeft(b time.Duration, by *time.Time, what string) (time.Duration, error) {
	now := time.Now()
	if by.IsZero() {
		*by = now.Add(b)
	}
	left := by.Sub(now)
	if left <= 0 {
		return 0, fmt.Errorf("%w (the %v this guest access may spend %s is spent)", frontend.ErrTimeout, b, what)
	}
	return left, nil
}

// BoundedStopper is implemented by a Backend whose ring-stop requests can
// be given a shorter time limit than its own (*frontend.Client): the
// device passes what is left of the access's stop budget.
type BoundedStopper interface {
	DisableVringWithin(idx uint32, limit time.Duration) error
	GetVringBaseWithin(idx uint32, limit time.Duration) (uint32, error)
}

var _ BoundedStopper = (*frontend.Client)(nil)

func (d *Device) disableRing(idx uint32, limit time.Duration) error {
	if b, ok := d.cfg.Backend.(BoundedStopper); ok {
		return b.DisableVringWithin(idx, limit)
	}
	return d.cfg.Backend.SetVringEnable(idx, false)
}

func (d *Device) getVringBase(idx uint32, limit time.Duration) (uint32, error) {
	if b, ok := d.cfg.Backend.(BoundedStopper); ok {
		return b.GetVringBaseWithin(idx, limit)
	}
	return d.cfg.Backend.GetVringBase(idx)
}

// stopLimitLocked returns how long the next ring-stop request may take
// within the stop budget of the current guest access (Config.StopBudget;
// 0: no limit of the device's), or an error once it is spent.
func (d *Device) stopLimitLocked() (time.Duration, error) {
	if d.cfg.StopBudget <= 0 {
		return 0, nil
	}
	// Close has one budget too: a back-end answering each stop just in
	// time held the VM's exit for two stop timeouts a ring (found in
	// review). Past it the rings left are not asked (stopFailedLocked
	// only logs at close).
	return budgetLeft(d.cfg.StopBudget, &d.stopBy, "stopping rings")
}

// stopFailedLocked handles a back-end that did not confirm that queue i's
// ring stopped: it may still be serving the ring, whose memory the driver
// reuses once this returns, so it is abandoned first (Config.Abandon);
// then the device waits for a new back-end (the queue's inflight part
// forgotten) or fails.
func (d *Device) stopFailedLocked(i int, err error) {
	if d.closing {
		d.log.Debug("queue stop at close", "queue", i, "error", err)
		return
	}
	if d.cfg.Abandon != nil {
		if !d.abandonLocked(err) {
			return
		}
		err = fmt.Errorf("%w: %w", errAbandoned, err) // gone, whatever it answered
	}
	if d.recoverLocked(err) {
		d.queueLostLocked(i)
		return
	}
	d.failLocked(err)
}

func (d *Device) queueLostLocked(i int) {
	if d.cfg.OnQueueLost != nil {
		d.cfg.OnQueueLost(i)
	}
}

func (d *Device) stopAllLocked() {
	for i := range d.queues {
		d.stopQueueLocked(i)
	}
}

func (d *Device) resetLocked() {
	d.stopAllLocked()
	for i := range d.queues {
		q := &d.queues[i]
		q.ready, q.num, q.desc, q.avail, q.used = false, 0, 0, 0, 0
		drain(q.kick)
		drain(q.call)
		drain(q.errFD)
	}
	d.status = 0
	d.drvFeat, d.devFeatSel, d.drvFeatSel, d.queueSel, d.shmSel = 0, 0, 0, 0, 0
	d.intStatus = 0
	d.guestErr = nil
	d.resetBackendLocked()
	if d.cfg.OnReset != nil {
		d.cfg.OnReset()
	}
	if d.failed != nil {
		d.status = StatusDeviceNeedsRst // a dead plugin stays dead
	}
}

func drain(f *os.File) {
	if f == nil {
		return
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) { readEventFD(int(fd)) }) // EAGAIN when empty
}

// The kick, call and error eventfds are handed to the plugin with
// SCM_RIGHTS, so the plugin shares their open file descriptions: it can
// clear O_NONBLOCK on them (its seccomp profile allows F_SETFL without
// O_DIRECT and O_ASYNC), read their counters, or write them up to their
// maximum. The core reads and writes them on vCPU threads with the
// device's lock held, so it must never rely on their O_NONBLOCK flag, nor
// wait in Go's poller for a counter the plugin keeps full (found in
// review: a plugin that did either hung the vCPU, the device's lock and
// the VM's exit for good).

// readEventFD reads an eventfd's counter without ever blocking, whatever
// its file status flags say: preadv2 with RWF_NOWAIT (recent kernels
// honour it for an eventfd; Linux 6.18 does), and on a kernel that refuses that, a
// read only when poll finds the counter set, with O_NONBLOCK set again
// first (a plugin that clears it again and reads its counter in that
// moment can still make that read wait there).
func readEventFD(fd int) (uint64, error) {
	var b [8]byte
	n, err := unix.Preadv2(fd, [][]byte{b[:]}, -1, unix.RWF_NOWAIT)
	if err == unix.EOPNOTSUPP || err == unix.EINVAL || err == unix.ENOSYS {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if k, perr := unix.Poll(p, 0); perr != nil || k == 0 || p[0].Revents&unix.POLLIN == 0 {
			return 0, unix.EAGAIN
		}
		unix.SetNonblock(fd, true)
		n, err = unix.Read(fd, b[:])
	}
	if err != nil {
		return 0, err
	}
	if n != len(b) {
		return 0, unix.EIO
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// signalEventFD adds 1 to an eventfd's counter unless it is set already
// (a signal is pending: another adds nothing the reader would see), and
// never waits for room in it: a raw write (not os.File.Write, which waits
// in Go's poller while a plugin keeps the counter full), after poll found
// room and with O_NONBLOCK set again. A plugin that, between those and
// the write, both clears O_NONBLOCK and fills the counter can still make
// the write wait in the kernel until the counter is read (the write has
// no per-call non-blocking flag for an eventfd): the write is made on a
// duplicate of the fd by a goroutine of its own, and the caller (a vCPU,
// holding the device's lock) waits for it signalWait at most. A write
// held there ends when the counter is read (a reset drains it); it holds
// only its duplicate, so closing f does not wait for it.
func signalEventFD(f *os.File) error { return signalWith(f, writeOne, signalWait) }

// signalWait is how long signalEventFD waits for its write: microseconds
// unless the other holder of the eventfd holds it.
const signalWait = 100 * time.Millisecond

// errSignalHeld: signalEventFD's write did not return within signalWait.
var errSignalHeld = errors.New("the eventfd's counter is kept full and its O_NONBLOCK cleared by its other holder: the signal is left to a write of its own")

func signalWith(f *os.File, write func(fd int) error, wait time.Duration) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	dup := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
		if k, perr := unix.Poll(p, 0); perr != nil || k == 0 || p[0].Revents&unix.POLLIN != 0 || p[0].Revents&unix.POLLOUT == 0 {
			return // set already, or no room: nothing to add
		}
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return err
	}
	if derr != nil || dup < 0 {
		return derr
	}
	done := make(chan error, 1)
	go func() {
		defer unix.Close(dup)
		unix.SetNonblock(dup, true) // the open file description's flag, shared
		done <- write(dup)
	}()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return errSignalHeld
	}
}

// writeOne adds 1 to eventfd fd's counter; EAGAIN (full) is no error.
func writeOne(fd int) error {
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	if _, err := unix.Write(fd, one[:]); err != nil && err != unix.EAGAIN {
		return err
	}
	return nil
}

// Fail marks the device broken (its plugin died or misbehaved): status
// gets DEVICE_NEEDS_RESET, the guest gets a config-change interrupt, and
// the back-end is not called any more. The rest of the VM runs on.
func (d *Device) Fail(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.failLocked(err)
}

func (d *Device) failLocked(err error) {
	if d.failed != nil {
		return
	}
	d.failed = fmt.Errorf("%w: %w", ErrFailed, err)
	if d.cfg.OnFail != nil {
		// Its caller says so (a run that ends with one line).
		d.log.Debug("virtio device failed", "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
		go d.cfg.OnFail(d.failed)
	} else {
		d.log.Error("virtio device failed", "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
	}
	if d.anyLiveLocked() {
		// The live queues stop without the back-end, which may only
		// have been slow and still serve them: it goes first.
		d.abandonLocked(err)
	}
	for i := range d.queues {
		d.stopQueueLocked(i)
	}
	d.status |= StatusDeviceNeedsRst
	d.configChangedLocked()
}

// ConfigChanged handles a config change the back-end reports on its own (a
// network link went down): the config space copy is read again from the
// back-end, then, once the driver is ready (DRIVER_OK), the config
// generation moves on and a config-change interrupt is raised. It runs on
// the back-end request goroutine, never on a vCPU thread, and does not
// hold the device's lock while it waits for the back-end; a back-end that
// does not answer fails the device. It does nothing after the device
// failed.
func (d *Device) ConfigChanged() {
	d.mu.Lock()
	defer d.mu.Unlock()
	var fresh []byte
	var err error
	b := d.cfg.Backend
	stale := false
	for try := 1; ; try++ {
		n := len(d.config)
		refresh := d.failed == nil && !d.suspended && d.cfg.ConfigSpace && d.cached && n > 0
		b = d.cfg.Backend
		writes := d.configWrites
		d.mu.Unlock()
		fresh, err = nil, nil
		if refresh {
			fresh, err = b.GetConfig(0, uint32(n))
			if err == nil && len(fresh) != n {
				err = fmt.Errorf("%d bytes, asked %d", len(fresh), n)
			}
		}
		d.mu.Lock()
		// A guest config write that landed meanwhile may be missing
		// from fresh, which must not undo it in the copy: read again
		// (it has reached the back-end by now). A guest that writes
		// without pause keeps its bytes, not the back-end's change.
		stale = refresh && err == nil && d.configWrites != writes
		if !stale || try == configRefreshTries {
			break
		}
	}
	if d.failed != nil || d.suspended || b != d.cfg.Backend {
		return
	}
	if err != nil {
		if !d.recoverLocked(err) {
			d.failLocked(fmt.Errorf("re-read config space after a change: %w", err))
		}
		return
	}
	changed := stale || !bytes.Equal(d.config, fresh)
	if !stale {
		copy(d.config, fresh)
	}
	if d.status&StatusDriverOK == 0 {
		d.configMovedLocked(changed)
		return
	}
	d.configChangedLocked()
}

// configRefreshTries bounds how often ConfigChanged reads the config space
// again because guest config writes landed during its read.
const configRefreshTries = 4

// configMovedLocked moves the config generation on when the config space
// changed before DRIVER_OK, with no interrupt yet: a driver probing it
// reads a field wider than 32 bits in two reads between two reads of the
// generation, and must see that it changed in between (virtio 1.2,
// 4.2.2.1).
func (d *Device) configMovedLocked(changed bool) {
	if changed {
		d.configGen++
	}
}

// configChangedLocked moves the config generation on, sets the config bit
// of InterruptStatus and pulses the device's interrupt line.
func (d *Device) configChangedLocked() {
	d.configGen++
	d.intStatus |= IntConfig
	if err := d.cfg.Wiring.IRQLine(d.cfg.GSI, true); err == nil {
		d.cfg.Wiring.IRQLine(d.cfg.GSI, false)
	}
}

// Failed returns why the device failed, or nil.
func (d *Device) Failed() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failed
}

// guestErrorLocked handles a driver's mistake (a queue it laid out so
// that the device cannot use it): the device needs a reset (DEVICE_NEEDS_
// RESET and a config-change interrupt) and its queues stop, as when it
// failed; but the back-end is fine, and the driver's next reset clears
// it, so a driver that resets and sets the device up again gets it back.
func (d *Device) guestErrorLocked(err error) {
	d.needsResetLocked(err, "driver set up a queue the device cannot use; the device needs a reset")
}

// needsResetLocked makes the device need a reset for the driver's mistake
// err (guestErrorLocked, QueueBroken), with msg as its warning.
func (d *Device) needsResetLocked(err error, msg string) {
	if d.guestErr != nil || d.failed != nil {
		return
	}
	d.guestErr = err
	d.warnGuest(msg, "base", fmt.Sprintf("%#x", d.cfg.Base), "error", err)
	d.stopAllLocked()
	d.status |= StatusDeviceNeedsRst
	d.configChangedLocked()
}

// QueueBroken makes the device need a reset because its back-end stopped
// serving queue i on its own (it signalled the ring's error eventfd,
// Config.OnQueueError) while the back-end itself stays healthy: the driver
// broke the ring (an available index moved by more than the queue's size,
// a head past the descriptor table), and the ring serves nothing until
// the driver resets the device. As for a queue the driver laid out badly,
// the device gets DEVICE_NEEDS_RESET and a config-change interrupt and its
// queues stop (virtio 1.2, 2.1.2; QEMU's own devices stop the same way);
// the driver's next reset clears it. A report about a ring that stopped
// since the signal (the driver reset it, the back-end was replaced) does
// nothing. It returns whether the device now needs a reset for it.
func (d *Device) QueueBroken(i int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.queues) {
		return false
	}
	q := &d.queues[i]
	if !q.errSeen || !q.live || d.failed != nil || d.suspended || d.closing {
		return false
	}
	acted := d.guestErr == nil
	// Not a guest access: the ring stops below get a stop budget of
	// their own, not what is left of the last access that stopped a
	// ring, long spent by now, which abandoned (killed) a healthy
	// back-end instead of asking it (found in review).
	d.stopBy = time.Time{}
	d.needsResetLocked(fmt.Errorf("queue %d: the back-end stopped serving it (the driver broke the ring)", i),
		"the back-end stopped a queue the driver broke; the device needs a reset")
	return acted
}

// NeedsReset returns the driver's mistake that made the device need a
// reset (guestErrorLocked), or nil.
func (d *Device) NeedsReset() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.guestErr
}

// readConfigLocked serves a config-space read from the copy: no call to
// the plugin, so a vCPU never waits for it. Bytes beyond the device's
// config space read as zero. A device without a copy (config size
// unknown) forwards the read, bounded by the Backend's deadline.
func (d *Device) readConfigLocked(off uint64, data []byte) {
	if !d.cfg.ConfigSpace || d.failed != nil || !configAccessOK(off, len(data)) {
		return
	}
	if d.cached {
		if off < uint64(len(d.config)) {
			copy(data, d.config[off:])
		}
		return
	}
	if d.suspended {
		return // reads as zero until the back-end is back
	}
	b, err := d.cfg.Backend.GetConfig(uint32(off), uint32(len(data)))
	switch {
	case frontend.Gone(err):
		if !d.recoverLocked(err) {
			d.failLocked(fmt.Errorf("config read: %w", err))
		}
	case err != nil:
		// Outside the device's config space: reads as zero.
		d.log.Debug("config read failed", "offset", off, "len", len(data), "error", err)
	default:
		copy(data, b)
	}
}

func (d *Device) writeConfigLocked(off uint64, data []byte) {
	if !d.cfg.ConfigSpace || d.failed != nil || !configAccessOK(off, len(data)) {
		return
	}
	if d.suspended {
		d.warnGuest("config write while the back-end is being replaced; dropped", "offset", off)
		return
	}
	err := d.cfg.Backend.SetConfig(uint32(off), 0, append([]byte(nil), data...))
	switch {
	case frontend.Gone(err):
		if !d.recoverLocked(err) {
			d.failLocked(fmt.Errorf("config write: %w", err))
		}
	case err != nil:
		// A refused write (read-only field) is the guest's problem, not a
		// broken plugin.
		d.log.Debug("config write refused", "offset", off, "error", err)
	case d.cached && off < uint64(len(d.config)):
		copy(d.config[off:], data)
		d.configWrites++
	}
}

func configAccessOK(off uint64, n int) bool {
	return n > 0 && n <= 8 && off < ConfigSpaceMax && uint64(n) <= ConfigSpaceMax-off
}

// Suspend marks the back-end gone (its process died or stopped answering):
// it is abandoned first (Config.Abandon: a queue stopped while suspended
// does not ask it), then until Resume no back-end is called and what the
// guest does is only recorded. It does nothing to a failed device, and
// fails the device when the back-end could not be abandoned.
func (d *Device) Suspend() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failed == nil && !d.suspended {
		if !d.abandonLocked(ErrReplaced) {
			return
		}
		d.suspended = true
		d.log.Debug("virtio device suspended while its back-end is replaced", "base", fmt.Sprintf("%#x", d.cfg.Base))
	}
}

// Suspended reports whether the device waits for a new back-end.
func (d *Device) Suspended() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.suspended
}

// OverrideConfig changes bytes of the config space copy the guest reads
// while the back-end is away (the core shows a network link as down) and,
// once the driver is ready, raises a config-change interrupt. Resume
// re-reads the whole config space from the new back-end.
func (d *Device) OverrideConfig(off int, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failed != nil || !d.cached || off < 0 || off > len(d.config) || len(data) > len(d.config)-off {
		return
	}
	changed := !bytes.Equal(d.config[off:off+len(data)], data)
	copy(d.config[off:], data)
	if d.status&StatusDriverOK != 0 {
		d.configChangedLocked()
	} else {
		d.configMovedLocked(changed)
	}
}

// Outstanding reports the first live queue on which the driver has made
// chains available that the device has not used yet (the avail ring's
// index differs from the used ring's, both read from guest memory with
// ringIndex, which reads the index field of the ring at a guest address),
// or -1 when there is none. The core asks it of a suspended device whose
// lost back-end kept no inflight region: only with nothing outstanding
// can a new back-end start at the used index without losing or repeating
// a request.
func (d *Device) Outstanding(ringIndex func(gpa uint64) (uint16, error)) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.queues {
		q := &d.queues[i]
		if !q.live {
			continue
		}
		avail, err := ringIndex(q.avail)
		if err != nil {
			return i, fmt.Errorf("queue %d: avail index: %w", i, err)
		}
		used, err := ringIndex(q.used)
		if err != nil {
			return i, fmt.Errorf("queue %d: used index: %w", i, err)
		}
		if avail != used {
			return i, nil
		}
	}
	return -1, nil
}

// Resume installs the device's state into b, the back-end that replaces
// the one that was lost: the driver's features (once FEATURES_OK was
// set), then every live queue positioned at its used index in guest
// memory, read with usedIndex from the used ring's guest address; then the
// config space is read again (a change raises a config-change interrupt)
// and every live queue's call eventfd is signalled, so the guest looks at
// completions the lost back-end published without an interrupt. b must
// already have the memory table and the inflight region. On error the
// device stays suspended (the caller retries with another back-end, or
// fails it).
func (d *Device) Resume(b Backend, usedIndex func(usedGPA uint64) (uint16, error)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failed != nil {
		return d.failed
	}
	if !d.suspended {
		return errors.New("resume of a device that is not suspended")
	}
	d.setupBy = time.Time{} // a set-up budget of its own
	if d.status&StatusFeaturesOK != 0 {
		if err := b.SetFeatures(d.backendFeatures()); err != nil {
			return fmt.Errorf("SET_FEATURES: %w", err)
		}
	}
	fresh, err := d.resumeRingsLocked(b, usedIndex)
	if err != nil {
		return err
	}
	d.cfg.Backend = b
	d.suspended = false
	for i := range d.queues {
		d.queues[i].errSeen = false // the old back-end's rings are gone
	}
	if fresh != nil && !bytes.Equal(fresh, d.config) {
		copy(d.config, fresh)
		if d.status&StatusDriverOK != 0 {
			d.configChangedLocked()
		} else {
			d.configMovedLocked(true)
		}
	}
	for i := range d.queues {
		if q := &d.queues[i]; q.live {
			if err := signalEventFD(q.call); err != nil {
				d.log.Debug("interrupt after resume", "queue", i, "error", err)
			}
		}
	}
	d.log.Debug("virtio device resumed with a new back-end", "base", fmt.Sprintf("%#x", d.cfg.Base))
	return nil
}

// resumeRingsLocked sets up every live queue in b (Resume) and reads b's
// config space. When it fails after it began handing rings to b, b is
// abandoned (Config.Abandon) before it returns: the device stays
// suspended, so a queue the driver stops next is stopped without asking
// any back-end and its ring's memory reused at once, and b may be serving
// rings it was given (found in review: only the caller's clean-up after
// Resume returned, with the vCPUs running, ended it). A back-end that
// cannot be abandoned fails the device.
func (d *Device) resumeRingsLocked(b Backend, usedIndex func(usedGPA uint64) (uint16, error)) (fresh []byte, err error) {
	handed := false
	defer func() {
		if err != nil && handed {
			d.abandonLocked(fmt.Errorf("resume failed after rings were handed to the new back-end: %w", err))
		}
	}()
	for i := range d.queues {
		q := &d.queues[i]
		if !q.live {
			continue
		}
		qs, err := d.queueSetup(i)
		if err != nil {
			return nil, err
		}
		if qs.Base, err = usedIndex(q.used); err != nil {
			return nil, fmt.Errorf("queue %d: used index: %w", i, err)
		}
		limit, err := d.setupLimitLocked()
		if err == nil {
			handed = true
			err = d.setupRing(b, qs, limit)
		}
		if err != nil {
			return nil, fmt.Errorf("queue %d set-up: %w", i, err)
		}
	}
	if d.cfg.ConfigSpace && d.cached && len(d.config) > 0 {
		if fresh, err = b.GetConfig(0, uint32(len(d.config))); err != nil {
			return nil, fmt.Errorf("read the config space: %w", err)
		}
		if len(fresh) != len(d.config) {
			return nil, fmt.Errorf("read the config space: %d bytes, asked %d", len(fresh), len(d.config))
		}
	}
	return fresh, nil
}
