package oci

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/vmm"
)

// TestLogConsoleTail: a guest that ended on its own without reporting the
// command's status leaves the last lines of its console in krun-oci's log
// as warnings (which the log holds without --debug); one that reported,
// that krun-oci stopped or that failed with an error logs nothing.
func TestLogConsoleTail(t *testing.T) {
	tail := []string{"Kernel panic - not syncing: sysrq triggered crash", "---[ end Kernel panic ]---"}
	for _, tc := range []struct {
		name string
		res  *vmm.Result
		err  error
		want []string // substrings, in order; nil: nothing logged
	}{
		{"reported", &vmm.Result{HasExitStatus: true, ConsoleTail: tail}, nil, nil},
		{"stopped", &vmm.Result{ConsoleTail: tail}, context.Canceled, nil},
		{"no result", nil, errors.New("start failed"), nil},
		{"panic", &vmm.Result{Reason: vmm.ExitReboot, ConsoleTail: tail}, nil,
			[]string{"without reporting", "reason=reboot", "guest console| Kernel panic - not syncing", "guest console| ---[ end Kernel panic ]---"}},
		{"device failed", &vmm.Result{ConsoleTail: tail}, errors.New("essential device failed"), nil},
		{"empty console", &vmm.Result{Reason: vmm.ExitPowerOff}, nil, []string{"its console was empty", "reason=poweroff"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			logConsoleTail(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Warn}), tc.res, tc.err)
			out := buf.String()
			if tc.want == nil {
				if out != "" {
					t.Fatalf("logged %q, want nothing", out)
				}
				return
			}
			rest := out
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("log lacks %q (in order) in:\n%s", w, out)
				}
				rest = rest[i+len(w):]
			}
		})
	}
}
