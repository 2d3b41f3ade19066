package mmio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

type fakeBackend struct {
	calls    []string
	features uint64
	queues   map[uint32]frontend.QueueSetup
	config   []byte
	fail     error // returned by every call when set
	// stopFail is returned by ring stops only; stopDelay delays them.
	stopFail  error
	stopDelay time.Duration
}

func (b *fakeBackend) log(format string, args ...any) {
	b.calls = append(b.calls, fmt.Sprintf(format, args...))
}

func (b *fakeBackend) SetFeatures(f uint64) error {
	b.log("SetFeatures %#x", f)
	if b.fail != nil {
		return b.fail
	}
	b.features = f
	return nil
}

func (b *fakeBackend) GetConfig(offset, size uint32) ([]byte, error) {
	b.log("GetConfig %d %d", offset, size)
	if b.fail != nil {
		return nil, b.fail
	}
	if uint64(offset)+uint64(size) > uint64(len(b.config)) {
		return nil, frontend.ErrNacked
	}
	return append([]byte(nil), b.config[offset:offset+size]...), nil
}

func (b *fakeBackend) SetConfig(offset, flags uint32, data []byte) error {
	b.log("SetConfig %d % x", offset, data)
	if b.fail != nil {
		return b.fail
	}
	if uint64(offset)+uint64(len(data)) > uint64(len(b.config)) {
		return frontend.ErrNacked
	}
	copy(b.config[offset:], data)
	return nil
}

func (b *fakeBackend) SetupQueue(q frontend.QueueSetup, protocol bool) error {
	b.log("SetupQueue %d size %d protocol %v", q.Index, q.Size, protocol)
	if b.fail != nil {
		return b.fail
	}
	if b.queues == nil {
		b.queues = map[uint32]frontend.QueueSetup{}
	}
	b.queues[q.Index] = q
	return nil
}

func (b *fakeBackend) GetVringBase(idx uint32) (uint32, error) {
	b.log("GetVringBase %d", idx)
	time.Sleep(b.stopDelay)
	delete(b.queues, idx)
	if b.stopFail != nil {
		return 0, b.stopFail
	}
	return 0, b.fail
}

func (b *fakeBackend) SetVringEnable(idx uint32, enable bool) error {
	b.log("SetVringEnable %d %v", idx, enable)
	if !enable && b.stopFail != nil {
		return b.stopFail
	}
	return b.fail
}

type fakeWiring struct {
	ioevents map[string]bool
	irqfds   map[string]bool
	pulses   []string
}

func (w *fakeWiring) RegisterIOEventFD(addr uint64, width uint32, dm uint64, fd int) error {
	w.ioevents[fmt.Sprintf("%#x/%d/%d", addr, width, dm)] = true
	return nil
}

func (w *fakeWiring) UnregisterIOEventFD(addr uint64, width uint32, dm uint64, fd int) error {
	delete(w.ioevents, fmt.Sprintf("%#x/%d/%d", addr, width, dm))
	return nil
}

func (w *fakeWiring) RegisterIRQFD(fd int, gsi uint32) error {
	w.irqfds[fmt.Sprintf("%d/%d", fd, gsi)] = true
	return nil
}

func (w *fakeWiring) UnregisterIRQFD(fd int, gsi uint32) error {
	delete(w.irqfds, fmt.Sprintf("%d/%d", fd, gsi))
	return nil
}

func (w *fakeWiring) IRQLine(gsi uint32, high bool) error {
	w.pulses = append(w.pulses, fmt.Sprintf("%d=%v", gsi, high))
	return nil
}

const (
	testBase = 0xd0000000
	testGSI  = 16
	// guest RAM [0, 1 GiB) appears at user address 0x7f0000000000
	testUser = 0x7f0000000000
)

func translate(gpa, size uint64) (uint64, error) {
	if gpa+size < gpa || gpa+size > 1<<30 {
		return 0, errors.New("outside guest RAM")
	}
	return testUser + gpa, nil
}

type rig struct {
	t *testing.T
	d *Device
	b *fakeBackend
	w *fakeWiring
}

