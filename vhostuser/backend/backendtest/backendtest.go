// Package backendtest serves vhost-user back-ends on listening unix sockets
// in tests, as a plugin does with the socket krun-core hands it.
package backendtest

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser/backend"
)

// limit is how long a helper waits: for a stopped server to return, for
// queues to fail.
const limit = 10 * time.Second

// Listen makes a listening unix socket at path and returns it as a file,
// the form backend.Server.Serve takes. The socket file stays when the
// listener is closed (front-ends keep dialling it); the file is closed
// when the test ends.
func Listen(t testing.TB, path string) *os.File {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Serve serves srv on a listening unix socket at path (Listen) until the
// test ends, one front-end at a time. Then it stops the server and fails
// the test if Serve returned an error or did not return within 10 s.
func Serve(t testing.TB, srv *backend.Server, path string) {
	t.Helper()
	f := Listen(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, f) }()
	// Registered after Listen's clean-up, so it runs before the file is
	// closed.
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(limit):
			t.Errorf("Serve did not return within %v of its stop", limit)
		}
	})
}

// WaitFailed waits up to 10 s until each of queues has failed at least
// once in srv's stats (a hostile front-end's doing), and fails the test
// with the stats otherwise.
func WaitFailed(t testing.TB, srv *backend.Server, queues ...int) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		st := srv.Stats()
		failed := true
		for _, q := range queues {
			if q < 0 || q >= len(st) {
				t.Fatalf("queue %d of %d", q, len(st))
			}
			failed = failed && st[q].Failures > 0
		}
		if failed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("queues %v did not fail within %v: %+v", queues, limit, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
