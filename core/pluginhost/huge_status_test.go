package pluginhost

import (
	"context"
	"testing"
	"time"
)

// TestHugeStatusMessageIsCapped: SECURITY.md says a plugin's gRPC
// replies are at most MaxReplyBytes (1 MiB) each, and MaxCallRecvMsgSize
// caps a reply's message. A failed RPC's status message travels in the
// HTTP/2 trailers instead, which only gRPC's header list limit (16 MiB
// by default) bounds: an 8 MiB message reaches the core, and its error
// (Configure's, Health's) carries it whole into the log and onto the
// user's terminal.
//
// From review, helper-95; fixed: WithMaxHeaderListSize, and call cuts the status message.
func TestHugeStatusMessageIsCapped(t *testing.T) {
	p, err := Launch(testConfig(t, "hugeerr"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = p.Stats(ctx)
	if err == nil {
		t.Fatal("Stats succeeded")
	}
	if n := len(err.Error()); n > MaxReplyBytes {
		t.Errorf("a plugin's status message of 8 MiB reached the core whole: the error is %d bytes (MaxReplyBytes is %d)", n, MaxReplyBytes)
	}
}