func newRig(t *testing.T, mod func(*Config)) *rig {
	t.Helper()
	b := &fakeBackend{config: []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}
	w := &fakeWiring{ioevents: map[string]bool{}, irqfds: map[string]bool{}}
	cfg := Config{
		DeviceID: 2, Base: testBase, GSI: testGSI, NumQueues: 2, QueueSizeMax: 256,
		// VHOST_F_LOG_ALL: libvhost-user back-ends (qemu-storage-daemon)
		// offer it to every front-end.
		Features:           1<<1 | 1<<9 | vhostuser.FeatureRingEventIdx | vhostuser.FeatureProtocolFeatures | featureVersion1 | vhostuser.FeatureRingPacked | vhostuser.FeatureLogAll | 1<<39 | 1<<41,
		ProtocolNegotiated: true, ConfigSpace: true, ConfigData: append([]byte(nil), b.config...),
		Backend: b, Wiring: w, Translate: translate,
	}
	if mod != nil {
		mod(&cfg)
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return &rig{t: t, d: d, b: b, w: w}
}

func (r *rig) rd(off uint64) uint32 {
	var b [4]byte
	r.d.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

func (r *rig) wr(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	r.d.Write(off, b[:])
}

// negotiate runs the Linux driver's feature sequence.
func (r *rig) negotiate(features uint64) uint32 {
	r.wr(RegStatus, 0)
	r.wr(RegStatus, StatusAcknowledge)
	r.wr(RegStatus, StatusAcknowledge|StatusDriver)
	r.wr(RegDriverFeatSel, 1)
	r.wr(RegDriverFeatures, uint32(features>>32))
	r.wr(RegDriverFeatSel, 0)
	r.wr(RegDriverFeatures, uint32(features))
	r.wr(RegStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	return r.rd(RegStatus)
}

func (r *rig) setupQueue(idx uint32, num uint32, desc, avail, used uint64) {
	r.wr(RegQueueSel, idx)
	r.wr(RegQueueNum, num)
	r.wr(RegQueueDescLow, uint32(desc))
	r.wr(RegQueueDescHigh, uint32(desc>>32))
	r.wr(RegQueueDriverLow, uint32(avail))
	r.wr(RegQueueDriverHigh, uint32(avail>>32))
	r.wr(RegQueueDeviceLow, uint32(used))
	r.wr(RegQueueDeviceHigh, uint32(used>>32))
	r.wr(RegQueueReady, 1)
}

func TestIdentification(t *testing.T) {
	r := newRig(t, nil)
	for _, tt := range []struct {
		off  uint64
		want uint32
	}{
		{RegMagic, 0x74726976}, {RegVersion, 2}, {RegDeviceID, 2}, {RegVendorID, VendorID},
		{RegQueueNumMax, 256}, {RegStatus, 0}, {RegInterruptStatus, 0}, {RegConfigGeneration, 0},
		{RegSHMLenLow, 0xffffffff}, {RegSHMLenHigh, 0xffffffff}, {0x0f0, 0},
	} {
		if got := r.rd(tt.off); got != tt.want {
			t.Errorf("register %#x = %#x, want %#x", tt.off, got, tt.want)
		}
	}
	r.wr(RegQueueSel, 2)
	if got := r.rd(RegQueueNumMax); got != 0 {
		t.Errorf("QueueNumMax of a missing queue = %d", got)
	}
	// Misaligned or narrow register accesses read zero and change nothing.
	b := make([]byte, 2)
	r.d.Read(RegMagic, b)
	if b[0] != 0 || b[1] != 0 {
		t.Errorf("2-byte magic read % x", b)
	}
	r.d.Write(RegStatus, []byte{1})
	r.d.Write(RegStatus+1, []byte{1, 0, 0, 0})
	if r.rd(RegStatus) != 0 {
		t.Error("narrow status write took effect")
	}
}

func TestDeviceFeatures(t *testing.T) {
	r := newRig(t, nil)
	r.wr(RegDeviceFeatSel, 0)
	lo := r.rd(RegDeviceFeatures)
	r.wr(RegDeviceFeatSel, 1)
	hi := r.rd(RegDeviceFeatures)
	r.wr(RegDeviceFeatSel, 2)
	if r.rd(RegDeviceFeatures) != 0 {
		t.Error("feature word 2 not zero")
	}
	got := uint64(hi)<<32 | uint64(lo)
	want := uint64(1<<1 | 1<<9 | vhostuser.FeatureRingEventIdx | featureVersion1)
	if got != want {
		t.Errorf("device features %#x, want %#x (protocol-features, log-all, packed, notif-config-data and admin-vq bits stripped)", got, want)
	}
}

func TestFeatureNegotiation(t *testing.T) {
	tests := []struct {
		name     string
		protocol bool
		driver   uint64
		fail     error
		ok       bool
		sent     uint64
	}{
		{"accepted with protocol bit", true, featureVersion1 | 1<<9, nil, true, featureVersion1 | 1<<9 | vhostuser.FeatureProtocolFeatures},
		{"accepted without protocol bit", false, featureVersion1 | 1<<1, nil, true, featureVersion1 | 1<<1},
		{"legacy driver", true, 1 << 9, nil, false, 0},
		{"not offered", true, featureVersion1 | 1<<5, nil, false, 0},
		{"vhost-user bit from the guest", true, featureVersion1 | vhostuser.FeatureProtocolFeatures, nil, false, 0},
		{"vhost log-all bit from the guest", true, featureVersion1 | vhostuser.FeatureLogAll, nil, false, 0},
		{"plugin refuses", true, featureVersion1, errors.New("nope"), false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t, func(c *Config) { c.ProtocolNegotiated = tt.protocol })
			r.b.fail = tt.fail
			st := r.negotiate(tt.driver)
			if ok := st&StatusFeaturesOK != 0; ok != tt.ok {
				t.Fatalf("FEATURES_OK = %v, want %v (status %#x, calls %v)", ok, tt.ok, st, r.b.calls)
			}
			if tt.ok && r.b.features != tt.sent {
				t.Errorf("SET_FEATURES %#x, want %#x", r.b.features, tt.sent)
			}
			if !tt.ok && tt.fail == nil && len(r.b.calls) != 0 {
				t.Errorf("back-end called for refused features: %v", r.b.calls)
			}
			// Once FEATURES_OK is set, feature writes are frozen.
			if tt.ok {
				r.wr(RegDriverFeatures, 0)
				r.wr(RegStatus, st|StatusDriverOK)
				if r.d.drvFeat != tt.driver {
					t.Errorf("driver features changed after FEATURES_OK")
				}
			}
			// DRIVER_OK without FEATURES_OK is refused.
			if !tt.ok {
				r.wr(RegStatus, st|StatusDriverOK)
				if r.rd(RegStatus)&StatusDriverOK != 0 {
					t.Error("DRIVER_OK accepted without FEATURES_OK")
				}
			}
		})
	}
}

func TestQueueLifecycle(t *testing.T) {
	for _, readyFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("readyBeforeDriverOK=%v", readyFirst), func(t *testing.T) {
			r := newRig(t, nil)
			st := r.negotiate(featureVersion1 | vhostuser.FeatureRingEventIdx)
			if readyFirst {
				r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
				r.setupQueue(1, 256, 0x20000, 0x21000, 0x22000)
				if len(r.b.queues) != 0 {
					t.Fatal("queue started before DRIVER_OK")
				}
				if r.rd(RegInterruptStatus) != 0 {
					t.Error("interrupt status set before any queue is live")
				}
				r.wr(RegStatus, st|StatusDriverOK)
			} else {
				r.wr(RegStatus, st|StatusDriverOK)
				r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
				r.setupQueue(1, 256, 0x20000, 0x21000, 0x22000)
			}
			if r.d.Failed() != nil {
				t.Fatal(r.d.Failed())
			}
			q0, ok := r.b.queues[0]
			if !ok || q0.Size != 128 || q0.Desc != testUser+0x10000 || q0.Avail != testUser+0x11000 || q0.Used != testUser+0x12000 {
				t.Fatalf("queue 0 set-up %+v", q0)
			}
			if q0.Kick == nil || q0.Call == nil || q0.Base != 0 {
				t.Errorf("queue 0 fds/base %+v", q0)
			}
			if q1 := r.b.queues[1]; q1.Size != 256 || q1.Index != 1 {
				t.Errorf("queue 1 set-up %+v", q1)
			}
			for _, k := range []string{fmt.Sprintf("%#x/4/0", testBase+0x50), fmt.Sprintf("%#x/4/1", testBase+0x50)} {
				if !r.w.ioevents[k] {
					t.Errorf("ioeventfd %s not registered (have %v)", k, r.w.ioevents)
				}
			}
			if len(r.w.irqfds) != 2 {
				t.Errorf("irqfds %v", r.w.irqfds)
			}
			for k := range r.w.irqfds {
				if !strings.HasSuffix(k, fmt.Sprintf("/%d", testGSI)) {
					t.Errorf("irqfd %s not on GSI %d", k, testGSI)
				}
			}
			if r.rd(RegInterruptStatus)&IntVring == 0 {
				t.Error("interrupt status does not report used buffers with live queues")
			}
			// Queue config is frozen while ready.
			r.wr(RegQueueSel, 0)
			r.wr(RegQueueNum, 64)
			r.wr(RegQueueDescLow, 0x30000)
			if r.rd(RegQueueNum) != 128 || r.rd(RegQueueDescLow) != 0x10000 {
				t.Error("queue registers changed while ready")
			}
			// Reset stops both rings, unwires, clears state.
			r.b.calls = nil
			r.wr(RegStatus, 0)
			want := []string{"SetVringEnable 0 false", "GetVringBase 0", "SetVringEnable 1 false", "GetVringBase 1"}
			if strings.Join(r.b.calls, ",") != strings.Join(want, ",") {
				t.Errorf("reset calls %v, want %v", r.b.calls, want)
			}
			if len(r.w.ioevents) != 0 || len(r.w.irqfds) != 0 {
				t.Errorf("wiring left after reset: %v %v", r.w.ioevents, r.w.irqfds)
			}
			if r.rd(RegStatus) != 0 || r.rd(RegQueueReady) != 0 || r.rd(RegQueueNum) != 0 || r.rd(RegInterruptStatus) != 0 {
				t.Error("registers not cleared by reset")
			}
		})
	}
}

