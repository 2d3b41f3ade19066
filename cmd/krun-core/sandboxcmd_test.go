package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/sandbox"
)

func TestSandboxStatusCommand(t *testing.T) {
	cases := []struct {
		args     []string
		code     int
		out, err []string // substrings
	}{
		{[]string{"status"}, 0, []string{"Layers on this host", "landlock", "seccomp", "Plugin kind blk", "Plugin kind net",
			"Plugin kind fs", "pread64", "only if prot & PROT_EXEC == 0"}, nil},
		{[]string{"status", "--kind", "net"}, 0, []string{"Plugin kind net", "recvmsg"}, nil},
		// Every built-in kind, the console and the image tool's plugin
		// included (found in review, helper-130: they were missing).
		{[]string{"status", "--kind", "console"}, 0, []string{`Plugin kind console (seccomp profile "minimal")`}, nil},
		{[]string{"status", "--kind", "img"}, 0, []string{`Plugin kind img (seccomp profile "block")`, "pread64"}, nil},
		{[]string{"help"}, 0, []string{"usage: krun-core sandbox status"}, nil},
		{nil, 1, nil, []string{"no command given"}},
		{[]string{"frob"}, 1, nil, []string{`unknown command "frob"`}},
		{[]string{"status", "--kind", "gpu"}, 1, nil, []string{`no built-in plugin kind "gpu" (want blk, net, console, fs, img); a third-party plugin starts under the io profile's filter (the calls of --kind blk and --kind net together)`}},
		{[]string{"status", "extra"}, 1, nil, []string{"unexpected argument", "(see krun-core sandbox status --help)"}},
		{[]string{"status", "--bogus"}, 1, nil, []string{"unknown flag --bogus"}},
		{[]string{"status", "--output", "xml"}, 1, nil, []string{`--output="xml"`}},
		{[]string{"status", "--help"}, 0, []string{"usage: krun-core sandbox status", "--kind KIND", "--output FORMAT", "A third-party plugin (--plugin KIND"}, nil},
	}
	for _, c := range cases {
		var out, errb bytes.Buffer
		if code := sandboxCommand(c.args, &out, &errb); code != c.code {
			t.Errorf("%q: exit %d, want %d (stderr %q)", c.args, code, c.code, errb.String())
		}
		for _, s := range c.out {
			if !strings.Contains(out.String(), s) {
				t.Errorf("%q: stdout lacks %q", c.args, s)
			}
		}
		for _, s := range c.err {
			if !strings.Contains(errb.String(), s) {
				t.Errorf("%q: stderr %q lacks %q", c.args, errb.String(), s)
			}
		}
	}
	// The blk-only text must not show the other kinds.
	var out bytes.Buffer
	sandboxCommand([]string{"status", "--kind", "blk"}, &out, &out)
	if strings.Contains(out.String(), "Plugin kind fs") {
		t.Error("--kind blk shows fs")
	}
}

func TestSandboxStatusJSON(t *testing.T) {
	var out, errb bytes.Buffer
	if code := sandboxCommand([]string{"status", "--output", "json"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var r sandbox.StatusReport
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Layers) != len(sandbox.Layers()) || len(r.Kinds) != len(sandbox.BuiltinKinds) {
		t.Fatalf("%d layers, %d kinds", len(r.Layers), len(r.Kinds))
	}
	for _, k := range r.Kinds {
		if len(k.Syscalls) == 0 || k.Refused == "" {
			t.Errorf("kind %s: %+v", k.Kind, k)
		}
	}
}
