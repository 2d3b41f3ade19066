package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/core/boot/boottest"
	"github.com/krun-core/krun-core/core/vmm"
)

// TestTTYFlag: the command got a terminal whenever krun-core's stdin was
// one, so `run -- cat f > out` from an interactive shell went through the
// guest's pty (\n became \r\n, stderr merged into stdout) with no way out
// (from review, helper-117). --tty off gives it pipes on a terminal too;
// --tty on insists on a terminal; auto is as before.
func TestTTYFlag(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	_, slave := openPTY(t)
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	saved := os.Stdin
	defer func() { os.Stdin = saved }()
	for _, tc := range []struct {
		name     string
		stdin    *os.File
		mode     string
		noStdin  bool
		terminal bool
		err      string
	}{
		{"auto on a terminal", slave, "auto", false, true, ""},
		{"off on a terminal", slave, "off", false, false, ""},
		{"on on a terminal", slave, "on", false, true, ""},
		{"auto on /dev/null", devNull, "auto", false, false, ""},
		{"on on /dev/null", devNull, "on", false, false, "--tty on: krun-core's stdin is not a terminal"},
		// --no-stdin: krun-core leaves its terminal alone (a loop's
		// input, a shell's), and the command gets none.
		{"no-stdin on a terminal", slave, "auto", true, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Stdin = tc.stdin
			var out bytes.Buffer
			pipes := &outputPipes{}
			defer pipes.close()
			term, in, err := setupExec(vmm.NewContext(nil), execOptions{root: root, command: []string{"/bin/sh"}, tty: tc.mode, noStdin: tc.noStdin, stdout: &out, stderr: &out, pipes: pipes})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("setupExec: %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (term != nil) != tc.terminal {
				t.Fatalf("the command gets a terminal: %v, want %v", term != nil, tc.terminal)
			}
			// A terminal on stdin is read by krun-core, which job
			// control can stop, and never handed to the plugin.
			if wantIn := tc.stdin == slave && !tc.noStdin; (in != nil) != wantIn {
				t.Fatalf("krun-core pumps its stdin: %v, want %v", in != nil, wantIn)
			}
		})
	}
}

// TestTTYFlagRefused: a bad --tty value, and --tty without a command, are
// one line before anything starts.
func TestTTYFlagRefused(t *testing.T) {
	root := t.TempDir()
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	for _, tc := range []struct {
		args []string
		rc   int
		want string
	}{
		{[]string{"--kernel", k, "--root", root, "--tty", "maybe", "--", "sh"}, 125, "--tty maybe: want auto, on or off"},
		{[]string{"--kernel", k, "--tty", "off"}, 1, "need --root"},
		{[]string{"--kernel", k, "--root", root, "--tty", "on", "--no-stdin", "--", "sh"}, 125, "--tty on needs krun-core's stdin: drop --no-stdin"},
	} {
		var out, errb bytes.Buffer
		if rc := runCommand(tc.args, &out, &errb); rc != tc.rc || !strings.Contains(errb.String(), tc.want) || strings.Count(errb.String(), "\n") != 1 {
			t.Errorf("%q: exit %d, %q; want %d and one line with %q", tc.args, rc, errb.String(), tc.rc, tc.want)
		}
	}
}
