package pluginsdk

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// TestStartedByHand: a plugin binary run without its host says so in one
// line and exits 1 (go-plugin would print three lines about plugins).
func TestStartedByHand(t *testing.T) {
	if os.Getenv("KRUN_SDK_TEST_SERVE") == "1" {
		ServeService(Service{Handshake: pluginpb.Handshake(), Name: "device"}, NewLogger(os.Stderr))
		os.Exit(0)
	}
	for _, tt := range []struct {
		name   string
		cookie bool
	}{{"without the cookie", false}, {"with a wrong cookie", true}} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run", "^TestStartedByHand$")
			cmd.Env = append(os.Environ(), "KRUN_SDK_TEST_SERVE=1")
			if tt.cookie {
				cmd.Env = append(cmd.Env, pluginpb.Handshake().MagicCookieKey+"=wrong")
			}
			out, err := cmd.CombinedOutput()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 1 {
				t.Fatalf("exit: %v, output %q", err, out)
			}
			if strings.Count(string(out), "\n") != 1 || !strings.Contains(string(out), "a krun-core plugin: krun-core starts it") {
				t.Errorf("output %q, want one line", out)
			}
		})
	}
	if _, ok := startedByHand(pluginpb.Handshake(), "/x/krun-plugin-y", func(k string) string {
		if k == pluginpb.Handshake().MagicCookieKey {
			return pluginpb.Handshake().MagicCookieValue
		}
		return ""
	}); ok {
		t.Error("the host's cookie is taken for a start by hand")
	}
}
