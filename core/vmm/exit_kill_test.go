package vmm

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
)

// TestCutOffVCPUErrorDoesNotRestartPlugin: stopVCPUs cuts the plugins off
// because a vCPU is stuck in a device call; that call then fails on the
// closed connection. The VM is going away: the transport's report
// (backendGone) must not wake the monitor, whose context is cancelled only
// once stopVCPUs returns, and which killed the plugin (no flush) and
// launched a new one at VM exit. (From review.)
func TestCutOffVCPUErrorDoesNotRestartPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d, drv := r.d, r.drv
	drv.post(0, 0, bytes.Repeat([]byte{0x11}, 512))
	drv.wait(1, 0, 10*time.Second)
	d.liveMu.Lock()
	p := d.plugin
	d.liveMu.Unlock()
	d.cutOff()                         // stopVCPUs after 1 s
	drv.reg(mmio.RegStatus, 0)         // the stuck vCPU's reset returns with ErrBroken
	time.Sleep(100 * time.Millisecond) // stopVCPUs' poll interval before cancel()
	select {
	case <-p.Done():
		t.Errorf("the plugin (pid %d) was killed at VM exit, before its graceful Shutdown", p.Pid())
	default:
	}
	if out := r.logs.String(); strings.Contains(out, "restarting it") {
		t.Errorf("the monitor restarts the plugin at VM exit:\n%s", out)
	}
}

// TestFailedDeviceIsNotRestarted: a device that failed (an Abandon whose
// plugin was not reaped within 5 s fails it, after Recover has already
// woken the monitor) gets no new plugins: each one's Resume could only
// return the device's failure, spending the restart budget with misleading
// log lines. Simulated with Fail followed by the report backendGone
// already made. (From review.)
func TestFailedDeviceIsNotRestarted(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d := r.d
	d.dev.Fail(errors.New("plugin (pid 1) still runs 5s after SIGKILL"))
	d.gone <- errors.New("SET_VRING_ENABLE: timeout")
	time.Sleep(1500 * time.Millisecond)
	if out := r.logs.String(); strings.Contains(out, "restarting it") {
		t.Errorf("the monitor launches plugins for a failed device:\n%s", out)
	}
}
