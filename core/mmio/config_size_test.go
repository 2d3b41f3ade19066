package mmio

import (
	"bytes"
	"strings"
	"testing"
)

// wrongSizeConfig is a back-end whose GET_CONFIG answers with n bytes,
// whatever was asked (frontend.Client refuses such a reply, but Backend
// is an interface, and the device must not depend on that).
type wrongSizeConfig struct {
	*fakeBackend
	n int
}

func (b *wrongSizeConfig) GetConfig(offset, size uint32) ([]byte, error) {
	b.log("GetConfig %d %d", offset, size)
	return bytes.Repeat([]byte{0xee}, b.n), nil
}

// TestConfigOfTheWrongSize: a config space read from the back-end of
// another size than asked (none, short, longer than the whole config
// window) is refused at New and at Resume, fails the device at a
// ConfigChanged, and never reaches past the guest's access in a
// forwarded read.
func TestConfigOfTheWrongSize(t *testing.T) {
	for _, n := range []int{0, 1, 11, 13, ConfigSpaceMax + 1, 4096} {
		b := &wrongSizeConfig{fakeBackend: &fakeBackend{}, n: n}
		base := Config{DeviceID: 2, Base: testBase, GSI: testGSI, NumQueues: 1, QueueSizeMax: 256, ConfigSpace: true,
			Backend: b, Wiring: &fakeWiring{ioevents: map[string]bool{}, irqfds: map[string]bool{}}, Translate: translate}

		cfg := base
		cfg.ConfigSize = 12
		if d, err := New(cfg); err == nil || !strings.Contains(err.Error(), "config space") {
			if d != nil {
				d.Close()
			}
			t.Errorf("%d bytes: New with a config space of %d bytes for 12: %v", n, n, err)
		}

		r := newRig(t, func(c *Config) { c.Backend = b })
		r.d.ConfigChanged()
		if err := r.d.Failed(); err == nil || !strings.Contains(err.Error(), "config space") {
			t.Errorf("%d bytes: ConfigChanged with a config space of %d bytes for 12: %v", n, n, err)
		}

		// Forwarded reads: no copy, a read of each width at the end of
		// the window.
		cfg = base
		d, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range []int{1, 2, 4, 8} {
			buf := make([]byte, w+8)
			d.Read(RegConfig+ConfigSpaceMax-uint64(w), buf[:w])
			if !bytes.Equal(buf[w:], make([]byte, 8)) {
				t.Errorf("%d bytes: a %d-byte read wrote past its buffer: % x", n, w, buf)
			}
		}
		d.Close()

		// Resume re-reads the copy.
		r = newRig(t, func(c *Config) {
			c.Backend = &fakeBackend{config: make([]byte, 12)}
			c.Recover = func(error) bool { return true }
		})
		r.d.Suspend()
		if err := r.d.Resume(b, func(uint64) (uint16, error) { return 0, nil }); err == nil || !strings.Contains(err.Error(), "config space") {
			t.Errorf("%d bytes: Resume with a config space of %d bytes for 12: %v", n, n, err)
		}
	}
}