func TestQueueReadyToggle(t *testing.T) {
	r := newRig(t, func(c *Config) { c.ProtocolNegotiated = false })
	st := r.negotiate(featureVersion1)
	r.wr(RegStatus, st|StatusDriverOK)
	r.setupQueue(1, 16, 0x1000, 0x2000, 0x3000)
	r.b.calls = nil
	r.wr(RegQueueSel, 1)
	r.wr(RegQueueReady, 0)
	if strings.Join(r.b.calls, ",") != "GetVringBase 1" {
		t.Errorf("calls %v (no SET_VRING_ENABLE without protocol features)", r.b.calls)
	}
	if r.rd(RegQueueReady) != 0 || len(r.w.ioevents) != 0 {
		t.Error("queue still ready or wired")
	}
}

func TestBadQueues(t *testing.T) {
	tests := []struct {
		name              string
		num               uint32
		desc, avail, used uint64
	}{
		{"zero size", 0, 0x1000, 0x2000, 0x3000},
		{"not a power of two", 100, 0x1000, 0x2000, 0x3000},
		{"above the maximum", 512, 0x1000, 0x2000, 0x3000},
		{"beyond 16 bits", 0x10000, 0x1000, 0x2000, 0x3000},
		{"misaligned descriptors", 16, 0x1008, 0x2000, 0x3000},
		{"misaligned avail", 16, 0x1000, 0x2001, 0x3000},
		{"misaligned used", 16, 0x1000, 0x2000, 0x3002},
		{"descriptors outside RAM", 16, 1 << 30, 0x2000, 0x3000},
		{"used ring straddling the end of RAM", 256, 0x1000, 0x2000, 1<<30 - 0x100},
		{"address overflow", 256, 0xfffffffffffffff0, 0x2000, 0x3000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t, nil)
			st := r.negotiate(featureVersion1)
			r.setupQueue(0, tt.num, tt.desc, tt.avail, tt.used)
			r.wr(RegStatus, st|StatusDriverOK)
			if r.d.NeedsReset() == nil {
				t.Fatal("device accepted a bad queue")
			}
			if r.d.Failed() != nil {
				t.Errorf("a driver's mistake failed the device: %v", r.d.Failed())
			}
			if len(r.b.queues) != 0 || len(r.w.ioevents) != 0 || len(r.w.irqfds) != 0 {
				t.Error("bad queue was set up or wired")
			}
			if r.rd(RegStatus)&StatusDeviceNeedsRst == 0 {
				t.Error("DEVICE_NEEDS_RESET not set")
			}
			if r.rd(RegInterruptStatus)&IntConfig == 0 {
				t.Error("config-change interrupt status not set")
			}
			if len(r.w.pulses) != 2 || r.w.pulses[0] != "16=true" || r.w.pulses[1] != "16=false" {
				t.Errorf("interrupt pulses %v", r.w.pulses)
			}
			r.wr(RegInterruptACK, IntConfig)
			if r.rd(RegInterruptStatus) != 0 {
				t.Error("interrupt ACK did not clear")
			}
		})
	}
}

