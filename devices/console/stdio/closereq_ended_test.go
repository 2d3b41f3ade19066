package stdio

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestCloseReqAfterPortEndedIsNotWarned: the guest asked to close
// (CLOSE_REQ) while its output still waited for a slow stdout, and then
// the port ended (the guest powered off, or its console went away). Once
// the output drained, the bridge answered CLOSE_REQ into the gone port and
// logged a warning, "answer CLOSE_REQ", though nothing had gone wrong
// (left open last session). The output is still written in full, and no
// warning is logged.
func TestCloseReqAfterPortEndedIsNotWarned(t *testing.T) {
	outR, outW := blockingPipe(t)
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	var logs syncbuf.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Debug})
	b := New(Config{Port: port{g2hR, h2gW}, Stdin: strings.NewReader(""), Stdout: outW, Stderr: io.Discard, Logger: log})
	done := make(chan error, 1)
	go func() { done <- b.Run(context.Background()) }()

	guestR := stdioframe.NewReader(h2gR, stdioframe.HostToGuest)
	guestW := stdioframe.NewWriter(g2hW)
	// The guest reads host frames until the port ends below.
	go func() {
		for {
			if _, err := guestR.Next(); err != nil {
				return
			}
		}
	}()
	main := bytes.Repeat([]byte("m"), 200<<10) // more than a pipe holds, within the window
	for p := main; len(p) > 0; {
		n := min(len(p), stdioframe.MaxPayload)
		if err := guestW.WriteData(stdioframe.Stdout, p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	if err := guestW.WriteFrame(stdioframe.CloseReq, nil); err != nil {
		t.Fatal(err)
	}
	// The port ends both ways while stdout is still stalled, and the
	// bridge sees it end before stdout drains.
	g2hW.Close()
	h2gR.Close()
	select {
	case <-b.portGone:
	case <-time.After(10 * time.Second):
		t.Fatal("the bridge did not see the port end")
	}
	waitFor(t, func() bool {
		b.outMu.Lock()
		defer b.outMu.Unlock()
		return b.outEnded
	})

	got := make(chan []byte, 1)
	go func() {
		var buf bytes.Buffer
		io.Copy(&buf, outR)
		got <- buf.Bytes()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after the port ended")
	}
	outW.Close()
	if b := <-got; !bytes.Equal(b, main) {
		t.Errorf("stdout: %d bytes, want %d", len(b), len(main))
	}
	if s := logs.String(); strings.Contains(s, "CLOSE_REQ") || strings.Contains(s, "[WARN]") {
		t.Errorf("log after the port ended mid-drain:\n%s", s)
	}
}
