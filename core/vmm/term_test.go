package vmm

import (
	"os"
	"slices"
	"testing"
)

// TestTerminalGetsTERM: a command run on a terminal got no TERM (krun-core
// passes none of its own environment), so vi, top and less could not
// drive it; it gets TERM=xterm, as with docker and podman run -t, unless
// the user gave one. Without a terminal nothing is added.
func TestTerminalGetsTERM(t *testing.T) {
	for _, tc := range []struct {
		name string
		tty  bool
		env  []string
		want string // the TERM entry, "" for none
	}{
		{"terminal", true, nil, "TERM=xterm"},
		{"terminal, TERM given", true, []string{"TERM=vt100"}, "TERM=vt100"},
		{"pipes", false, nil, ""},
		{"pipes, TERM given", false, []string{"TERM=dumb"}, "TERM=dumb"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := prepTestExecErr(t, nil, func(c *Context) {
				if err := c.SetExec("/bin/sh", nil, tc.env); err != nil {
					t.Fatal(err)
				}
				c.SetStdio(os.Stdin, os.Stdout, os.Stderr, tc.tty)
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.exec.close(0)
			var got []string
			for _, kv := range c.exec.cfg.Env {
				if isTerm(kv) {
					got = append(got, kv)
				}
			}
			var want []string
			if tc.want != "" {
				want = []string{tc.want}
			}
			if !slices.Equal(got, want) {
				t.Errorf("TERM entries %q, want %q (env %q)", got, want, c.exec.cfg.Env)
			}
		})
	}
}
