package vmm

import (
	"os"
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

// A vCPU thread stuck outside KVM_RUN (in a console write that blocks)
// keeps its vCPU, the VM and guest memory: the machine's close used to
// unmap them after 5 s under the thread, which reads its exit's data in
// the kvm_run page when it comes back (a crash of the process), and
// closed descriptors whose numbers other files could take. They are
// released once the last vCPU thread is out (from review, helper-97).
func TestCloseKeepsMemoryWhileVCPUStuck(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	m := &machine{log: hclog.NewNullLogger(), events: make(chan event, 1), memFile: w}
	m.running.Add(1) // a vCPU stuck in a host write
	m.close()
	if _, err := w.Stat(); err != nil {
		t.Fatalf("guest memory was released under a vCPU thread still running: %v", err)
	}
	m.running.Done() // the write returns; the thread leaves
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := w.Stat(); err != nil {
			break // released
		}
		if time.Now().After(deadline) {
			t.Fatal("guest memory not released once the vCPU thread was out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
