package main

// The command-line surface as a demanding user meets it (from review,
// helper-89). Each test failed on the code as reviewed; none needs KVM, a
// plugin or a guest.

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/oci"
)

func reviewDispatch(args ...string) (string, string, int) {
	var out, errb bytes.Buffer
	rc := dispatch(args, &out, &errb)
	return out.String(), errb.String(), rc
}

// TestCPUsDecimal: --cpus was a flag.Int, which reads 0-prefixed numbers
// as octal and takes 0x, 0b, 0o and digit underscores: `--cpus 010` booted
// 8 vCPUs, `--cpus 0300` 192 where 300 is refused, and `--cpus 08` said
// only "parse error" (from review, helper-89). It is decimal now, as every
// other number on the command line: 010 is 10.
func TestCPUsDecimal(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	for _, c := range []struct {
		v  string
		ok bool
	}{
		{"010", true}, {"08", true}, {"255", true},
		{"0300", false}, {"300", false}, {"0", false}, {"-1", false}, {"+2", false},
		{"0x2", false}, {"0b11", false}, {"1_0", false}, {"", false},
	} {
		_, stderr, rc := reviewDispatch("run", "--cpus", c.v, "--kernel", "/nonexistent/bzImage")
		parsed := strings.Contains(stderr, "/nonexistent/bzImage")
		if parsed != c.ok || rc == 0 || strings.Count(stderr, "\n") != 1 {
			t.Errorf("run --cpus %q: exit %d, %q: want it accepted %v", c.v, rc, strings.TrimSpace(stderr), c.ok)
		}
		if !c.ok && !strings.Contains(stderr, "want a decimal number from 1 to 255 vCPUs") {
			t.Errorf("run --cpus %q: %q does not say what is wanted", c.v, strings.TrimSpace(stderr))
		}
	}
}

// TestGatePolicyGivenTwiceRefused: a single-valued option given twice
// keeps its last value, as with most tools, but the upload gate's policy
// is refused instead: a second --max-size (a wrapper's cap, then the
// caller's arguments) loosened the cap without a word (from review,
// helper-89).
func TestGatePolicyGivenTwiceRefused(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		flag string
	}{
		{[]string{"img", "verify", "-f", "raw", "--max-size", "1M", "--max-size", "1T", filepath.Join(dir, "missing.img")}, "--max-size"},
		{[]string{"img", "verify", "-f", "raw", "--format", "qcow2", filepath.Join(dir, "missing.img")}, "--format"},
		{[]string{"img", "verify", "-f", "qcow2", "--backing-dir", dir, "--backing-dir", "/", filepath.Join(dir, "missing.img")}, "--backing-dir"},
		{[]string{"img", "import", "-f", "qcow2", "--max-size", "1M", "--max-size", "1T", filepath.Join(dir, "out.qcow2")}, "--max-size"},
		{[]string{"img", "import", "--from-format", "raw", "--from-format", "qcow2", "-f", "raw", filepath.Join(dir, "out.raw")}, "--from-format"},
	} {
		_, stderr, rc := reviewDispatch(tt.args...)
		if rc == 0 || !strings.Contains(stderr, tt.flag) || !strings.Contains(stderr, "given twice") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, %q: want %s refused as given twice, in one line", tt.args, rc, strings.TrimSpace(stderr), tt.flag)
		}
	}
}

// `krun-core version --bogus` and `krun-core --version extra` print the
// version and exit 0: a typo after it is accepted silently, where every
// other command refuses an unknown flag or argument.
func TestVersionRefusesExtraArguments(t *testing.T) {
	for _, args := range [][]string{{"version", "--bogus"}, {"--version", "extra"}, {"version", "--output", "json"}} {
		_, stderr, rc := reviewDispatch(args...)
		if rc == 0 {
			t.Errorf("%q: exit 0 (stderr %q): want an unknown flag/argument line and exit 1", args, stderr)
		}
	}
}

// `krun-core sandbox help frob` prints the page and exits 0, where
// `krun-core help frob` and `krun-core img help frob` are bad input
// (TestHelpUnknownCommand).
func TestSandboxHelpUnknownCommand(t *testing.T) {
	_, _, rc := reviewDispatch("sandbox", "help", "frob")
	if rc == 0 {
		t.Errorf("sandbox help frob: exit 0, want an unknown-command line and exit 1")
	}
}

// A stray argument without "--" and without --root (say a kernel
// parameter meant for --cmdline) exits 125, the status of `run -- CMD`;
// docs/RUN.md: "Without -- CMD (run --kernel K --initrd I), run exits ...
// 1 on its own failures".
func TestStrayArgumentExits1(t *testing.T) {
	_, stderr, rc := reviewDispatch("run", "--kernel", "/nonexistent/bzImage", "console=ttyS0")
	if rc != 1 {
		t.Errorf("run --kernel K console=ttyS0: exit %d (%q), want 1 (no -- CMD was given)", rc, strings.TrimSpace(stderr))
	}
}

// `img resize FILE -1G -f raw` (options after the size, as qemu-img
// users write them) says "unknown flag --1G": a flag the user never
// typed, spelled with two dashes.
func TestResizeNegativeSizeNotLast(t *testing.T) {
	_, stderr, _ := reviewDispatch("img", "resize", "/nonexistent.raw", "-1G", "-f", "raw")
	if strings.Contains(stderr, "--1G") {
		t.Errorf("img resize FILE -1G -f raw: %q: names a flag --1G the user did not type", strings.TrimSpace(stderr))
	}
}

