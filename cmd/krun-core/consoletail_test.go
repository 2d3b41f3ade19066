package main

import (
	"bytes"
	"testing"

	"github.com/krun-core/krun-core/core/vmm"
)

// TestPrintConsoleTail: run shows the guest console's last lines only
// when the guest ended without reporting the command's status.
func TestPrintConsoleTail(t *testing.T) {
	tail := []string{"Kernel panic - not syncing: sysrq triggered crash", "---[ end Kernel panic ]---"}
	for _, tc := range []struct {
		name string
		res  *vmm.Result
		want string
	}{
		{"no result", nil, ""},
		{"reported", &vmm.Result{HasExitStatus: true, ConsoleTail: tail}, ""},
		{"empty console", &vmm.Result{}, ""},
		{"panic", &vmm.Result{ConsoleTail: tail}, "krun-core run: the last lines of the guest's console:\n" +
			"  guest| Kernel panic - not syncing: sysrq triggered crash\n" +
			"  guest| ---[ end Kernel panic ]---\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			printConsoleTail(&buf, tc.res)
			if buf.String() != tc.want {
				t.Errorf("printed %q, want %q", buf.String(), tc.want)
			}
		})
	}
}