func TestFailStopsDevice(t *testing.T) {
	r := newRig(t, nil)
	st := r.negotiate(featureVersion1)
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegStatus, st|StatusDriverOK)
	gen := r.rd(RegConfigGeneration)
	r.d.Fail(errors.New("plugin exited"))
	if !errors.Is(r.d.Failed(), ErrFailed) {
		t.Fatalf("Failed() = %v", r.d.Failed())
	}
	if len(r.w.ioevents) != 0 || len(r.w.irqfds) != 0 {
		t.Error("failed device still wired")
	}
	if r.rd(RegConfigGeneration) == gen {
		t.Error("config generation unchanged")
	}
	// Afterwards the back-end is left alone, even across a reset.
	r.b.calls = nil
	r.wr(RegStatus, 0)
	if st := r.negotiate(featureVersion1); st&StatusFeaturesOK != 0 {
		t.Error("failed device accepted features")
	}
	var b [4]byte
	r.d.Read(RegConfig, b[:])
	if len(r.b.calls) != 0 {
		t.Errorf("back-end called after failure: %v", r.b.calls)
	}
	if r.rd(RegStatus)&StatusDeviceNeedsRst == 0 {
		t.Error("DEVICE_NEEDS_RESET cleared by reset of a dead device")
	}
}

// TestConfigChanged: a config change from the back-end moves the config
// generation, sets the config bit of InterruptStatus and pulses the line,
// once the driver is ready; before that it is ignored.
func TestConfigChanged(t *testing.T) {
	r := newRig(t, nil)
	st := r.negotiate(featureVersion1)
	gen := r.rd(RegConfigGeneration)
	r.d.ConfigChanged() // not DRIVER_OK yet
	if r.rd(RegConfigGeneration) != gen || r.rd(RegInterruptStatus)&IntConfig != 0 || len(r.w.pulses) != 0 {
		t.Fatal("config change before DRIVER_OK was not ignored")
	}
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegStatus, st|StatusDriverOK)
	r.w.pulses = nil
	r.d.ConfigChanged()
	if r.rd(RegConfigGeneration) == gen {
		t.Error("config generation unchanged")
	}
	if r.rd(RegInterruptStatus)&IntConfig == 0 {
		t.Error("InterruptStatus lacks the config bit")
	}
	if len(r.w.pulses) != 2 || r.w.pulses[0] != "16=true" || r.w.pulses[1] != "16=false" {
		t.Errorf("interrupt pulses %v", r.w.pulses)
	}
	r.wr(RegInterruptACK, IntConfig)
	if r.rd(RegInterruptStatus)&IntConfig != 0 {
		t.Error("config bit not cleared by InterruptACK")
	}
}

