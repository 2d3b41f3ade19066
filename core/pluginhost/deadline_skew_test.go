package pluginhost

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TestQuickErrorUnderShortDeadlineIsNoTimeout: a caller with less
// than deadlineSkew left calls a plugin that answers at once with an
// error of its own whose code is DeadlineExceeded (its own storage
// timed out). call took every such error for this side's timeout, "no
// answer in 100ms", although the plugin answered in no time and its
// message is lost. From review, helper-109; fixed: the skew is at most
// half the limit.
func TestQuickErrorUnderShortDeadlineIsNoTimeout(t *testing.T) {
	p := &Plugin{Process: &Process{kind: "bad", run: &ProcRunner{done: make(chan struct{})}}, rpcTimeout: 5 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	err := p.call(ctx, "Stats", func(ctx context.Context) error {
		return status.Error(codes.DeadlineExceeded, "backing store: io timeout")
	})
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a plugin's own error returned at once under a 150 ms deadline: %v, want the plugin's error, not a timeout", err)
	}
}

// A gRPC connection that is not made by the handshake's deadline is a
// handshake timeout (ErrHandshakeTimeout), whether waitReady's deadline
// or connect's own timer, set to the same instant, fires first: it was
// "gRPC connection not made (...): context deadline exceeded" when
// waitReady's came first (helper-107).
func TestConnectionNotMadeIsHandshakeTimeout(t *testing.T) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(t.TempDir(), "nobody-listens"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = waitReady(conn, time.Now().Add(200*time.Millisecond), nil)
	if !errors.Is(err, ErrHandshakeTimeout) || strings.Contains(err.Error(), "\n") {
		t.Errorf("waitReady on a socket nobody listens on: %v; want a one-line ErrHandshakeTimeout", err)
	}
}

// A plugin process that exits after its handshake line, before the gRPC
// connection to it is made, ends the wait at once: waitReady waited for
// the whole handshake deadline (a minute in krun-core) for a socket that
// nothing would ever accept on, holding the restart of a disk plugin
// killed while it started, and the guest's I/O, that long. From review,
// helper-126 (TestRestartChaos in core/vmm found it).
func TestConnectionGivesUpWhenThePluginExits(t *testing.T) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(t.TempDir(), "nobody-listens"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	exited := make(chan struct{})
	time.AfterFunc(50*time.Millisecond, func() { close(exited) })
	start := time.Now()
	err = waitReady(conn, start.Add(20*time.Second), exited)
	if took := time.Since(start); took > 5*time.Second || !errors.Is(err, errExitedConnecting) {
		t.Fatalf("waitReady after the plugin exited: %v after %v; want errExitedConnecting at once", err, took.Round(time.Millisecond))
	}
}
