package pluginhost

import (
	"testing"
	"time"
)

// hostileGRPCConfig launches krun-plugin-hostilegrpc (testdata/hostilegrpc,
// built by TestMain) in mode, with short timeouts.
func hostileGRPCConfig(t *testing.T, mode string) Config {
	cfg := testConfig(t, mode)
	cfg.Kind = "hostilegrpc"
	cfg.HandshakeTimeout = 2 * time.Second
	cfg.RPCTimeout = 2 * time.Second
	return cfg
}

type launchResult struct {
	p        *Plugin
	err      error
	panicked any
}

// launchWithin runs Launch on a goroutine that recovers a panic, and waits
// for it at most limit.
func launchWithin(t *testing.T, cfg Config, limit time.Duration) (launchResult, bool) {
	done := make(chan launchResult, 1)
	go func() {
		var r launchResult
		defer func() {
			r.panicked = recover()
			done <- r
		}()
		r.p, r.err = Launch(cfg)
	}()
	select {
	case r := <-done:
		if r.p != nil {
			r.p.Kill()
		}
		return r, true
	case <-time.After(limit):
		return launchResult{}, false
	}
}

// TestLaunchBoundedWhenPluginAllowsNoStreams: a compromised plugin
// completes go-plugin's handshake (a valid line, a unix socket in its
// socket directory) and answers the host's HTTP/2 connection with
// SETTINGS_MAX_CONCURRENT_STREAMS 0. go-plugin's Client() opens its stdio
// stream with a context that ends only with the process
// (newGRPCStdioClient: StreamStdio(doneCtx)), and gRPC waits for stream
// quota that never comes: Launch never returns, past the handshake timeout
// and every RPC deadline. In krun-core: run and serve hang at start, a
// plugin restart hangs for good, and the VM's exit then waits for it
// (shutdown waits for the device's monitor).
//
// From review, helper-95; fixed: Process.connect bounds go-plugin's Client by the handshake deadline and kills the process past it.
func TestLaunchBoundedWhenPluginAllowsNoStreams(t *testing.T) {
	r, ok := launchWithin(t, hostileGRPCConfig(t, "nostreams"), 15*time.Second)
	switch {
	case !ok:
		t.Fatal("Launch has not returned 15 s after start (handshake timeout 2 s, RPC timeout 2 s): a plugin that allows no HTTP/2 stream hangs the host")
	case r.panicked != nil:
		t.Fatalf("Launch panicked: %v", r.panicked)
	case r.err == nil:
		t.Fatal("Launch accepted a plugin that allows no gRPC stream")
	}
	t.Logf("Launch: %v", r.err)
}

// TestHandshakeCertDoesNotPanicHost: the handshake line is the
// plugin's to write. A sixth field longer than 50 bytes is taken by
// go-plugin as the server's AutoMTLS certificate (loadServerCert), which
// sets fields of ClientConfig.TLSConfig, nil in krun-core (no AutoMTLS):
// a nil pointer dereference in Client.Start, re-panicked by its deferred
// recover. Any plugin that prints a valid self-signed certificate there
// crashes krun-core (run, serve, img), a Launch on a goroutine of its own
// (LaunchAll, a restart) included.
//
// From review, helper-95; fixed: handshakeGuard refuses a handshake line with a certificate before go-plugin reads it.
func TestHandshakeCertDoesNotPanicHost(t *testing.T) {
	r, ok := launchWithin(t, hostileGRPCConfig(t, "cert"), 15*time.Second)
	switch {
	case !ok:
		t.Fatal("Launch has not returned 15 s after start")
	case r.panicked != nil:
		t.Fatalf("a plugin's handshake line with a certificate made Launch panic (krun-core crashes): %v", r.panicked)
	case r.err == nil:
		t.Fatal("Launch accepted a handshake line with a certificate krun-core never asked for")
	}
	t.Logf("Launch: %v", r.err)
}

// TestLaunchBoundedWhenNoStreamsConnOutlivesPlugin (review, helper-98):
// Process.connect bounds go-plugin's Client() by killing the plugin past
// the handshake deadline, then waits (<-done) for Client() to return,
// trusting that "the stream ends with the process". It ends only when the
// HTTP/2 connection does: the plugin can send its end of the gRPC
// connection (SCM_RIGHTS) over the vhost-user socket it was handed, in a
// message the core does not read before the launch is done (the same
// trick watchExit's comment describes for the stdout/stderr pipes), and
// the connection then stays open after the plugin is dead. go-plugin's
// doneCtx, the stdio stream's other way out, is cancelled only after its
// wait goroutine takes c.l, which Client() holds: Launch waits for good.
// connect must not wait for Client() past the deadline (return and let the
// goroutine finish on its own after closing the gRPC connection, or give
// the dial a keepalive / close the ClientConn itself).
func TestLaunchBoundedWhenNoStreamsConnOutlivesPlugin(t *testing.T) {
	r, ok := launchWithin(t, hostileGRPCConfig(t, "nostreams-keep"), 20*time.Second)
	switch {
	case !ok:
		t.Fatal("Launch has not returned 20 s after start (handshake timeout 2 s, RPC timeout 2 s): a plugin that allows no HTTP/2 stream, and keeps its end of the connection alive in a message in flight, hangs the host")
	case r.panicked != nil:
		t.Fatalf("Launch panicked: %v", r.panicked)
	case r.err == nil:
		t.Fatal("Launch accepted a plugin that allows no gRPC stream")
	}
	t.Logf("Launch: %v", r.err)
}
