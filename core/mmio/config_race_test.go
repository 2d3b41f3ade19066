package mmio

import "testing"

// racingBackend answers GET_CONFIG with the config space as it was when
// the request went out, and lets a guest access land before the answer
// comes back: what a vCPU's config write does while a config-change
// refresh (ConfigChanged, off the device lock) waits for its reply.
type racingBackend struct {
	*fakeBackend
	during func()
	always bool // during runs at every GET_CONFIG, not only the first
	reads  int
}

func (b *racingBackend) GetConfig(offset, size uint32) ([]byte, error) {
	b.reads++
	p, err := b.fakeBackend.GetConfig(offset, size)
	if f := b.during; f != nil {
		if !b.always {
			b.during = nil
		}
		f()
	}
	return p, err
}

// TestConfigWriteDuringRefresh: a guest config write that lands while a
// config-change refresh waits for the back-end is not undone by the
// refresh's older bytes: the guest reads back what it wrote, as the
// back-end holds it.
func TestConfigWriteDuringRefresh(t *testing.T) {
	tests := []struct {
		name     string
		driverOK bool
		always   bool // the guest writes during every read
		want0    byte // what config byte 0 reads afterwards
	}{
		{"before DRIVER_OK", false, false, 0x40},
		{"after DRIVER_OK", true, false, 0x40},
		// A guest that writes without pause keeps its bytes (the
		// back-end's change is missed), after a bounded number of
		// reads, and is still told of a change.
		{"guest writing without pause", true, true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var rb *racingBackend
			r := newRig(t, func(c *Config) {
				rb = &racingBackend{fakeBackend: c.Backend.(*fakeBackend)}
				c.Backend = rb
			})
			st := r.negotiate(featureVersion1)
			if tt.driverOK {
				r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
				r.wr(RegStatus, st|StatusDriverOK)
			}
			r.b.config[0] = 0x40 // the back-end's own change
			rb.during = func() { r.d.Write(RegConfig+4, []byte{0xee}) }
			rb.always = tt.always
			gen := r.rd(RegConfigGeneration)
			r.d.ConfigChanged()
			if rb.reads > configRefreshTries {
				t.Errorf("%d reads of the config space for one change", rb.reads)
			}
			if tt.driverOK && (r.rd(RegConfigGeneration) == gen || r.rd(RegInterruptStatus)&IntConfig == 0) {
				t.Error("the guest was not told of the change")
			}
			if r.b.config[4] != 0xee {
				t.Fatalf("back-end config byte 4 = %#x: the write did not reach it", r.b.config[4])
			}
			b := make([]byte, 1)
			for _, w := range []struct {
				off  uint64
				want byte
			}{{0, tt.want0}, {4, 0xee}} {
				r.d.Read(RegConfig+w.off, b)
				if b[0] != w.want {
					t.Errorf("config byte %d reads %#x, want %#x", w.off, b[0], w.want)
				}
			}
		})
	}
}