func TestManualNotify(t *testing.T) {
	r := newRig(t, nil)
	r.negotiate(featureVersion1)
	r.setupQueue(1, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegQueueNotify, 1)
	r.wr(RegQueueNotify, 7) // no such queue: ignored
	var b [8]byte
	n, err := unix.Read(int(r.d.queues[1].kick.Fd()), b[:])
	if err != nil || n != 8 || binary.LittleEndian.Uint64(b[:]) != 1 {
		t.Fatalf("kick eventfd read %d %v % x", n, err, b)
	}
	if _, err := unix.Read(int(r.d.queues[0].kick.Fd()), b[:]); !errors.Is(err, unix.EAGAIN) {
		t.Errorf("queue 0 kicked: %v", err)
	}
}

func TestConfigSpace(t *testing.T) {
	r := newRig(t, nil)
	tests := []struct {
		off  uint64
		n    int
		want []byte
	}{
		{RegConfig, 4, []byte{1, 2, 3, 4}},
		{RegConfig + 4, 8, []byte{5, 6, 7, 8, 9, 10, 11, 12}},
		{RegConfig + 3, 1, []byte{4}},
		{RegConfig + 10, 4, []byte{11, 12, 0, 0}}, // beyond the plugin's config: zero
		{Size - 2, 4, []byte{0, 0, 0, 0}},         // crosses the window
	}
	for _, tt := range tests {
		b := make([]byte, tt.n)
		r.d.Read(tt.off, b)
		if string(b) != string(tt.want) {
			t.Errorf("config read at %#x/%d = % x, want % x", tt.off, tt.n, b, tt.want)
		}
	}
	r.b.calls = nil
	for _, tt := range tests {
		r.d.Read(tt.off, make([]byte, tt.n))
	}
	if len(r.b.calls) != 0 {
		t.Errorf("config reads reached the back-end: %v", r.b.calls)
	}
	r.d.Write(RegConfig+2, []byte{0xaa, 0xbb})
	if r.b.config[2] != 0xaa || r.b.config[3] != 0xbb {
		t.Error("config write not forwarded")
	}
	b2 := make([]byte, 2)
	r.d.Read(RegConfig+2, b2)
	if b2[0] != 0xaa || b2[1] != 0xbb {
		t.Errorf("config read after a write: % x", b2)
	}
	r.b.calls = nil
	r.d.Write(Size-1, []byte{1, 2})
	if len(r.b.calls) != 0 {
		t.Errorf("config write outside the window forwarded: %v", r.b.calls)
	}
	// Without the CONFIG protocol feature config space reads as zero.
	r2 := newRig(t, func(c *Config) { c.ConfigSpace = false })
	b := make([]byte, 4)
	r2.d.Read(RegConfig, b)
	if b[0] != 0 || len(r2.b.calls) != 0 {
		t.Errorf("config read without CONFIG: % x %v", b, r2.b.calls)
	}
}

