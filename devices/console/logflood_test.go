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
	d, logs := loggedDevice(t)
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

// TestFeatureNegotiationWarningNotFlooded: a guest driver that resets the
// device and negotiates features without MULTIPORT, in a loop, gets one
// WARN line in the host's log in all, like the failed set-ups above; it
// got one per round before (from review).
func TestFeatureNegotiationWarningNotFlooded(t *testing.T) {
	d, logs := loggedDevice(t)
	const n = 1000
	for i := 0; i < n; i++ {
		d.Reset()              // the driver resets the device (status 0)
		d.SetFeatures(1 << 32) // VERSION_1 only: no MULTIPORT
	}
	if lines := strings.Count(logs.String(), "\n"); lines > 1 {
		t.Fatalf("%d renegotiations by the guest wrote %d host WARN lines", n, lines)
	}
}

// loggedDevice is a console device logging at info level into the
// returned buffer.
func loggedDevice(t *testing.T) (*Device, *syncbuf.Buffer) {
	t.Helper()
	logs := &syncbuf.Buffer{}
	d, err := New(Config{Name: "krun.stdio", Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	if err != nil {
		t.Fatal(err)
	}
	return d, logs
}
