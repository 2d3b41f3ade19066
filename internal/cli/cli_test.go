package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestNewLogger(t *testing.T) {
	var b bytes.Buffer
	l, err := NewLogger("krun-core", "info", "json", &b)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("hello", "n", 3)
	var e map[string]any
	if err := json.Unmarshal(b.Bytes(), &e); err != nil || e["@message"] != "hello" || e["n"] != 3.0 || e["@module"] != "krun-core" {
		t.Errorf("JSON log line %q: %v", b.String(), err)
	}
	if l, err := NewLogger("krun-core", DefaultLogLevel, "text", &b); err != nil || l.GetLevel() != hclog.Warn {
		t.Errorf("default level: %v, %v", l, err)
	}
	for _, bad := range [][2]string{{"loud", "text"}, {"off", "text"}, {"info", "xml"}} {
		if _, err := NewLogger("krun-core", bad[0], bad[1], &b); err == nil {
			t.Errorf("NewLogger(%q, %q) accepted", bad[0], bad[1])
		}
	}
}

func TestFlags(t *testing.T) {
	f := NewFlags("krun-bench blk", "usage: krun-bench blk [options]")
	socket := f.String("socket", "", "unix socket `PATH`")
	var out, errb bytes.Buffer
	if rc, done := f.ParseArgs([]string{"--help"}, &out, &errb); rc != 0 || !done || !strings.Contains(out.String(), "--socket PATH") || errb.Len() != 0 {
		t.Errorf("--help: %d %v, stdout %q, stderr %q", rc, done, out.String(), errb.String())
	}
	out.Reset()
	if rc, done := f.ParseArgs([]string{"--bogus"}, &out, &errb); rc != 1 || !done ||
		errb.String() != "krun-bench blk: unknown flag --bogus (see krun-bench blk --help)\n" {
		t.Errorf("--bogus: %d %v, stderr %q", rc, done, errb.String())
	}
	f = NewFlags("krun-bench blk", "")
	socket = f.String("socket", "", "")
	if rc, done := f.ParseArgs([]string{"--socket", "/x", "--log-level", "debug"}, &out, &errb); rc != 0 || done || *socket != "/x" {
		t.Fatalf("parse: %d %v %q", rc, done, *socket)
	}
	var logb bytes.Buffer
	l, err := f.Logger(&logb)
	if err != nil || l.GetLevel() != hclog.Debug || l.Name() != "krun-bench" {
		t.Errorf("logger %v (%q), %v", l, l.Name(), err)
	}
	errb.Reset()
	if rc := f.Fail(&errb, errors.New("two\nlines")); rc != 1 || errb.String() != "krun-bench blk: two lines\n" {
		t.Errorf("Fail: %d %q", rc, errb.String())
	}
	if err := FlagError("x", errors.New("flag provided but not defined: -frob")); err.Error() != "unknown flag --frob (see x --help)" {
		t.Errorf("FlagError: %v", err)
	}
	_ = flag.ErrHelp
}

// TestReport: --output json prints v as JSON and never calls human;
// human prints through human alone.
func TestReport(t *testing.T) {
	v := map[string]int{"iops": 7}
	for _, tc := range []struct{ output, want string }{
		{"json", "{\n  \"iops\": 7\n}\n"},
		{"human", "iops 7\n"},
	} {
		var b strings.Builder
		err := Report(&b, tc.output, v, func(w io.Writer) { fmt.Fprintf(w, "iops %d\n", v["iops"]) })
		if err != nil || b.String() != tc.want {
			t.Errorf("Report(%s) = %q, %v; want %q", tc.output, b.String(), err, tc.want)
		}
	}
}

// TestFlagErrorWording: the flag package's messages in this command line's
// spelling; a boolean's says what was wanted instead of "parse error"
// (from review: "for -timing: parse error").
func TestFlagErrorWording(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--timing=maybe"}, `invalid value "maybe" for flag --timing: want true or false (see x --help)`},
		{[]string{"--cpus", "two"}, `invalid value "two" for flag --cpus: parse error (see x --help)`},
		// A duration's message reads like a number's: no claim of a type.
		{[]string{"--timeout", "5x"}, `invalid value "5x" for flag --timeout: parse error (see x --help)`},
		{[]string{"--cpus", "99999999999999999999"}, `invalid value "99999999999999999999" for flag --cpus: out of range (see x --help)`},
		{[]string{"--frob"}, "unknown flag --frob (see x --help)"},
		{[]string{"--cpus"}, "a value is needed for --cpus (see x --help)"},
		{[]string{"-v=maybe"}, `invalid value "maybe" for flag -v: want true or false (see x --help)`},
	}
	for _, tc := range tests {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.Bool("timing", false, "")
		fs.Bool("v", false, "")
		fs.Uint("cpus", 1, "")
		fs.Duration("timeout", 0, "")
		err := fs.Parse(tc.args)
		if err == nil {
			t.Fatalf("%q parsed", tc.args)
		}
		if got := FlagError("x", err).Error(); got != tc.want {
			t.Errorf("%q: %q, want %q", tc.args, got, tc.want)
		}
	}
}
