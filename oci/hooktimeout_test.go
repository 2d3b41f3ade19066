package oci

import (
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestHookTimeoutIsTheHooksOwn: a hook's timeout is how long the hook
// itself may run. One that exits at once and leaves a process holding its
// output (`daemon &`) succeeds, whatever its timeout: the output is read
// for hookIODelay after it exits, and a timeout shorter than that ran out
// meanwhile, so the hook was reported as timed out (a prestart or
// createRuntime hook then failed create). One that runs past its timeout
// still times out.
func TestHookTimeoutIsTheHooksOwn(t *testing.T) {
	for _, c := range []struct {
		name, script string
		timeout      int
		want         string // "" for success
	}{
		{"exits-leaving-output-held", "sleep 4 & exit 0", 1, ""},
		{"runs-past-timeout", "sleep 4", 1, "timed out after 1s"},
		{"fails", "echo bad; exit 3", 5, "exit status 3: bad"},
	} {
		t.Run(c.name, func(t *testing.T) {
			timeout := c.timeout
			h := specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", c.script}, Timeout: &timeout}
			begin := time.Now()
			err := runHook(h, []byte("{}"), "", nil)
			if d := time.Since(begin); d > hookIODelay+2*time.Second {
				t.Errorf("the hook took %v", d.Round(time.Millisecond))
			}
			switch {
			case c.want == "" && err != nil:
				t.Errorf("runHook: %v; want success", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("runHook: %v; want %q", err, c.want)
			}
		})
	}
}
