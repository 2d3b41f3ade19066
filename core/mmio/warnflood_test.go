package mmio

import (
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestGuestWarningsSpaced: a guest that keeps writing FEATURES_OK with
// features that were not offered, or keeps giving up on the device, gets
// each refusal but one warning line in the host's log, not one per MMIO
// write. (From review: 10000 writes, 10000 lines.)
func TestGuestWarningsSpaced(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(r *rig)
		line  string
	}{
		{"features not offered", func(r *rig) {
			r.wr(RegStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
		}, "refused driver features"},
		{"driver gives up", func(r *rig) {
			r.wr(RegStatus, 0)
			r.wr(RegStatus, StatusAcknowledge|StatusFailed)
		}, "guest driver gave up"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := &syncbuf.Buffer{}
			log := hclog.New(&hclog.LoggerOptions{Output: buf, Level: hclog.Info})
			r := newRig(t, func(c *Config) { c.Log = log })
			r.wr(RegStatus, StatusAcknowledge|StatusDriver)
			r.wr(RegDriverFeatSel, 0)
			r.wr(RegDriverFeatures, 1<<20) // not offered
			r.wr(RegDriverFeatSel, 1)
			r.wr(RegDriverFeatures, 1) // VERSION_1
			const writes = 10000
			for range writes {
				tc.write(r)
			}
			if n := strings.Count(buf.String(), tc.line); n != 1 {
				t.Fatalf("%d guest writes produced %d %q lines in the host log, want 1", writes, n, tc.line)
			}
			if r.rd(RegStatus)&StatusFeaturesOK != 0 {
				t.Errorf("FEATURES_OK set with features that were not offered")
			}
		})
	}
}
