package vmm

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
)

// TestGuestBrokenRingNeedsReset: a guest whose driver breaks a ring (its
// available index moves by more than the queue's size) gets a device that
// needs a reset (DEVICE_NEEDS_RESET and a config-change interrupt), not a
// restarted plugin: the blk-raw plugin stops the ring and signals its
// error eventfd, and stays healthy, so the core tells the guest instead of
// replacing a plugin that would read the same ring. After the driver's
// reset the disk serves again, from the same plugin.
func TestGuestBrokenRingNeedsReset(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d, drv := r.d, r.drv

	a := bytes.Repeat([]byte{0x5a}, 512)
	drv.post(0, 0, a)
	drv.wait(1, 0, 10*time.Second)

	gen := drv.rd(mmio.RegConfigGeneration)
	drv.setIdx(rdAvail+2, drv.avail+3*rdQueueSize)
	drv.reg(mmio.RegQueueNotify, 0)

	deadline := time.Now().Add(20 * time.Second)
	for drv.rd(mmio.RegStatus)&mmio.StatusDeviceNeedsRst == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("status %#x 20 s after the guest broke its ring: no DEVICE_NEEDS_RESET", drv.rd(mmio.RegStatus))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if drv.rd(mmio.RegInterruptStatus)&mmio.IntConfig == 0 || drv.rd(mmio.RegConfigGeneration) == gen {
		t.Error("no config-change interrupt with DEVICE_NEEDS_RESET")
	}
	if err := d.dev.Failed(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
	if got := d.plugin.Pid(); got != r.pid {
		t.Fatalf("plugin replaced (pid %d, was %d): a ring the guest broke is not the plugin's failure", got, r.pid)
	}
	if logs := r.logs.String(); strings.Contains(logs, "restarting it") {
		t.Fatal("the core restarted the plugin for a ring the guest broke")
	}

	// The driver resets the device and lays its ring out afresh.
	drv.put(rdAvail, make([]byte, 4+2*rdQueueSize))
	drv.put(rdUsed, make([]byte, 4+8*rdQueueSize))
	drv.avail = 0
	drv.start()
	if st := drv.rd(mmio.RegStatus); st&mmio.StatusDeviceNeedsRst != 0 {
		t.Fatalf("status %#x after the driver's reset", st)
	}
	b := bytes.Repeat([]byte{0xa5}, 512)
	drv.post(1, 1, b)
	drv.wait(1, 1, 10*time.Second)
	drv.readBack(2, 1, 2, b, 10*time.Second)
	if got := d.plugin.Pid(); got != r.pid {
		t.Fatalf("plugin replaced (pid %d, was %d)", got, r.pid)
	}
}

// TestPanickedRingRestartsPlugin: a ring that fails because the plugin's
// device panicked is the plugin's failure, not the guest's: the plugin
// reports itself failed before it signals the ring's error eventfd, so the
// core restarts it (the request replayed) and the device does not need a
// reset. At once, on the error eventfd: the core asks for the plugin's
// health no other way meanwhile (the test's health interval is an hour;
// with the 2 s poll the test passed without the error eventfds too).
func TestPanickedRingRestartsPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	was := healthInterval
	t.Cleanup(func() { healthInterval = was }) // after the rig's, which stop the monitor
	healthInterval = time.Hour
	r := newRestartRigOf(t, "./testdata/paniconce", pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d, drv := r.d, r.drv

	a := bytes.Repeat([]byte{0x3c}, 512)
	drv.post(0, 0, a) // the plugin panics on it; its successor serves it
	drv.wait(1, 0, 30*time.Second)
	if st := drv.rd(mmio.RegStatus); st&mmio.StatusDeviceNeedsRst != 0 {
		t.Fatalf("status %#x: a plugin's panic made the guest's device need a reset", st)
	}
	if err := d.dev.Failed(); err != nil {
		t.Fatalf("device failed: %v", err)
	}
	if m := restartedPidRE.FindStringSubmatch(r.logs.String()); m == nil {
		t.Fatal("the plugin was not restarted after its ring panicked")
	}
	drv.readBack(1, 0, 2, a, 10*time.Second)
}
