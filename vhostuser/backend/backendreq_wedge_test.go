package backend_test

// Adversarial review of the back-end against a hostile front-end
// (helper rev-vu-86). Each test here failed on the code it was written
// against.

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestBackendReqChannelCannotWedge (fixed: config changes are sent with
// MSG_DONTWAIT, dropped when the channel is full): the back-end request channel
// (SET_BACKEND_REQ_FD) is a socket the front-end made and keeps a copy of:
// net.FileConn's dup shares the open file description, so O_NONBLOCK is
// the front-end's to clear. A front-end that fills the channel and clears
// the flag makes the config-change sender block in write(2), where Go's
// poller cannot reach it, and conn.Close (closeBackendReq) then waits for
// that write: session.close never returns, so Serve never returns and a
// listening back-end takes no next front-end. The peer end can be parked
// in the back-end itself (the kick of a ring that never starts, closed
// only after the channel), so the wedge outlives the front-end.
func TestBackendReqChannelCannotWedge(t *testing.T) {
	tests := []struct {
		name string
		park bool // hand the peer end to the back-end as an unstarted ring's kick
	}{
		{"peer end kept by the front-end", false},
		{"peer end parked in the back-end as a kick", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev, c, done := ccBackend(t)
			defer c.Close()
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			ours := os.NewFile(uintptr(fds[0]), "ours")
			theirs := os.NewFile(uintptr(fds[1]), "theirs")
			// A private copy of our end, only to rescue the test's
			// goroutines if the back-end hangs.
			rescueFD, err := unix.Dup(fds[0])
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(rescueFD)
			if err := c.SetBackendReqFD(theirs); err != nil {
				t.Fatal(err)
			}
			// Fill the channel through our copy of the back-end's end,
			// then clear O_NONBLOCK on the open file the back-end shares.
			fillSocket(t, fds[1])
			if err := unix.SetNonblock(fds[1], false); err != nil {
				t.Fatal(err)
			}
			if tt.park {
				if err := c.SetVringKick(0, ours); err != nil {
					t.Fatal(err)
				}
			}
			ours.Close()
			theirs.Close()
			dev.ch <- struct{}{}               // the device's config changes
			time.Sleep(200 * time.Millisecond) // the sender is now in write(2)

			c.Close() // the front-end goes away
			select {
			case <-done:
			case <-time.After(3 * time.Second):
				// Drain the channel so the stuck write and Serve end.
				unix.SetNonblock(rescueFD, true)
				stop := make(chan struct{})
				drained := make(chan struct{})
				go func() {
					defer close(drained)
					b := make([]byte, 1<<16)
					for {
						select {
						case <-stop:
							return
						default:
						}
						if _, err := unix.Read(rescueFD, b); err != nil && err != unix.EAGAIN {
							return
						}
						time.Sleep(time.Millisecond)
					}
				}()
				select {
				case <-done:
				case <-time.After(5 * time.Second):
				}
				close(stop)
				<-drained
				t.Fatal("Serve did not return within 3 s of the front-end's disconnect: the config-change sender is blocked in write(2) on a back-end request channel whose O_NONBLOCK the front-end cleared, and closeBackendReq waits for it")
			}
		})
	}
}
