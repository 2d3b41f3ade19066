package oci

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestFailLineHasNoControlCharacters: the error line krun-oci prints can
// quote the bundle's config (a process argument, a path); an escape
// sequence or a BEL in it is written as an escape, so that a bundle
// cannot drive the terminal of whoever runs the engine by hand. It was
// only folded into one line.
func TestFailLineHasNoControlCharacters(t *testing.T) {
	var stderr bytes.Buffer
	l := &runtimeLog{stderr: &stderr}
	l.fail(errors.New("exec: \"\x1b]0;owned\x07\": not found\nsecond\tline"))
	got := stderr.String()
	if strings.ContainsAny(got, "\x1b\x07\t") || strings.Count(got, "\n") != 1 {
		t.Fatalf("stderr %q: want one line without control characters", got)
	}
	if !strings.Contains(got, `\x1b]0;owned\a`) && !strings.Contains(got, `\x1b]0;owned\x07`) {
		t.Errorf("stderr %q: the escape sequence is not shown as an escape", got)
	}
}
