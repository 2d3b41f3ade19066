package vmm

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// TestPluginHandshakeTimeout: run --handshake-timeout sets the start-up
// limit of every plugin launch (an emulated host, where 60 s of guest time
// passed in a few seconds of the host's, timed a plugin out; CI run 22);
// a limit that is not positive is refused, and the default stays.
func TestPluginHandshakeTimeout(t *testing.T) {
	c := NewContext(hclog.NewNullLogger())
	if got := c.handshakeTimeout(); got != DefaultPluginHandshakeTimeout {
		t.Fatalf("default %v, want %v", got, DefaultPluginHandshakeTimeout)
	}
	for _, bad := range []time.Duration{0, -time.Second} {
		if err := c.SetPluginHandshakeTimeout(bad); err == nil {
			t.Errorf("SetPluginHandshakeTimeout(%v) accepted", bad)
		}
	}
	if got := c.handshakeTimeout(); got != DefaultPluginHandshakeTimeout {
		t.Fatalf("after refusals %v, want the default", got)
	}
	if err := c.SetPluginHandshakeTimeout(10 * time.Minute); err != nil {
		t.Fatal(err)
	}
	if got := c.handshakeTimeout(); got != 10*time.Minute {
		t.Fatalf("set 10m, got %v", got)
	}
}
