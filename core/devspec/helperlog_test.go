package devspec

import (
	"bytes"
	"strings"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestHelperLogHostileLines: passt parses the guest's packets and may be
// compromised; what it prints is hostile, as a plugin's log is. A line
// with a carriage return or an escape sequence was logged verbatim (hclog
// writes a message as it is), so it could pass for another component's
// line on the terminal or drive the terminal itself.
func TestHelperLogHostileLines(t *testing.T) {
	for _, in := range []string{
		"ok\r2030-01-01T00:00:00.000Z [ERROR] krun-core.vmm: guest requested host reboot",
		"colour \x1b]0;owned\x07 title",
		"8-bit CSI \x9b2J",
		"invalid \xff UTF-8",
	} {
		var out bytes.Buffer
		w := HelperLog(hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Info}))
		w.Write([]byte(in + "\n"))
		got := strings.TrimSuffix(out.String(), "\n")
		if strings.ContainsAny(got, "\r\n\x1b\x07") || strings.Contains(got, "\x9b") || strings.Contains(got, "\xff") {
			t.Errorf("helper line %q logged raw: %q", in, got)
		}
		if !strings.Contains(got, "[WARN]") {
			t.Errorf("helper line %q not logged: %q", in, got)
		}
	}
}

// TestHelperLogFloodIsBounded: a compromised passt printing without pause
// made the core log every line at WARN; the lines are bounded by a budget
// now, and the next line logged says how many were dropped.
func TestHelperLogFloodIsBounded(t *testing.T) {
	var out bytes.Buffer
	w := HelperLog(hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Info}))
	const n = 20000
	w.Write(bytes.Repeat([]byte("flood\n"), n))
	logged := strings.Count(out.String(), "\n")
	if logged > helperLogBurst+helperLogPerSecond {
		t.Fatalf("%d of %d flooding lines logged, want at most about %d", logged, n, helperLogBurst)
	}
	if logged < helperLogBurst {
		t.Fatalf("%d lines logged, want the burst of %d whole", logged, helperLogBurst)
	}
	time.Sleep(50 * time.Millisecond) // the budget refills
	w.Write([]byte("after\n"))
	if !strings.Contains(out.String(), "after: helper_lines_dropped=") {
		t.Errorf("the line after the flood does not count the lines dropped:\n%s", out.String()[max(0, out.Len()-200):])
	}
}
