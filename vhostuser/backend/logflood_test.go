package backend_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestRefusedRequestsDoNotFloodTheLog: every request the back-end refused
// was logged at WARN, one line each. A refused SET_CONFIG is something a
// guest causes at will (the core forwards each config-space write of the
// guest to the plugin; a read-only field is refused by fs, net and blk
// alike), and the core re-logs the plugin's WARN lines at WARN, its
// default level: the host's log grew by one line per guest MMIO write.
// They are now spaced as the core spaces its own guest-caused lines
// (internal/ratelog). (From review.)
func TestRefusedRequestsDoNotFloodTheLog(t *testing.T) {
	deadline := time.Now().Add(30 * time.Second)
	dev := newTestDevice(1)
	h, _, _ := startGuest(t, dev, testguest.Options{})
	const writes = 2000
	for i := 0; i < writes; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("time limit after %d writes", i)
		}
		// Beyond the test device's config space: refused (nacked with
		// REPLY_ACK), the connection goes on.
		err := h.client.SetConfig(250, 0, []byte{1})
		if !errors.Is(err, frontend.ErrNacked) {
			t.Fatalf("write %d: %v, want a refusal", i, err)
		}
	}
	if warn := warnLines(h, "vhost-user request failed"); warn > 10 {
		t.Fatalf("%d refused SET_CONFIG requests made %d WARN lines; a front-end (a guest through the core) grows the host log without bound", writes, warn)
	}
}

// TestMalformedRequestsAcrossRestartsDoNotFloodTheLog: a ring logs its
// first malformed request only, but a guest restarts its rings at will (a
// driver reset) and sends one more each time: one WARN line per restart,
// without bound. The warnings are spaced across rings and restarts too.
func TestMalformedRequestsAcrossRestartsDoNotFloodTheLog(t *testing.T) {
	deadline := time.Now().Add(30 * time.Second)
	dev := newTestDevice(1)
	h, g, r := startGuest(t, dev, testguest.Options{})
	const restarts = 100
	for i := 0; i < restarts; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("time limit after %d restarts", i)
		}
		if _, err := r.Post([]testguest.Segment{{Addr: 1 << 40, Len: 64}, {Addr: 0x1000, Len: 16, Writable: true}}, "bad"); err != nil {
			t.Fatal(err)
		}
		r.Kick()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := r.Wait(ctx)
		cancel()
		if err != nil {
			t.Fatalf("restart %d: %v", i, err)
		}
		base, err := g.StopQueue(0)
		if err != nil {
			t.Fatalf("restart %d: stop: %v", i, err)
		}
		qs := r.Setup()
		qs.Base = uint16(base)
		if err := h.client.SetupQueue(qs, true); err != nil {
			t.Fatalf("restart %d: set-up: %v", i, err)
		}
	}
	if warn := warnLines(h, "malformed request"); warn == 0 || warn > 10 {
		t.Fatalf("%d rings with a malformed request made %d WARN lines, want 1 to 10", restarts, warn)
	}
}

// warnLines counts the back-end's WARN lines that contain msg.
func warnLines(h *harness, msg string) int {
	n := 0
	for _, l := range strings.Split(h.logs.String(), "\n") {
		if strings.Contains(l, "[WARN]") && strings.Contains(l, msg) {
			n++
		}
	}
	return n
}