// An empty value is taken as "not given": `img create --compression ""`
// and `img check -r ""` go ahead (a variable that expanded to nothing).
func TestEmptyValuesRefused(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		flag string
	}{
		{[]string{"img", "create", "-f", "qcow2", "--compression", "", filepath.Join(dir, "nodir", "x.qcow2"), "1M"}, "--compression"},
		{[]string{"img", "check", "-f", "qcow2", "--repair", "", filepath.Join(dir, "missing.qcow2")}, "--repair"},
	} {
		_, stderr, rc := reviewDispatch(tt.args...)
		if rc == 0 || !strings.Contains(stderr, tt.flag) {
			t.Errorf("%q: exit %d, %q: want the empty %s refused", tt.args, rc, strings.TrimSpace(stderr), tt.flag)
		}
	}
}

// TestOCIPluginIDsDecimal: krun-oci's --plugin-uid/--plugin-gid were
// flag.Int: octal (010 was uid 8), hex, and ids past 32 bits were taken,
// where krun-core's --plugin-uid (sandbox.ParseHostID) takes decimal
// 1..4294967294 only (from review, helper-89). Now the same.
func TestOCIPluginIDsDecimal(t *testing.T) {
	dir := t.TempDir()
	for _, flag := range []string{"--plugin-uid", "--plugin-gid"} {
		for _, c := range []struct {
			v  string
			ok bool
		}{
			{"010", true}, {"1000", true}, {"4294967294", true},
			{"0x3e8", false}, {"4294967295", false}, {"4294967296", false}, {"+5", false}, {"-1", false}, {"0", false}, {"", false},
		} {
			stdout, _ := os.Create(filepath.Join(dir, "stdout"))
			stderr, _ := os.Create(filepath.Join(dir, "stderr"))
			rc := oci.Main([]string{"--root", filepath.Join(dir, "state"), flag, c.v, "list"}, &oci.Env{Stdin: os.Stdin, Stdout: stdout, Stderr: stderr})
			stdout.Close()
			stderr.Close()
			if (rc == 0) != c.ok {
				msg, _ := os.ReadFile(filepath.Join(dir, "stderr"))
				t.Errorf("krun-oci %s %q list: exit %d (%q), want accepted %v", flag, c.v, rc, strings.TrimSpace(string(msg)), c.ok)
			}
		}
	}
}

// `krun-core version --help` (and -h, and `help version`) prints a page and
// exits 0, as every command's --help does (README, "Command line"); it
// was refused as an unexpected argument, exit 1 (from review, helper-114).
func TestVersionHelp(t *testing.T) {
	for _, args := range [][]string{{"version", "--help"}, {"--version", "-h"}, {"help", "version"}} {
		stdout, stderr, rc := reviewDispatch(args...)
		if rc != 0 || stderr != "" || !strings.HasPrefix(stdout, "usage: krun-core --version") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q: want the page on stdout and exit 0", args, rc, stdout, stderr)
		}
	}
}

// An empty FILE, OUT or SIZE argument (a shell variable that expanded to
// nothing) is named as empty, as an empty option value is. `img info -f
// raw ""` said "image: open : no such file or directory" and `img create
// -f raw "" 1G` "output: create : no such file or directory" (from
// review, helper-114).
func TestImgEmptyArgument(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"img", "info", "-f", "raw", ""}, "the FILE argument is empty"},
		{[]string{"img", "create", "-f", "raw", "", "1G"}, "the FILE argument is empty"},
		{[]string{"img", "create", "-f", "raw", filepath.Join(dir, "x.raw"), ""}, "the SIZE argument is empty"},
		{[]string{"img", "convert", "-f", "raw", "-O", "raw", filepath.Join(dir, "in.raw"), ""}, "the OUT argument is empty"},
		{[]string{"img", "resize", "-f", "raw", "--", "", "+1M"}, "the FILE argument is empty"},
		// The backing chain's flags are repeatable, outside the check of
		// the others: -b "" named the working directory ("backing file
		// /cwd is not a regular file").
		{[]string{"img", "convert", "-f", "raw", "-O", "qcow2", "-b", "", filepath.Join(dir, "in.raw"), filepath.Join(dir, "o")}, `flag -b: an empty value`},
		{[]string{"img", "convert", "-f", "raw", "-O", "qcow2", "--backing", "b", "--backing-format", "", filepath.Join(dir, "in.raw"), filepath.Join(dir, "o")}, `flag --backing-format: an empty value`},
		{[]string{"img", "resize", "-f", "qcow2", "--backing", "", "--", filepath.Join(dir, "in.raw"), "+1M"}, `flag --backing: an empty value`},
	} {
		_, stderr, rc := reviewDispatch(tt.args...)
		if rc != 1 || !strings.Contains(stderr, tt.want) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, %q: want exit 1 and %q", tt.args, rc, strings.TrimSpace(stderr), tt.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x.raw")); err == nil {
		t.Error("img create with an empty SIZE left its output behind")
	}
}
