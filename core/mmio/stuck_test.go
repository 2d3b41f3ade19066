package mmio

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestConfigChangedRefreshes: a config change re-reads the config space
// from the back-end; the guest then reads the new bytes.
func TestConfigChangedRefreshes(t *testing.T) {
	r := newRig(t, nil)
	st := r.negotiate(featureVersion1)
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegStatus, st|StatusDriverOK)
	r.b.config[6] = 0 // link down, say
	r.d.ConfigChanged()
	b := make([]byte, 2)
	r.d.Read(RegConfig+6, b)
	if b[0] != 0 || b[1] != 8 {
		t.Fatalf("config after the change % x", b)
	}
	// A back-end that cannot answer the refresh fails the device.
	r.b.fail = errors.New("plugin gone")
	r.d.ConfigChanged()
	if !errors.Is(r.d.Failed(), ErrFailed) {
		t.Fatalf("Failed() = %v", r.d.Failed())
	}
}

// stuckPlugin is a vhost-user back-end that reads requests and never
// answers: a plugin hung in a loop, or stopped.
func stuckPlugin(t *testing.T, timeout time.Duration) *frontend.Client {
	t.Helper()
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	go func() {
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			m.CloseFiles()
		}
	}()
	c := frontend.New(a)
	c.SetTimeout(timeout)
	c.SetStopTimeout(timeout)
	t.Cleanup(func() { c.Close() })
	// As the core does: requests without a reply body are acknowledged
	// (this one itself is not).
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfig); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStuckPlugin: a plugin that never answers (GET_CONFIG or anything
// else) does not stall the guest's vCPU beyond the deadline. Config reads
// never wait for it; a config change refresh waits off the vCPU and
// without the device lock; the vCPU's own calls (features, config writes)
// fail after the deadline and the device fails.
//
// The deadline is 1 s, not 200 ms: the accesses that must not wait at all
// are bounded by half of it, and 100 ms is a time a loaded machine (make
// race beside other packages' tests) can take for a call that never
// waits; the ones that wait it out get two deadlines of slack, not 400 ms.
func TestStuckPlugin(t *testing.T) {
	const deadline = time.Second
	cfgData := []byte{0x52, 0x54, 0, 1, 2, 3, 1, 0}
	newStuck := func(t *testing.T) *rig {
		c := stuckPlugin(t, deadline)
		return newRig(t, func(cfg *Config) {
			cfg.Backend = c
			cfg.ConfigData = cfgData
		})
	}
	// vcpu runs one guest access the way a vCPU thread does and returns
	// how long it took.
	vcpu := func(f func()) time.Duration {
		start := time.Now()
		f()
		return time.Since(start)
	}

	t.Run("config reads", func(t *testing.T) {
		r := newStuck(t)
		b := make([]byte, len(cfgData))
		if d := vcpu(func() { r.d.Read(RegConfig, b) }); d > deadline/2 {
			t.Fatalf("config read took %v", d)
		}
		if !bytes.Equal(b, cfgData) {
			t.Fatalf("config read % x, want % x", b, cfgData)
		}
	})
	t.Run("config change refresh", func(t *testing.T) {
		r := newStuck(t)
		done := make(chan struct{})
		go func() { r.d.ConfigChanged(); close(done) }()
		time.Sleep(deadline / 4) // the refresh is waiting for the plugin
		b := make([]byte, 4)
		if d := vcpu(func() { r.d.Read(RegConfig, b); r.rd(RegStatus) }); d > deadline/2 {
			t.Fatalf("guest access during the refresh took %v", d)
		}
		select {
		case <-done:
		case <-time.After(10 * deadline):
			t.Fatal("the refresh did not give up after the deadline")
		}
		if !errors.Is(r.d.Failed(), ErrFailed) {
			t.Fatalf("device not failed: %v", r.d.Failed())
		}
	})
	t.Run("features", func(t *testing.T) {
		r := newStuck(t)
		var st uint32
		if d := vcpu(func() { st = r.negotiate(featureVersion1) }); d > 3*deadline {
			t.Fatalf("FEATURES_OK write took %v", d)
		}
		if st&StatusFeaturesOK != 0 {
			t.Fatal("features accepted by a plugin that never answered")
		}
		if r.rd(RegStatus)&StatusDeviceNeedsRst == 0 || !errors.Is(r.d.Failed(), ErrFailed) {
			t.Fatal("device not failed")
		}
		// Later accesses do not wait for the plugin again.
		if d := vcpu(func() { r.negotiate(featureVersion1) }); d > deadline/2 {
			t.Fatalf("access after the failure took %v", d)
		}
	})
	t.Run("config write", func(t *testing.T) {
		r := newStuck(t)
		if d := vcpu(func() { r.d.Write(RegConfig, []byte{1}) }); d > 3*deadline {
			t.Fatalf("config write took %v", d)
		}
		if !errors.Is(r.d.Failed(), ErrFailed) {
			t.Fatal("device not failed")
		}
	})
}

// TestConfigWithoutData: without the config bytes from Configure, New reads
// ConfigSize bytes once (not on a vCPU thread) and serves from them; with
// neither, reads are forwarded as they come (a back-end whose config size
// the core does not know).
func TestConfigWithoutData(t *testing.T) {
	r := newRig(t, func(c *Config) { c.ConfigData, c.ConfigSize = nil, 12 })
	if len(r.b.calls) != 1 || r.b.calls[0] != "GetConfig 0 12" {
		t.Fatalf("calls at New: %v", r.b.calls)
	}
	r.b.calls = nil
	b := make([]byte, 4)
	r.d.Read(RegConfig+4, b)
	if !bytes.Equal(b, []byte{5, 6, 7, 8}) || len(r.b.calls) != 0 {
		t.Fatalf("read % x, calls %v", b, r.b.calls)
	}
	r2 := newRig(t, func(c *Config) { c.ConfigData = nil })
	r2.d.Read(RegConfig+4, b)
	if !bytes.Equal(b, []byte{5, 6, 7, 8}) || len(r2.b.calls) != 1 {
		t.Fatalf("forwarded read % x, calls %v", b, r2.b.calls)
	}
}

// TestAbandonRules: when the back-end is abandoned (killed before the
// driver reuses rings it may still serve) and when it is not.
func TestAbandonRules(t *testing.T) {
	gone := fmt.Errorf("GET_VRING_BASE: %w", frontend.ErrTimeout)
	for _, tc := range []struct {
		name       string
		abandonErr error         // what Abandon returns
		budget     time.Duration // Config.StopBudget
		stopDelay  time.Duration
		stopFail   error
		act        func(r *rig)
		// want: Abandon's reasons in order (errors.Is), GetVringBase calls,
		// and the device's state after.
		abandons  []error
		ringStops int
		suspended bool
		failed    bool
	}{
		{name: "failed stop abandons, then the device waits", stopFail: gone,
			act:      func(r *rig) { r.wr(RegStatus, 0) },
			abandons: []error{frontend.ErrTimeout}, ringStops: 0, suspended: true},
		{name: "back-end that outlives the kill fails the device", stopFail: gone, abandonErr: errors.New("still runs"),
			act:      func(r *rig) { r.wr(RegStatus, 0) },
			abandons: []error{frontend.ErrTimeout}, failed: true},
		{name: "suspend abandons", act: func(r *rig) { r.d.Suspend(); r.wr(RegStatus, 0) },
			abandons: []error{ErrReplaced}, suspended: true},
		{name: "suspend of a back-end that outlives the kill fails", abandonErr: errors.New("still runs"),
			act:      func(r *rig) { r.d.Suspend() },
			abandons: []error{ErrReplaced}, failed: true},
		{name: "close does not abandon", stopFail: gone,
			act: func(r *rig) { r.d.Close() }},
		{name: "clean reset does not abandon", act: func(r *rig) { r.wr(RegStatus, 0) }, ringStops: 2},
		{name: "stop budget spent abandons the queues left", budget: 30 * time.Millisecond, stopDelay: 60 * time.Millisecond,
			act:      func(r *rig) { r.wr(RegStatus, 0) },
			abandons: []error{frontend.ErrTimeout}, ringStops: 1, suspended: true},
		{name: "stop budget not spent", budget: time.Second, stopDelay: 10 * time.Millisecond,
			act: func(r *rig) { r.wr(RegStatus, 0) }, ringStops: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var reasons []error
			r := newRig(t, func(c *Config) {
				c.Recover = func(error) bool { return true }
				c.StopBudget = tc.budget
				c.Abandon = func(why error) error {
					reasons = append(reasons, why)
					return tc.abandonErr
				}
			})
			st := r.negotiate(featureVersion1)
			r.wr(RegStatus, st|StatusDriverOK)
			r.setupQueue(0, 128, 0x10000, 0x11000, 0x12000)
			r.setupQueue(1, 128, 0x20000, 0x21000, 0x22000)
			r.b.calls = nil
			r.b.stopFail, r.b.stopDelay = tc.stopFail, tc.stopDelay
			tc.act(r)
			if len(reasons) != len(tc.abandons) {
				t.Fatalf("Abandon called with %v, want %d calls (back-end calls %v)", reasons, len(tc.abandons), r.b.calls)
			}
			for i, want := range tc.abandons {
				if !errors.Is(reasons[i], want) {
					t.Errorf("Abandon #%d: %v, want %v", i, reasons[i], want)
				}
			}
			stops := 0
			for _, c := range r.b.calls {
				if strings.HasPrefix(c, "GetVringBase") {
					stops++
				}
			}
			if tc.stopFail == nil && stops != tc.ringStops {
				t.Errorf("%d ring stops asked of the back-end, want %d: %v", stops, tc.ringStops, r.b.calls)
			}
			if got := r.d.Suspended(); got != tc.suspended {
				t.Errorf("suspended %v, want %v", got, tc.suspended)
			}
			if got := r.d.Failed() != nil; got != tc.failed {
				t.Errorf("failed %v (%v), want %v", got, r.d.Failed(), tc.failed)
			}
		})
	}
}
