package main

import (
	"context"
	"sync"
	"syscall"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

type fakeSignaller struct {
	mu   sync.Mutex
	sent []unix.Signal
}

func (f *fakeSignaller) Signal(sig unix.Signal) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, sig)
	return nil
}

func (f *fakeSignaller) Resize(rows, cols uint16) error { return nil }

// TestThirdSignalIsTheExitStatus: the first two terminating signals go to
// the command; the third stops the VM, and run's status is then the
// shell's for that signal (128+N), as without -- CMD. It was krun-core's
// own failure (125, "context canceled"), so a command ignoring SIGTERM
// turned the user's stop into a krun-core failure (from review,
// helper-96).
func TestThirdSignalIsTheExitStatus(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &fakeSignaller{}
	stop, caught := forwardSignals(ctx, f, nil, cancel, hclog.NewNullLogger())
	defer stop()
	for i := 1; i <= 3; i++ {
		if err := syscall.Kill(syscall.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if i < 3 {
			// Each one reaches the command before the next is sent.
			deadline := time.Now().Add(10 * time.Second)
			for {
				f.mu.Lock()
				n := len(f.sent)
				f.mu.Unlock()
				if n == i {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("signal %d not forwarded to the command", i)
				}
				time.Sleep(time.Millisecond)
			}
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the third signal did not stop the VM")
	}
	if got := caught(); got != syscall.SIGHUP {
		t.Errorf("caught() = %v after the third SIGHUP, want SIGHUP (run's status 128+%d)", got, int(syscall.SIGHUP))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.sent) != 2 || f.sent[0] != unix.SIGHUP || f.sent[1] != unix.SIGHUP {
		t.Errorf("forwarded %v, want the first two SIGHUPs", f.sent)
	}
}
