package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
)

// TestQueueRemadeWhileSuspended: queue 0 has served a request
// (its part of the inflight region says used_idx 1). The plugin hangs;
// while the core waits to restart it (the device is suspended) the guest
// takes queue 0 down (QueueReady 0), lays out a fresh ring and makes the
// queue ready again: to the guest a new, empty queue. A clean stop
// (GET_VRING_BASE) would have left the queue's part of the region
// uninitialized; while suspended the core only recorded the stop and handed
// the old part to the new plugin, which refused the ring ("inflight region
// inconsistent: used index 0 in guest memory, 1 in the region") at every
// restart until the budget is spent: the device failed for good. The
// core now forgets the queue's part of the region when the queue stops
// without its plugin; the guest's first request on its new ring must
// complete. (From review.)
func TestQueueRemadeWhileSuspended(t *testing.T) {
	r := servedRig(t)
	d, drv := r.d, r.drv

	// The plugin hangs (the transport then finds it gone, below).
	stopProcess(t, r.pid)

	toggle := func() {
		// The guest, while the device is suspended: queue 0 down, a
		// fresh ring, queue 0 up.
		drv.reg(mmio.RegQueueSel, 0)
		drv.reg(mmio.RegQueueReady, 0)
		drv.put(rdDesc, make([]byte, 16*rdQueueSize))
		drv.put(rdAvail, make([]byte, 6+2*rdQueueSize))
		drv.put(rdUsed, make([]byte, 6+8*rdQueueSize))
		drv.reg(mmio.RegQueueReady, 1)
		drv.avail, drv.used = 0, 0
	}
	toggled := make(chan struct{})
	var once sync.Once
	d.backoff = func(ctx context.Context, delay time.Duration) bool {
		once.Do(func() { toggle(); close(toggled) })
		return sleepCtx(ctx, delay)
	}
	d.backendGone(errors.New("vhost-user call timed out")) // as the transport reports a hung plugin
	select {
	case <-toggled:
	case <-time.After(30 * time.Second):
		t.Fatal("no restart")
	}
	deadline := time.Now().Add(30 * time.Second)
	for d.dev.Suspended() && d.dev.Failed() == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if err := d.dev.Failed(); err != nil {
		t.Fatalf("device failed after the guest re-made its queue during a restart: %v", err)
	}
	if u := drv.idx(rdUsed + 2); u != 0 {
		t.Errorf("the new, empty ring has used index %d: the new plugin completed head(s) the guest never offered on it (used[0].id=%d)",
			u, binary.LittleEndian.Uint32(drv.get(rdUsed+4, 4)))
	}
	// The guest's first request on its new ring.
	drv.post(0, 16, bytes.Repeat([]byte{0x33}, 512))
	deadline = time.Now().Add(5 * time.Second)
	for drv.idx(rdUsed+2) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	u := drv.idx(rdUsed + 2)
	id := binary.LittleEndian.Uint32(drv.get(rdUsed+4, 4))
	if u == 0 {
		t.Fatal("the guest's first request on its new ring never completed (the plugin's next available index skipped it)")
	}
	if id != 0 {
		t.Errorf("first completion on the new ring is head %d; the guest offered head 0", id)
	}
}

