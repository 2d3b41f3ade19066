package console

import (
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestControlFailuresLoggedOnce: each DEVICE_READY 0 (or PORT_READY 0) control
// message from the guest writes a WARN line to the host log. A guest that
// sends them in a loop floods the host's log at its own pace; elsewhere
// (the ring engine's malformed requests) only the first is logged and the
// rest are counted.
func TestControlFailuresLoggedOnce(t *testing.T) {
	logs := &syncbuf.Buffer{}
	d, err := New(Config{Name: "krun.stdio", Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	if err != nil {
		t.Fatal(err)
	}
	const n = 1000
	for i := 0; i < n; i++ {
		d.control(0, evDeviceReady, 0) // the guest's control transmitq message
	}
	d.control(0, evDeviceReady, 1)
	for i := 0; i < n; i++ {
		d.control(0, evPortReady, 0)
	}
	if lines := strings.Count(logs.String(), "\n"); lines != 1 {
		t.Fatalf("%d failed set-ups reported by the guest wrote %d host log lines, want 1:\n%s", 2*n, lines, logs)
	}
	if got := d.stats.BadControl.Load(); got != 2*n {
		t.Errorf("bad_control = %d, want %d", got, 2*n)
	}
}