func TestStatusCannotClearBits(t *testing.T) {
	r := newRig(t, nil)
	r.wr(RegStatus, StatusAcknowledge|StatusDriver)
	r.wr(RegStatus, StatusAcknowledge)
	if r.rd(RegStatus) != StatusAcknowledge|StatusDriver {
		t.Errorf("status %#x", r.rd(RegStatus))
	}
}

func TestNewValidates(t *testing.T) {
	for _, mod := range []func(*Config){
		func(c *Config) { c.NumQueues = 0 },
		func(c *Config) { c.QueueSizeMax = 100 },
		func(c *Config) { c.QueueSizeMax = 0 },
		func(c *Config) { c.Base = testBase + 0x10 },
		func(c *Config) { c.Backend = nil },
	} {
		cfg := Config{DeviceID: 2, Base: testBase, NumQueues: 1, QueueSizeMax: 256, Backend: &fakeBackend{}, Wiring: &fakeWiring{}, Translate: translate}
		mod(&cfg)
		if _, err := New(cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("New(%+v) = %v", cfg, err)
		}
	}
}

// TestBackendGoneSuspendsAndResumes: a back-end that disconnects suspends a
// device that can recover; what the guest does meanwhile is recorded, and
// Resume installs it into the new back-end with the queues at their used
// indexes, a re-read config space and an interrupt per live queue.
func TestBackendGoneSuspendsAndResumes(t *testing.T) {
	var recovered []error
	resets := 0
	r := newRig(t, func(c *Config) {
		c.Recover = func(err error) bool { recovered = append(recovered, err); return true }
		c.OnReset = func() { resets++ }
	})
	st := r.negotiate(featureVersion1 | vhostuser.FeatureRingEventIdx)
	r.wr(RegStatus, st|StatusDriverOK)
	r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
	gone := fmt.Errorf("SET_VRING_NUM: %w: broken pipe", frontend.ErrDisconnected)
	r.b.fail = gone
	r.setupQueue(1, 64, 0x20000, 0x21000, 0x22000)
	if err := r.d.Failed(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
	if !r.d.Suspended() || len(recovered) != 1 {
		t.Fatalf("suspended %v after %d recoveries", r.d.Suspended(), len(recovered))
	}
	// While suspended: nothing reaches a back-end; config reads are
	// served from the copy.
	r.b.calls = nil
	r.wr(RegConfig, 0xffffffff)
	if got := r.rd(RegConfig); got != 0x04030201 {
		t.Errorf("config read while suspended %#x", got)
	}
	r.d.OverrideConfig(2, []byte{0})
	if len(r.b.calls) != 0 {
		t.Fatalf("back-end called while suspended: %v", r.b.calls)
	}
	gen := r.rd(RegConfigGeneration)

	nb := &fakeBackend{config: []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99}}
	used := map[uint64]uint16{0x12000: 7, 0x22000: 3}
	err := r.d.Resume(nb, func(gpa uint64) (uint16, error) {
		v, ok := used[gpa]
		if !ok {
			return 0, fmt.Errorf("no used ring at %#x", gpa)
		}
		return v, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.d.Suspended() || r.d.Failed() != nil {
		t.Fatalf("after resume: suspended %v, failed %v", r.d.Suspended(), r.d.Failed())
	}
	wantF := featureVersion1 | vhostuser.FeatureRingEventIdx | vhostuser.FeatureProtocolFeatures
	if nb.features != wantF {
		t.Errorf("new back-end features %#x, want %#x", nb.features, uint64(wantF))
	}
	if q := nb.queues[0]; q.Base != 7 || q.Size != 128 || q.Used != testUser+0x12000 {
		t.Errorf("queue 0 resumed as %+v", q)
	}
	if q := nb.queues[1]; q.Base != 3 || q.Size != 64 {
		t.Errorf("queue 1 resumed as %+v", q)
	}
	if r.rd(RegConfigGeneration) == gen || r.rd(RegConfig+8) != 0x630b0a09 {
		t.Errorf("config space not re-read: generation %d (was %d), bytes %#x", r.rd(RegConfigGeneration), gen, r.rd(RegConfig+8))
	}
	for i := range 2 {
		var b [8]byte
		if _, err := unix.Read(int(r.d.queues[i].call.Fd()), b[:]); err != nil {
			t.Errorf("queue %d: no interrupt after resume: %v", i, err)
		}
	}
	// The new back-end is used from now on.
	r.b.calls, nb.calls = nil, nil
	resets = 0
	r.wr(RegStatus, 0)
	if len(r.b.calls) != 0 || len(nb.calls) != 4 || resets != 1 {
		t.Errorf("reset after resume: old %v, new %v, resets %d", r.b.calls, nb.calls, resets)
	}
}

// TestBackendGoneWhileSuspendedReset: a reset while the back-end is away
// reaches no back-end, and Resume then sets up nothing.
func TestBackendGoneWhileSuspendedReset(t *testing.T) {
	resets := 0
	r := newRig(t, func(c *Config) {
		c.Recover = func(error) bool { return true }
		c.OnReset = func() { resets++ }
	})
	st := r.negotiate(featureVersion1)
	r.wr(RegStatus, st|StatusDriverOK)
	r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
	r.d.Suspend()
	r.b.calls = nil
	resets = 0
	r.wr(RegStatus, 0)
	if len(r.b.calls) != 0 || resets != 1 {
		t.Fatalf("reset while suspended: calls %v, resets %d", r.b.calls, resets)
	}
	nb := &fakeBackend{config: append([]byte(nil), r.b.config...)}
	if err := r.d.Resume(nb, func(uint64) (uint16, error) { return 0, errors.New("not called") }); err != nil {
		t.Fatal(err)
	}
	if len(nb.queues) != 0 || nb.features != 0 {
		t.Fatalf("resume after a reset set up %v, features %#x", nb.queues, nb.features)
	}
}

// TestBackendRefusalStillFails: only a back-end that is gone suspends the
// device; a refusal, or a Recover that declines, fails it as before.
func TestBackendRefusalStillFails(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		recover bool
	}{
		{"refused", fmt.Errorf("SET_VRING_NUM: %w", frontend.ErrNacked), true},
		{"no restart left", fmt.Errorf("x: %w", frontend.ErrTimeout), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, func(c *Config) { c.Recover = func(error) bool { return tc.recover } })
			st := r.negotiate(featureVersion1)
			r.wr(RegStatus, st|StatusDriverOK)
			r.b.fail = tc.err
			r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
			if r.d.Failed() == nil || r.d.Suspended() {
				t.Fatalf("failed %v, suspended %v", r.d.Failed(), r.d.Suspended())
			}
		})
	}
}

