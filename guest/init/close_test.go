package main

import (
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestCloseWaitsForTheHost: at exit krun-init waited at most 5 s for
// CLOSE_ACK, so a reader of krun-core's stdout slower than about 200 KB/s
// (a slow link) lost the last megabyte or so still in the console's
// buffers. Without a limit, close returns once the host acknowledges,
// however late; and it still returns when the port stops being read (no
// acknowledgement can come). From review, helper-117.
func TestCloseWaitsForTheHost(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	for _, tc := range []struct {
		name string
		host func(t *testing.T, toGuest *os.File, fromGuest *os.File)
	}{
		{"late acknowledgement", func(t *testing.T, toGuest, fromGuest *os.File) {
			// The host reads EXIT and CLOSE_REQ, takes its time writing
			// out what came before them, then acknowledges.
			r := stdioframe.NewReader(fromGuest, stdioframe.GuestToHost)
			for range 2 {
				if _, err := r.Next(); err != nil {
					t.Errorf("host: %v", err)
					return
				}
			}
			time.Sleep(300 * time.Millisecond)
			if err := stdioframe.NewWriter(toGuest).WriteFrame(stdioframe.CloseAck, nil); err != nil {
				t.Errorf("host: %v", err)
			}
		}},
		{"port no longer read", func(t *testing.T, toGuest, fromGuest *os.File) {
			// The host breaks the protocol (a frame of no known type):
			// krun-init stops reading the port, and no acknowledgement
			// can come.
			time.Sleep(300 * time.Millisecond)
			hdr := make([]byte, stdioframe.HeaderLen)
			hdr[0] = 0xff
			if _, err := toGuest.Write(hdr); err != nil {
				t.Errorf("host: %v", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hostToGuestR, hostToGuestW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			guestToHostR, guestToHostW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer guestToHostR.Close()
			defer guestToHostW.Close()
			defer hostToGuestR.Close()
			s := &stdio{log: &logger{out: devNull}, f: hostToGuestR, w: stdioframe.NewWriter(guestToHostW),
				started: make(chan struct{}), ack: make(chan struct{}), startReq: make(chan struct{}), readDone: make(chan struct{})}
			go s.readLoop()
			go tc.host(t, hostToGuestW, guestToHostR)
			start := time.Now()
			closed := make(chan struct{})
			go func() { s.close(0); close(closed) }()
			select {
			case <-closed:
			case <-time.After(30 * time.Second):
				t.Fatal("close did not return 30 s after the host acknowledged or stopped")
			}
			if waited := time.Since(start); waited < 250*time.Millisecond {
				t.Fatalf("close returned after %v, before the host acknowledged or stopped", waited)
			}
			hostToGuestW.Close()
		})
	}
}
