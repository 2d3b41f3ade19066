package sandbox

import (
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

var _ Logger = hclog.NewNullLogger() // callers pass their hclog.Logger

func TestLineLogger(t *testing.T) {
	for _, c := range []struct {
		name string
		log  func(Logger)
		want string // after the timestamp; "" for no line
	}{
		{"warning with fields", func(l Logger) { l.Warn("seccomp refused a call", "syscall", "keyctl", "pid", 42) },
			` [WARN]  sandbox: seccomp refused a call: syscall=keyctl pid=42`},
		{"quoted values", func(l Logger) { l.Error("exec failed", "path", "/a b", "why", "") },
			` [ERROR] sandbox: exec failed: path="/a b" why=""`},
		{"odd argument count", func(l Logger) { l.Info("x", "lonely") }, ` [INFO]  sandbox: x: lonely=(missing)`},
		{"debug is dropped", func(l Logger) { l.Debug("noise", "k", 1) }, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			var b strings.Builder
			c.log(&lineLogger{name: "sandbox", w: &b})
			out := b.String()
			if c.want == "" {
				if out != "" {
					t.Fatalf("got %q, want nothing", out)
				}
				return
			}
			ts := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\S*`).FindString(out)
			if ts == "" || out[len(ts):] != c.want+"\n" {
				t.Fatalf("got %q, want a timestamp and %q", out, c.want)
			}
		})
	}
}
