package pluginhost

import (
	"context"
	"strings"
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

// TestHugePluginTextIsCapped: a plugin's replies may hold strings of up to
// MaxReplyBytes, and the host put the kind Describe reports, Health's
// error and Shutdown's flush error whole into its errors (and Configure's
// sandbox summary, lines and all, into serve's "serving" log line) (onto the user's
// terminal, into the log every health check): a line of 900 KiB, or 3.6
// MB once an ESC byte is quoted as \x1b. Only a failed RPC's status
// message was cut (StatusMessage).
func TestHugePluginTextIsCapped(t *testing.T) {
	const most = 4 * (maxStatusMessage + 3) // quoted: \x1b for a byte
	_, err := Launch(testConfig(t, "hugekind"))
	if err == nil {
		t.Fatal("a plugin reporting a 900 KiB kind was launched")
	}
	if n := len(err.Error()); n > most+512 {
		t.Errorf("the error of a plugin reporting a 900 KiB kind is %d bytes", n)
	}

	p, err := Launch(testConfig(t, "hugetext"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, note, err := p.Configure(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if note != "restricted" {
		t.Errorf("Configure's sandbox summary of 900 KiB over two lines came back as %d bytes (%q...), want its first line", len(note), note[:min(len(note), 32)])
	}
	st, msg, err := p.Health(ctx)
	if err != nil || st != HealthFailed {
		t.Fatalf("Health: %v, %v", st, err)
	}
	if len(msg) > most {
		t.Errorf("Health's error is %d bytes", len(msg))
	}
	if !strings.HasSuffix(msg, `..."`) {
		t.Errorf("a cut error does not say so: it ends %q", msg[max(0, len(msg)-16):])
	}
	err = p.Shutdown(ctx)
	if err == nil {
		t.Fatal("Shutdown's flush error was lost")
	}
	if n := len(err.Error()); n > most+512 {
		t.Errorf("Shutdown's error is %d bytes", n)
	}
}
