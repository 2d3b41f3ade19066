package vmm

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// attachExternal serves dev as an external back-end (spec: its
// --vhost-user options but the socket) and attaches it to a machine
// without KVM, for the test's duration; the driver is not started.
func attachExternal(t *testing.T, dev backend.Device, spec string) (*pluginDevice, *ringDriver) {
	t.Helper()
	sock := serveFake(t, dev)
	c := NewContext(nil)
	d, err := c.connectExternal(context.Background(), 0, externalSpec(t, spec+",socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	m := newDeviceMachine(t, c.log, []*pluginDevice{d})
	if err := m.attachDevices(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.shutdownDevices)
	return d, &ringDriver{t: t, mem: m.mem, dev: d.dev}
}

// resetCounter is a fake back-end device that counts its resets.
type resetCounter struct {
	fakeDevice
	resets atomic.Int32
}

func (r *resetCounter) Reset() { r.resets.Add(1) }

// TestGuestResetResetsBackend: when the guest resets a device (status 0),
// the core sends RESET_DEVICE to a back-end that offers it, so the
// back-end's device state (a virtio-fs session, a console's ports) starts
// over as the guest's driver does. Before, only the rings were stopped.
func TestGuestResetResetsBackend(t *testing.T) {
	dev := &resetCounter{fakeDevice: fakeDevice{typ: 4, queues: 1}}
	d, drv := attachExternal(t, dev, "type=4")
	drv.start() // its first write is a reset
	before := dev.resets.Load()
	if before < 1 {
		t.Fatalf("the driver's first reset did not reach the back-end (%d resets)", before)
	}
	drv.reg(mmio.RegStatus, 0)
	deadline := time.Now().Add(5 * time.Second)
	for dev.resets.Load() == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := dev.resets.Load(); got != before+1 {
		t.Fatalf("back-end reset %d times after the guest's reset, want %d", got, before+1)
	}
	if err := d.dev.Failed(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
}
