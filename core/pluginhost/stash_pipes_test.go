package pluginhost

import (
	"testing"
	"time"
)

// TestKillReturnsWhenPluginStashedItsPipes: a compromised plugin sends the
// write ends of its stdout and stderr pipes over its vhost-user socket (fd
// 3) in a message the core never reads. SIGKILL ends the process, but the
// pipes never reach EOF while the core's end of the socket holds the
// in-flight descriptors, so go-plugin never calls the runner's Wait and Kill
// must still return (from review, helper-76).
func TestKillReturnsWhenPluginStashedItsPipes(t *testing.T) {
	p, err := Launch(testConfig(t, "stash"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	start := time.Now()
	go func() { p.Kill(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("Kill of plugin pid %d has not returned after %v (process reaped: %v)", p.Pid(), time.Since(start).Round(time.Second), isDone(p))
	}
}

// TestLaunchReturnsWhenRefusedPluginStashedItsPipes: the same plugin under
// a wrong executable name (or one reporting another kind on a restart) is
// refused in Launch, which kills it and must return the error: a Launch
// that never returns is a `krun-core run` (or a restart, and so the VM's
// shutdown) that never ends.
func TestLaunchReturnsWhenRefusedPluginStashedItsPipes(t *testing.T) {
	cfg := testConfig(t, "stash")
	cfg.Kind = "other"
	cfg.PluginDir = pluginCopy(t, "other")
	type result struct {
		p   *Plugin
		err error
	}
	done := make(chan result, 1)
	go func() {
		p, err := Launch(cfg)
		done <- result{p, err}
	}()
	select {
	case r := <-done:
		if r.err == nil {
			r.p.Kill()
			t.Fatal("a plugin reporting kind test launched as krun-plugin-other")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Launch of a plugin it refused (wrong kind) has not returned after 30 s")
	}
}

func isDone(p *Plugin) bool {
	select {
	case <-p.Done():
		return true
	default:
		return false
	}
}