// TestOnFail: Config.OnFail hears of the device's failure once, whether
// the core failed it (a plugin that died) or a back-end call did, and not
// of a driver's mistake, which a reset undoes.
func TestOnFail(t *testing.T) {
	for _, tc := range []struct {
		name string
		act  func(r *rig)
		want bool
	}{
		{"Fail, twice", func(r *rig) {
			r.d.Fail(errors.New("plugin exited"))
			r.d.Fail(errors.New("plugin exited again"))
		}, true},
		{"a back-end call that fails", func(r *rig) {
			r.b.fail = fmt.Errorf("SET_VRING_NUM: %w", frontend.ErrNacked)
			r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
		}, true},
		{"a queue the driver laid out badly", func(r *rig) {
			r.setupQueue(0, 0, 0x10000, 0x11000, 0x12000)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := make(chan error, 4)
			r := newRig(t, func(c *Config) { c.OnFail = func(err error) { got <- err } })
			st := r.negotiate(featureVersion1)
			r.wr(RegStatus, st|StatusDriverOK)
			tc.act(r)
			if !tc.want {
				select {
				case err := <-got:
					t.Fatalf("OnFail(%v) for a driver's mistake", err)
				case <-time.After(100 * time.Millisecond):
				}
				return
			}
			select {
			case err := <-got:
				if !errors.Is(err, ErrFailed) || !errors.Is(err, r.d.Failed()) {
					t.Fatalf("OnFail(%v), device failed with %v", err, r.d.Failed())
				}
			case <-time.After(5 * time.Second):
				t.Fatal("OnFail not called")
			}
			select {
			case err := <-got:
				t.Fatalf("OnFail called again: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
		})
	}
}

// TestBadQueueThenResetRecovers: a queue the driver laid out badly (size
// 0) is the driver's mistake, not a dead plugin: the device needs a reset,
// and after one a correct set-up works again (a kdump or kexec kernel
// re-probing, a driver reloaded after a bug). Before, the device was
// failed for the VM's life. (From review.)
func TestBadQueueThenResetRecovers(t *testing.T) {
	r := newRig(t, nil)
	st := r.negotiate(featureVersion1)
	r.setupQueue(0, 0, 0x1000, 0x2000, 0x3000) // QueueNum 0
	r.wr(RegStatus, st|StatusDriverOK)
	if r.d.NeedsReset() == nil {
		t.Fatal("bad queue accepted")
	}
	st = r.negotiate(featureVersion1) // resets first
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegStatus, st|StatusDriverOK)
	if got := r.rd(RegStatus); got&StatusDriverOK == 0 || got&StatusDeviceNeedsRst != 0 {
		t.Errorf("status %#x after a reset and a correct set-up; device error: %v", got, r.d.Failed())
	}
	if _, ok := r.b.queues[0]; !ok {
		t.Error("queue 0 never set up in the back-end after the reset")
	}
}
