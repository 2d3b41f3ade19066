package pluginhost

import (
	"bytes"
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestShutdownOfStalledPluginReturns: a plugin (it may be compromised)
// that never answers Shutdown, neither its own nor go-plugin's controller
// Shutdown, must not hang the core. Shutdown bounds its RPC with ctx, and
// go-plugin's Kill, whose controller request has no deadline, is given
// closeGrace before the process is killed. Before the fix Shutdown never
// returned, and its callers (a VM's device close, serve on a signal) never
// reached their own kill (from review).
func TestShutdownOfStalledPluginReturns(t *testing.T) {
	p, err := Launch(testConfig(t, "stall"))
	if err != nil {
		t.Fatal(err)
	}
	pid := p.Pid()
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Shutdown(ctx) }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Shutdown of a plugin that never answered reported success")
		}
	case <-time.After(20 * time.Second):
		t.Errorf("Shutdown (ctx with a 2 s deadline) of a plugin that never answers has not returned after 20 s")
		syscall.Kill(pid, syscall.SIGKILL)
		<-done
	}
}

// TestHugeReplyIsRefused: a plugin's gRPC replies are hostile input.
// go-plugin dials with a 2 GiB receive limit; Launch sets MaxReplyBytes,
// so a 64 MiB Stats reply is refused instead of decoded (before the fix it
// was accepted; Health runs every 2 s in serve; from review).
func TestHugeReplyIsRefused(t *testing.T) {
	p, err := Launch(testConfig(t, "huge"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	c, err := p.Stats(context.Background())
	if err == nil {
		n := 0
		for k := range c {
			n += len(k)
		}
		t.Errorf("the core accepted a %d MiB Stats reply from the plugin", n>>20)
	} else if !strings.Contains(err.Error(), "larger than max") {
		t.Errorf("Stats: %v, want the receive limit's error", err)
	}
}

// TestPluginLogCannotForgeHostLines: a plugin's log lines are hostile
// (docs/SECURITY.md, "What remains trusted"). A line break (or another
// control character) in a message or key is quoted, so one plugin line
// stays one host line and cannot pass for another component's. Before the
// fix the message was re-logged verbatim (from review).
func TestPluginLogCannotForgeHostLines(t *testing.T) {
	for _, in := range []string{
		`{"@level":"info","@message":"ok\n2030-01-01T00:00:00.000Z [ERROR] krun-core.vmm: guest requested host reboot","@timestamp":"x"}`,
		`{"@level":"info","@message":"ok","k\n2030-01-01T00:00:00.000Z [ERROR] krun-core.vmm: forged":"v"}`,
		"[INFO] plain\r2030-01-01T00:00:00.000Z [ERROR] krun-core.vmm: forged",
	} {
		var buf bytes.Buffer
		host := hclog.New(&hclog.LoggerOptions{Name: "krun-core", Output: &buf, Level: hclog.Info})
		l := newPluginLog(host.Named("krun-plugin-blk-raw"), "blk-raw", nil)
		l.Write([]byte(in + "\n"))
		out := strings.TrimRight(buf.String(), "\n")
		if lines := strings.Split(out, "\n"); len(lines) != 1 || strings.Contains(out, "\r") {
			t.Errorf("plugin line %q became %d host lines: %q", in, len(lines), out)
		}
	}
}
