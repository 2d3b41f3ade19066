package vmm

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/pluginhost"
)

// TestRestartAfterFailedConfigure: a restart attempt whose plugin fails
// Configure (a bad image the dead plugin left, a Configure RPC that timed
// out on a loaded host) must leave the device's DeviceInfo intact, so that
// the next attempt, which succeeds, can compare the new plugin's device
// with the old one. Configure's (nil, err) result was assigned to d.info,
// and the next attempt's restart dereferenced the nil "old" info: the
// monitor goroutine panicked and the whole core died (from review,
// helper-76).
func TestRestartAfterFailedConfigure(t *testing.T) {
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 5, Window: time.Hour})
	d := r.d
	attempt := 0
	d.backoff = func(ctx context.Context, delay time.Duration) bool {
		attempt++
		switch attempt {
		case 1: // the first restart's plugin refuses its options
			d.opened.Options["bogus-option"] = "x"
		case 2: // the second one is fine
			delete(d.opened.Options, "bogus-option")
		}
		return sleepCtx(ctx, delay)
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if d.dev.Failed() != nil {
			t.Fatalf("device failed: %v", d.dev.Failed())
		}
		if restartedPidRE.MatchString(r.logs.String()) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not restarted within a minute:\n%s", r.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRestartRefusesOtherDeviceEveryTime: a restarted plugin that serves
// another device than the one the guest was given (here 2 queues instead
// of the 8 of the first plugin; a different device type is checked the
// same way) is refused, on every attempt: restart stored the refused
// plugin's DeviceInfo in d.info before comparing, so the next attempt
// compared the new plugin with the refused one, and accepted it (from
// review, helper-76).
func TestRestartRefusesOtherDeviceEveryTime(t *testing.T) {
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d := r.d
	first := *d.info
	d.backoff = func(ctx context.Context, delay time.Duration) bool {
		d.opened.Options["queues"] = "2" // every successor serves 2 queues
		return sleepCtx(ctx, delay)
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for d.dev.Failed() == nil {
		if restartedPidRE.MatchString(r.logs.String()) {
			t.Fatalf("the device (%d queues) resumed on a plugin serving %d queues; restart accepted it after refusing it once:\n%s",
				first.NumQueues, 2, r.logs.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("neither failed nor restarted within a minute:\n%s", r.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRestartStopsOnceTheDeviceFailed: a restart attempt after which the
// device has failed (a Resume that failed and could not abandon the new
// plugin fails it) is the last: the device lets no plugin in any more,
// and the loop went on launching and killing one per attempt until the
// restart budget ran out (from review, helper-148).
func TestRestartStopsOnceTheDeviceFailed(t *testing.T) {
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 5, Window: time.Hour})
	d := r.d
	attempts := 0
	d.backoff = func(ctx context.Context, delay time.Duration) bool {
		attempts++
		if attempts == 1 {
			d.dev.Fail(errors.New("the test fails the device, as a Resume that could not abandon its back-end does"))
		}
		return sleepCtx(ctx, delay)
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(r.logs.String(), "not restarted again") {
		if time.Now().After(deadline) {
			t.Fatalf("no end of the restarts within a minute (%d attempts):\n%s", attempts, r.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // an attempt more would be under way
	if attempts != 1 {
		t.Errorf("%d restart attempts, want 1: the device had failed after the first", attempts)
	}
}
