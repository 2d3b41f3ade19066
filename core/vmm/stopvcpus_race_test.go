package vmm

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestStopVCPUsRacesRestart (run with -race): when a vCPU does not
// stop within a second, stopVCPUs closes every device's d.client from the
// run's goroutine, while the device's monitor goroutine may be replacing
// or clearing the same field (recover -> dropPlugin sets it to nil,
// restart sets a new one); there was no lock between them (now liveMu). A vCPU is held
// exactly then when it waits on the device lock that Resume holds while
// it talks to a slow new plugin. The unsynchronized check-then-call
// `if d.client != nil { d.client.Close() }` could call Close on nil (a panic
// of the core) or miss the new client. (From review.)
func TestStopVCPUsRacesRestart(t *testing.T) {
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	d := &pluginDevice{client: frontend.New(a)}
	m := &machine{log: hclog.NewNullLogger(), devices: []*pluginDevice{d}, events: make(chan event, 1)}
	m.running.Add(1) // a vCPU stuck in a device access
	go func() {
		time.Sleep(1200 * time.Millisecond)
		m.running.Done()
	}()
	done := make(chan struct{})
	go func() { // the monitor, restarting the plugin meanwhile
		defer close(done)
		time.Sleep(900 * time.Millisecond)
		d.dropPlugin()
	}()
	m.stopVCPUs()
	<-done
}
