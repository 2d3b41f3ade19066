package pluginhost

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestPluginLogFloodIsBounded: a compromised plugin writes log lines
// as fast as it can, at ERROR (JSON or a "[ERROR]" prefix), and the core
// re-logs every one into its own log (the user's terminal, the journal):
// the plugin-side ratelog limits that keep a guest from flooding the log
// are the plugin's own code, which a compromised plugin does not run, and
// the core re-logs without a limit of its own (seccomp refusals, by
// contrast, are spaced out by the core). 20000 lines in well under a
// second must not become 20000 lines of krun-core's log.
//
// From review, helper-95; fixed: pluginLog re-logs under a per-process ratelog.Budget.
func TestPluginLogFloodIsBounded(t *testing.T) {
	var out bytes.Buffer
	host := hclog.New(&hclog.LoggerOptions{Name: "krun-core", Output: &out, Level: hclog.Warn})
	l := newPluginLog(host.Named("krun-plugin-blk-raw"), "blk-raw", nil)
	const n = 20000
	var in bytes.Buffer
	for i := 0; i < n/2; i++ {
		in.WriteString(`{"@level":"error","@message":"disk on fire","@timestamp":"x"}` + "\n")
		in.WriteString("[ERROR] disk on fire\n")
	}
	l.Write(in.Bytes())
	got := strings.Count(out.String(), "\n")
	t.Logf("%d plugin lines became %d lines of the core's log", n, got)
	if got > n/10 {
		t.Errorf("a plugin's flood of %d ERROR lines became %d lines of krun-core's log: the core re-logs a plugin's lines without any rate limit", n, got)
	}
}

// TestStdioFloodIsBounded: go-plugin's host side logs a warning
// ("unknown channel, dropping") for every message on its stdio stream
// whose channel is neither stdout nor stderr, into the logger krun-core
// gives it (quietLogger passes "stdio" through, at WARN: krun-core's
// default level). A compromised plugin sends them in a loop: 20000
// messages, 20000 warnings in the core's log.
//
// From review, helper-95; fixed: quietLogger.Named("stdio") spaces its warnings (spacedLogger).
func TestStdioFloodIsBounded(t *testing.T) {
	var out syncBuffer
	cfg := testConfig(t, "stdioflood")
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Name: "krun-core", Output: &out, Level: hclog.Warn})
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := p.Stats(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if c["stdio_sent"] >= 20000 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	got := strings.Count(out.String(), "unknown channel")
	t.Logf("20000 stdio messages became %d warnings in the core's log", got)
	if got > 100 {
		t.Errorf("a plugin's %d stdio messages for an unknown channel became %d WARN lines of krun-core's log (no limit)", 20000, got)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
