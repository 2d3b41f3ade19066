package pluginhost

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// TestCheckHandshake: the guard refuses what go-plugin would load as an
// AutoMTLS certificate (a sixth field over 50 bytes; from review,
// helper-95) and passes every other line, and what follows it, unchanged:
// short extra data in the sixth field is older servers', which go-plugin
// ignores (from review, helper-98).
func TestCheckHandshake(t *testing.T) {
	cert := strings.Repeat("A", 51)
	for _, tc := range []struct {
		name    string
		in      string
		refused bool
	}{
		{"five fields", "1|1|unix|/tmp/p|grpc\nrest", false},
		{"sixth empty", "1|1|unix|/tmp/p|grpc|\n", false},
		{"sixth short extra", "1|1|unix|/tmp/p|grpc|extra\n", false},
		{"sixth of 50 bytes", "1|1|unix|/tmp/p|grpc|" + strings.Repeat("A", 50) + "\n", false},
		{"multiplex field", "1|1|unix|/tmp/p|grpc||true\n", false},
		{"certificate", "1|1|unix|/tmp/p|grpc|" + cert + "\n", true},
		{"certificate and multiplex", "1|1|unix|/tmp/p|grpc|" + cert + "|false\n", true},
		{"certificate at the end, no line end", "1|1|unix|/tmp/p|grpc|" + cert, true}, // go-plugin's scanner takes it as a line
		{"not a handshake", "hello\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &handshakeGuard{ReadCloser: io.NopCloser(strings.NewReader(tc.in))}
			out, err := io.ReadAll(g)
			var refused *handshakeRefused
			if got := errors.As(err, &refused); got != tc.refused {
				t.Fatalf("refused: %v (%v), want %v", got, err, tc.refused)
			}
			if !tc.refused && string(out) != tc.in {
				t.Errorf("passed %q, want %q", out, tc.in)
			}
			if tc.refused && len(out) > 0 {
				t.Errorf("passed %q of a refused line", out)
			}
		})
	}
}
