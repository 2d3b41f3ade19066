package backend_test

// From review (helper sdkreview): a device's ConfigChanges channel is "a
// value per config change". A device author who ends the goroutine that
// watches its link with the idiomatic `defer close(ch)` (or closes it in
// Close) hands the framework a channel that yields a zero value at once,
// forever: the forwarding goroutine sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
// in a loop that never waits, the plugin spins a CPU, and the front-end
// (krun-core run: ConfigChangeInterval) re-reads the config space and
// interrupts the guest 100 times a second, for as long as the device lives.

import (
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
)

func TestClosedConfigChangesSendsNothing(t *testing.T) {
	dev, c, _ := ccBackend(t)
	defer c.Close()
	close(dev.ch) // the device's link watcher ended

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours := os.NewFile(uintptr(fds[0]), "ours")
	theirs := os.NewFile(uintptr(fds[1]), "theirs")
	defer ours.Close()
	err = c.SetBackendReqFD(theirs)
	theirs.Close()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := vhostuser.NewConn(ours)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, err := conn.Recv(); err != nil {
				return
			}
			n.Add(1)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	seen := n.Load()
	conn.Close()
	ours.Close()
	<-done
	if seen > 1 {
		t.Fatalf("%d config-change messages in 300 ms from a device whose ConfigChanges channel was closed (no change happened)", seen)
	}
}
