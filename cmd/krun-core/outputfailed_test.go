package main

import (
	"bytes"
	"errors"
	"testing"

	"github.com/krun-core/krun-core/core/vmm"
)

// TestPrintOutputFailure: a file on stdout or stderr that failed its
// writes (a full disk) lost the rest of the command's output with only a
// warning, which run's default log level (error) hides: run exited with
// the command's status and said nothing. It says so in one line.
func TestPrintOutputFailure(t *testing.T) {
	two := errors.Join(errors.New("copy the command's output to /dev/stdout: write /dev/stdout: no space left on device"),
		errors.New("copy the command's output to /dev/stderr: write /dev/stderr: no space left on device"))
	for _, tc := range []struct {
		name string
		res  *vmm.Result
		want string
	}{
		{"no result", nil, ""},
		{"all written", &vmm.Result{HasExitStatus: true}, ""},
		{"full disk", &vmm.Result{HasExitStatus: true, OutputError: errors.New("copy the command's output to /dev/stdout: write /dev/stdout: no space left on device")},
			"krun-core run: copy the command's output to /dev/stdout: write /dev/stdout: no space left on device; the rest of it was dropped\n"},
		{"both streams", &vmm.Result{OutputError: two},
			"krun-core run: copy the command's output to /dev/stdout: write /dev/stdout: no space left on device; copy the command's output to /dev/stderr: write /dev/stderr: no space left on device; the rest of it was dropped\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			printOutputFailure(&buf, tc.res)
			if buf.String() != tc.want {
				t.Errorf("printed %q, want %q", buf.String(), tc.want)
			}
		})
	}
}
