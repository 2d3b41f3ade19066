package main

import (
	"context"
	"syscall"
	"testing"
	"time"
)

// TestStopOnSignal: run without -- CMD stops the VM on SIGINT, SIGTERM or
// SIGHUP and exits with the shell's status for that signal; it printed
// "context canceled" and exited 1 (from review). stopOnSignal cancels the
// context and says which signal came; before one comes it says 0.
func TestStopOnSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(sig.String(), func(t *testing.T) {
			ctx, stop, caught := stopOnSignal(context.Background())
			defer stop()
			if got := caught(); got != 0 {
				t.Fatalf("caught %v before any signal", got)
			}
			if err := syscall.Kill(syscall.Getpid(), sig); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second):
				t.Fatalf("%v did not cancel the context", sig)
			}
			if got := caught(); got != sig {
				t.Fatalf("caught %v, want %v", got, sig)
			}
		})
	}
}
