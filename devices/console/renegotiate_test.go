package console

import (
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestFeatureNegotiationWarningNotFlooded: a guest driver that resets the
// device and negotiates features without MULTIPORT, in a loop, gets one
// WARN line in the host's log in all, like the failed set-ups
// (TestControlFailuresLoggedOnce); it got one per round before (from
// review).
func TestFeatureNegotiationWarningNotFlooded(t *testing.T) {
	logs := &syncbuf.Buffer{}
	d, err := New(Config{Name: "krun.stdio", Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	if err != nil {
		t.Fatal(err)
	}
	const n = 1000
	for i := 0; i < n; i++ {
		d.Reset()              // the driver resets the device (status 0)
		d.SetFeatures(1 << 32) // VERSION_1 only: no MULTIPORT
	}
	if lines := strings.Count(logs.String(), "\n"); lines > 1 {
		t.Fatalf("%d renegotiations by the guest wrote %d host WARN lines", n, lines)
	}
}
