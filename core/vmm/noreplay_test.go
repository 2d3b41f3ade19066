package vmm

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/pluginhost"
)

// TestPluginThatMustNotBeRestarted: a plugin whose device says its
// requests must not be carried out twice (pluginsdk.Restarter, no_restart
// in its DeviceInfo) is not restarted when it dies, although the restart
// policy allows it: the device fails, as a virtio-fs device does. Plugins
// could not opt out before: a restart would have submitted the requests
// in flight to the new plugin again.
func TestPluginThatMustNotBeRestarted(t *testing.T) {
	r := newRestartRigOf(t, "./testdata/noreplay", pluginhost.RestartPolicy{Max: 5, Window: time.Hour})
	d := r.d
	if !d.info.NoRestart {
		t.Fatalf("the plugin's DeviceInfo does not say no_restart: %+v", d.info)
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for d.dev.Failed() == nil {
		if restartedPidRE.MatchString(r.logs.String()) {
			t.Fatalf("a plugin that must not be restarted was restarted:\n%s", r.logs.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("the device did not fail within 30 s of its plugin's death:\n%s", r.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(r.logs.String(), "will not be restarted") {
		t.Errorf("the log does not say why the plugin is not restarted:\n%s", r.logs.String())
	}
}
