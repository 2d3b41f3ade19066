package mmio

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestConfigGenerationBeforeDriverOK: when the config space copy changes
// before DRIVER_OK (a change the back-end reports, the core's override
// while the back-end is replaced), ConfigGeneration moves; it stayed. A
// driver reads a 64-bit field (virtio-blk's capacity, during probe, before
// DRIVER_OK) as two 32-bit reads between two generation reads (Linux's
// __virtio_cread_many); a change between them must move the generation
// (virtio 1.2, 4.2.2.1), or the driver keeps a torn value (from review,
// helper-75).
func TestConfigGenerationBeforeDriverOK(t *testing.T) {
	tests := []struct {
		name   string
		change func(r *rig)
	}{
		{"back-end reports a change", func(r *rig) {
			binary.LittleEndian.PutUint64(r.b.config, 0x0000000200000002)
			r.d.ConfigChanged()
		}},
		{"core overrides the config", func(r *rig) {
			r.d.OverrideConfig(0, []byte{2, 0, 0, 0, 2, 0, 0, 0})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t, nil)
			binary.LittleEndian.PutUint64(r.b.config, 0x0000000100000001)
			r.d.OverrideConfig(0, r.b.config[:8]) // copy == back-end
			r.negotiate(featureVersion1)          // FEATURES_OK, no DRIVER_OK yet
			gen0 := r.rd(RegConfigGeneration)
			lo := r.rd(RegConfig)
			tt.change(r) // between the two halves
			hi := r.rd(RegConfig + 4)
			gen1 := r.rd(RegConfigGeneration)
			v := uint64(hi)<<32 | uint64(lo)
			if gen0 == gen1 && v != 0x0000000100000001 && v != 0x0000000200000002 {
				t.Fatalf("config changed under the driver without a new generation (%d): it reads the torn value %#x", gen0, v)
			}
		})
	}
}

// resetRefuser is a back-end that refuses RESET_DEVICE.
type resetRefuser struct{ *fakeBackend }

func (resetRefuser) ResetDeviceWithin(time.Duration) error { return errors.New("RESET_DEVICE refused") }

// TestRefusedResetWarningsSpacedOut: a guest that resets its device in a
// loop against a back-end that refuses RESET_DEVICE gets its warning
// logged spaced out, as its other warnings, not once per reset (from
// review, helper-75).
func TestRefusedResetWarningsSpacedOut(t *testing.T) {
	var logs syncbuf.Buffer
	var b *fakeBackend
	r := newRig(t, func(c *Config) {
		b = c.Backend.(*fakeBackend)
		c.Backend = resetRefuser{b}
		c.ResetBackend = true
		c.Log = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	})
	for range 50 {
		st := r.negotiate(featureVersion1)
		r.wr(RegStatus, st|StatusDriverOK)
		r.wr(RegStatus, 0) // reset
	}
	if n := strings.Count(logs.String(), "did not reset its device state"); n < 1 || n > 2 {
		t.Errorf("%d warnings for 50 refused resets, want 1 (spaced out):\n%s", n, logs.String())
	}
}
