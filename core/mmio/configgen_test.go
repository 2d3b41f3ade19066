package mmio

import (
	"encoding/binary"
	"testing"
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
