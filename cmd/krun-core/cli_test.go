package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// Every command's page: on stdout, exit 0, flags with two dashes.
func TestHelpPages(t *testing.T) {
	singleDash := regexp.MustCompile(`(^|[\s\[(|,])-[a-z][a-z-]+`)
	for _, args := range [][]string{
		{"--help"}, {"help"}, {"-h"}, {"help", "run"}, {"help", "help"},
		{"run", "--help"}, {"run", "-h"}, {"serve", "--help"},
		{"img", "--help"}, {"img", "info", "--help"}, {"img", "check", "--help"},
		{"img", "verify", "--help"}, {"img", "create", "--help"}, {"img", "convert", "--help"},
		{"img", "import", "--help"}, {"img", "resize", "--help"}, {"img", "probe", "--help"}, {"sandbox", "--help"}, {"sandbox", "status", "--help"},
		{"doctor", "--help"}, {"help", "img", "create"}, {"help", "sandbox", "status"},
	} {
		var out, errb bytes.Buffer
		rc := dispatch(args, &out, &errb)
		if rc != 0 || errb.Len() != 0 || !strings.HasPrefix(out.String(), "usage: krun-core") {
			t.Errorf("%q: exit %d, stdout %.60q, stderr %q: want the page on stdout and exit 0", args, rc, out.String(), errb.String())
		}
		if args[0] == "help" && (len(args) == 1 || args[1] == "help") && !strings.HasPrefix(out.String(), "usage: krun-core COMMAND") {
			t.Errorf("%q: page starts %.60q, want krun-core's own", args, out.String())
		}
		// help CMD SUB is the page of CMD SUB --help (from review: it was
		// CMD's).
		if want := "usage: krun-core " + strings.Join(args[1:], " "); args[0] == "help" && len(args) == 3 && !strings.HasPrefix(out.String(), want) {
			t.Errorf("%q: page starts %.60q, want %q", args, out.String(), want)
		}
		if m := singleDash.FindString(out.String()); m != "" {
			t.Errorf("%q: page spells a flag with one dash: %q", args, m)
		}
		want := "usage: krun-core " + strings.Join(args[:len(args)-1], " ")
		if len(args) > 1 && args[0] != "help" && !strings.HasPrefix(out.String(), want) {
			t.Errorf("%q: page starts %.60q, want its own page %q", args, out.String(), want)
		}
	}
	// A flag's placeholder names what it takes (it read "--tty AUTO").
	var runPage bytes.Buffer
	dispatch([]string{"run", "--help"}, &runPage, &runPage)
	if !strings.Contains(runPage.String(), "--tty MODE ") {
		t.Errorf("run --help lacks %q", "--tty MODE")
	}
	// Pages listing options generated from the flags show the log flags.
	for _, args := range [][]string{{"run", "--help"}, {"doctor", "--help"}, {"sandbox", "status", "--help"}} {
		var out bytes.Buffer
		dispatch(args, &out, &out)
		page := strings.Join(strings.Fields(out.String()), " ")
		for _, f := range []string{"--log-level LEVEL", "--log-format FORMAT", "(default warn)"} {
			if !strings.Contains(page, f) {
				t.Errorf("%q: page lacks %q", args, f)
			}
		}
	}
}

// Bad input: one line on stderr, exit 1, never the usage.
func TestBadInputIsOneLine(t *testing.T) {
	t.Setenv("KRUN_PLUGIN_DIR", "")
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "krun-core: no command given (see krun-core --help)"},
		{[]string{"frob"}, `krun-core: unknown command "frob" (see krun-core --help)`},
		{[]string{"--frob"}, `krun-core: unknown option "--frob" (see krun-core --help)`},
		{[]string{"run", "--bogus"}, "krun-core run: unknown flag --bogus (see krun-core run --help)"},
		{[]string{"serve", "--bogus"}, "krun-core serve: unknown flag --bogus (see krun-core serve --help)"},
		{[]string{"bench", "blk"}, "krun-core: bench is a program of its own: krun-bench (see krun-bench --help)"},
		{[]string{"img"}, "krun-core img: no command given (see krun-core img --help)"},
		{[]string{"img", "create", "--bogus"}, "krun-core img create: unknown flag --bogus (see krun-core img create --help)"},
		{[]string{"sandbox"}, "krun-core sandbox: no command given (see krun-core sandbox --help)"},
		{[]string{"sandbox", "status", "--log-level", "loud"}, `krun-core sandbox status: --log-level="loud": want trace, debug, info, warn or error`},
		{[]string{"doctor", "--bogus"}, "krun-core doctor: unknown flag --bogus (see krun-core doctor --help)"},
		{[]string{"doctor", "--log-format", "xml"}, `krun-core doctor: --log-format="xml": want text or json`},
		{[]string{"doctor", "--output", "yaml"}, `krun-core doctor: --output="yaml": want human or json`},
	} {
		var out, errb bytes.Buffer
		rc := dispatch(tt.args, &out, &errb)
		if rc != 1 || out.Len() != 0 || errb.String() != tt.want+"\n" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 1 and the one line %q", tt.args, rc, out.String(), errb.String(), tt.want)
		}
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version"} {
		var out, errb bytes.Buffer
		if rc := dispatch([]string{arg}, &out, &errb); rc != 0 || !strings.HasPrefix(out.String(), "krun-core ") ||
			!strings.Contains(out.String(), "plugin protocol 1") || strings.Count(out.String(), "\n") != 1 {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", arg, rc, out.String(), errb.String())
		}
	}
}