// TestStopOfHungPluginKillsItFirst: the guest resets a device whose plugin
// hangs (SIGSTOP: it never answers GET_VRING_BASE). When the stop gives
// up, the plugin must already be dead when the reset returns to the guest:
// the driver reuses the rings' memory at once, and a plugin that was only
// slow would otherwise go on writing it. Before, the monitor killed it
// later, on its own goroutine. (From review.)
func TestStopOfHungPluginKillsItFirst(t *testing.T) {
	r := servedRig(t)
	d, drv := r.d, r.drv
	// Hold the restart in its back-off, so that only the reset can have
	// killed the plugin by the time it returns.
	hold := make(chan struct{})
	defer close(hold)
	d.backoff = func(ctx context.Context, delay time.Duration) bool {
		select {
		case <-hold:
		case <-ctx.Done():
		}
		return false
	}
	d.liveMu.Lock()
	p := d.plugin
	d.liveMu.Unlock()
	d.client.SetStopTimeout(300 * time.Millisecond) // frontend.DefaultStopTimeout in production
	stopProcess(t, r.pid)
	start := time.Now()
	drv.reg(mmio.RegStatus, 0) // the guest resets the device
	took := time.Since(start)
	select {
	case <-p.Done():
	default:
		t.Fatalf("the reset returned after %v with the hung plugin (pid %d) still running", took, r.pid)
	}
	if took > 10*time.Second {
		t.Errorf("the reset held the vCPU %v", took)
	}
}

// TestCutOffThenShutdownLetsPluginFlush: at VM exit stopVCPUs cuts every
// device's connection off when a vCPU does not stop (cutOff); shutdown
// then closes the transport, whose queue stops fail on the closed
// connection. The guest no longer runs, so nothing is abandoned: the
// plugin gets its graceful Shutdown (a flush). Before, every plugin was
// killed first. (From review.)
func TestCutOffThenShutdownLetsPluginFlush(t *testing.T) {
	r := servedRig(t)
	d := r.d
	d.cutOff()    // what stopVCPUs does after 1 s
	d.dev.Close() // shutdown's first step
	if out := r.logs.String(); strings.Contains(out, "killing the plugin") {
		t.Errorf("shutdown after the cut-off killed the plugin instead of shutting it down:\n%s", out)
	}
	select {
	case <-d.plugin.Done():
		t.Error("the plugin was gone before its Shutdown")
	default:
	}
}

// TestSuspendKillsTheOldPlugin: once the device is suspended (monitor's
// recover, or a vCPU call that found the plugin gone) a queue stop or a
// reset no longer asks the plugin, so the old plugin must be dead by then:
// a reset returning in the window before the monitor's dropPlugin left it
// running with the rings the driver reuses. (From review.)
func TestSuspendKillsTheOldPlugin(t *testing.T) {
	r := servedRig(t)
	d, drv := r.d, r.drv
	d.liveMu.Lock()
	p := d.plugin
	d.liveMu.Unlock()
	d.dev.Suspend()            // monitor.recover's first step
	drv.reg(mmio.RegStatus, 0) // the guest resets before dropPlugin ran
	select {
	case <-p.Done():
	default:
		t.Errorf("guest reset returned while the old plugin (pid %d) still runs and maps the rings", p.Pid())
	}
}

// servedRig is a restart rig (3 restarts an hour) whose queue 0 has served
// one request.
func servedRig(t *testing.T) *restartRig {
	t.Helper()
	if testing.Short() {
		t.Skip("builds a plugin")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	r.drv.post(0, 0, bytes.Repeat([]byte{0x11}, 512))
	r.drv.wait(1, 0, 10*time.Second)
	return r
}

// stopProcess sends SIGSTOP to pid and waits until every thread of it is
// stopped: kill returns before the signal takes effect, and a plugin
// thread already running on another CPU can answer one more request in
// that window (seen on a loaded CI machine: a "hung" plugin answered the
// reset's GET_VRING_BASE).
func stopProcess(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		running, err := runningThreads(pid)
		if err != nil {
			t.Fatal(err)
		}
		if running == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: %d thread(s) still not stopped 10 s after SIGSTOP", pid, running)
		}
		time.Sleep(time.Millisecond)
	}
}

// runningThreads counts pid's threads whose state is not "T (stopped)".
func runningThreads(pid int) (int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			continue // the thread exited
		}
		// pid (comm) state ...: comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 || i+2 >= len(s) {
			return 0, fmt.Errorf("%s/%s/stat: unexpected %q", dir, task.Name(), s)
		}
		if s[i+2] != 'T' {
			n++
		}
	}
	return n, nil
}
