package vmm

import (
	"testing"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestResetWhileReplacingBackend (from review): restart() publishes the
// new plugin's client (setClient) before Reattach sets it up. A guest
// reset in that window sent RESET_DEVICE on the new, not yet negotiated
// connection; the back-end refused it by closing the session, and the
// restart's Reattach failed (the restart was lost and counted). The
// transport no longer asks a suspended device's back-end to reset. The
// test replays restart's steps by hand: suspend, a new back-end's client
// published, the guest's reset, then the new client's negotiation.
func TestResetWhileReplacingBackend(t *testing.T) {
	dev := &resetCounter{fakeDevice: fakeDevice{typ: 4, queues: 1}}
	d, drv := attachExternal(t, dev, "type=4")
	drv.start()

	// The back-end is lost: the device is suspended (recover), and
	// restart connects to its successor and publishes the client.
	d.dev.Suspend()
	if !d.dev.Suspended() {
		t.Fatal("device not suspended")
	}
	next := &resetCounter{fakeDevice: fakeDevice{typ: 4, queues: 1}}
	nc, err := frontend.Dial(serveFake(t, next))
	if err != nil {
		t.Fatal(err)
	}
	d.setClient(nc)

	// The guest resets the device meanwhile.
	drv.reg(mmio.RegStatus, 0)

	// restart goes on with the new client's setup (Reattach negotiates).
	if _, err := nc.Negotiate(frontend.SetupConfig{Features: ^uint64(0), ProtocolFeatures: frontend.SupportedProtocolFeatures}); err != nil {
		t.Fatalf("the new back-end's setup failed after a guest reset during the restart: %v", err)
	}
}
