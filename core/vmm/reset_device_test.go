package vmm

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
)

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
	sock := serveFake(t, dev)
	c := NewContext(nil)
	d, err := c.connectExternal(context.Background(), 0, externalSpec(t, "type=4,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	m := newDeviceMachine(t, c.log, []*pluginDevice{d})
	if err := m.attachDevices(); err != nil {
		t.Fatal(err)
	}
	defer m.shutdownDevices()
	drv := &ringDriver{t: t, mem: m.mem, dev: d.dev}
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