// serve --log-format json: every line krun-core writes is hclog JSON, the
// plugin's lines included, with their types.
func TestServeLogFormatJSON(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--log-format", "json", "--socket", sock, "--plugin", "null")
	waitSocket(t, s, sock)
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(s.log(), `"@message":"serving"`); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no serving line")
		}
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.waitExit(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	plugin := 0
	sc := bufio.NewScanner(strings.NewReader(s.log()))
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Errorf("not a JSON line: %q", sc.Text())
			continue
		}
		if e["@module"] == "krun-core.krun-plugin-null" {
			plugin++
			if _, ok := e["timestamp"]; ok {
				t.Errorf("plugin line with a second timestamp: %q", sc.Text())
			}
		}
		if e["@message"] == "serving" {
			if pid, ok := e["pid"].(float64); !ok || pid <= 0 {
				t.Errorf("serving line's pid is not a number: %q", sc.Text())
			}
		}
	}
	if plugin == 0 {
		t.Errorf("no plugin line in the log:\n%s", s.log())
	}
}

// serve with the default level logs nothing on success.
func TestServeQuietByDefault(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--log-level", cli.DefaultLogLevel, "--socket", sock, "--plugin", "null")
	waitSocket(t, s, sock)
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.waitExit(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if l := s.log(); l != "" {
		t.Errorf("serve at the default level wrote:\n%s", l)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("socket left behind")
	}
}

// docs/PLUGINS.md's sequence: a plugin built into the current directory is
// served with --plugin-dir . or KRUN_PLUGIN_DIR=.; a copy under another
// name is refused; a --plugin-dir that does not exist is an error.
func TestServePluginDiscovery(t *testing.T) {
	bin := buildServeBinaries(t)
	krun := filepath.Join(bin, "krun-core")
	cwd := t.TempDir()
	b, err := os.ReadFile(filepath.Join(bin, "krun-plugin-null"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"krun-plugin-null", "krun-plugin-other"} {
		if err := os.WriteFile(filepath.Join(cwd, name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// krun-core is somewhere else: the plugin next to it must not be the
	// one found.
	elsewhere := t.TempDir()
	kb, _ := os.ReadFile(krun)
	os.WriteFile(filepath.Join(elsewhere, "krun-core"), kb, 0o755)
	krun = filepath.Join(elsewhere, "krun-core")
	for _, tt := range []struct {
		name string
		args []string
		env  string
	}{
		{"--plugin-dir .", []string{"--plugin-dir", "."}, ""},
		{"KRUN_PLUGIN_DIR=.", nil, "."},
	} {
		sock := filepath.Join(t.TempDir(), "rng.sock")
		cmd := exec.Command(krun, append(append([]string{"serve"}, tt.args...), "--socket", sock, "--plugin", "null")...)
		cmd.Dir = cwd
		cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR="+tt.env)
		var out syncbuf.Buffer
		cmd.Stderr = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("%s: no socket: %s", tt.name, out.String())
			}
		}
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Errorf("%s: %v: %s", tt.name, err, out.String())
		}
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--plugin-dir", ".", "--plugin", "other"}, `krun-core serve: plugin other: ` + filepath.Join(cwd, "krun-plugin-other") + ` reports kind "null"; a plugin's executable must be named krun-plugin-null, refused`},
		{[]string{"--plugin-dir", "./nope", "--plugin", "null"}, "krun-core serve: --plugin-dir ./nope: no such directory (see krun-core serve --help)"},
	} {
		cmd := exec.Command(krun, append([]string{"serve", "--socket", filepath.Join(t.TempDir(), "s.sock")}, tt.args...)...)
		cmd.Dir = cwd
		cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || string(out) != tt.want+"\n" {
			t.Errorf("serve %q: %v, output %q; want exit 1 and %q", tt.args, err, out, tt.want)
		}
	}
}

// img create -f qcow2 FILE SIZE, as with qemu-img.
func TestImgCreatePositionalSize(t *testing.T) {
	bin := buildServeBinaries(t, "img")
	img := filepath.Join(t.TempDir(), "d.qcow2")
	var out, errb bytes.Buffer
	if rc := imgCommand([]string{"create", "-f", "qcow2", "--plugin-dir", bin, img, "10M"}, &out, &errb); rc != 0 {
		t.Fatalf("exit %d: %s", rc, errb.String())
	}
	out.Reset()
	if rc := imgCommand([]string{"info", "-f", "qcow2", "--plugin-dir", bin, "--output", "json", img}, &out, &errb); rc != 0 {
		t.Fatalf("info: exit %d: %s", rc, errb.String())
	}
	var info map[string]any
	if err := json.Unmarshal(out.Bytes(), &info); err != nil || info["virtual-size"] != float64(10<<20) || info["format"] != "qcow2" {
		t.Errorf("info %s: %v", out.String(), err)
	}
}
