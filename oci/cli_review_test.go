package oci

// krun-oci's command line against runc's. (From review; tests by a helper.)

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// mainWith runs Main in-process with files for stdout and stderr.
func mainWith(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	dir := t.TempDir()
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	errf, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer errf.Close()
	code := Main(args, &Env{NewVM: newFakeVM, Stdin: os.Stdin, Stdout: out, Stderr: errf})
	o, _ := os.ReadFile(out.Name())
	e, _ := os.ReadFile(errf.Name())
	return string(o), string(e), code
}

// `krun-oci COMMAND --help` (or -h) asks for help, as `runc COMMAND
// --help` does: it must not fail with exit 1 and the flag package's
// internal "flag: help requested".
func TestCommandHelpIsNotAFailure(t *testing.T) {
	root := t.TempDir()
	for _, cmd := range []string{"create", "start", "state", "kill", "delete", "run", "exec", "list", "ps"} {
		for _, h := range []string{"--help", "-h"} {
			out, stderr, code := mainWith(t, "--root", root, cmd, h)
			if code != 0 || strings.Contains(stderr, "help requested") || out == "" {
				t.Errorf("krun-oci %s %s: exit %d, stdout %q, stderr %q; want a help page on stdout and exit 0", cmd, h, code, out, stderr)
			}
		}
	}
}

// TestCommandHelpDescribesEachFlag: every command's help page gives each
// flag a description, its short and long forms on one line (it listed
// bare names, "-b VALUE" and "--bundle VALUE" apart, and nothing about
// them; found in review, helper-130).
func TestCommandHelpDescribesEachFlag(t *testing.T) {
	root := t.TempDir()
	for _, c := range []struct {
		cmd  string
		want []string
	}{
		{"create", []string{"  -b, --bundle DIR ", "  --pid-file FILE ", "  --preserve-fds N "}},
		{"run", []string{"  -d, --detach ", "  --keep "}},
		{"exec", []string{"  -e, --env KEY=VALUE ", "  -u, --user UID[:GID] ", "  -t, --tty "}},
		{"kill", []string{"  -a, --all "}},
		{"delete", []string{"  -f, --force "}},
		{"list", []string{"  -f, --format FORMAT ", "  -q, --quiet "}},
		{"ps", []string{"  -f, --format FORMAT "}},
	} {
		out, _, code := mainWith(t, "--root", root, c.cmd, "--help")
		if code != 0 {
			t.Fatalf("%s --help: exit %d", c.cmd, code)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s --help lacks %q:\n%s", c.cmd, w, out)
			}
		}
		_, opts, _ := strings.Cut(out, "options:\n")
		for _, line := range strings.Split(strings.TrimRight(opts, "\n"), "\n") {
			if strings.HasPrefix(line, "docs/") {
				break
			}
			// "  NAMES  description": two spaces at least between.
			if f := strings.Fields(line); !strings.HasPrefix(line, "  -") || len(f) < 2 || !strings.Contains(strings.TrimSpace(line), "  ") {
				t.Errorf("%s --help: flag line without a description: %q", c.cmd, line)
			}
		}
	}
}

// `krun-oci delete --force ID` of a container that does not exist
// succeeds, as runc's does (delete.go: "if force { return nil }"):
// engines clean up with it after a create that failed half-way.
func TestForceDeleteOfMissingContainerSucceeds(t *testing.T) {
	root := t.TempDir()
	for _, f := range []string{"--force", "-f"} {
		_, stderr, code := mainWith(t, "--root", root, "delete", f, "never-created")
		if code != 0 {
			t.Errorf("krun-oci delete %s never-created: exit %d, stderr %q; runc exits 0", f, code, stderr)
		}
	}
	// Without --force it stays an error, as with runc.
	if _, _, code := mainWith(t, "--root", root, "delete", "never-created"); code == 0 {
		t.Errorf("krun-oci delete never-created: exit 0, want 1")
	}
}

// `krun-oci run ID` in the foreground forwards the signals it gets to the
// command, as `runc run` does (and as krun-oci's own exec does): ^C at a
// terminal (SIGINT to the foreground group, which the setsid monitor is
// not in) or a caller's SIGTERM ends the command, and run exits with its
// status (128+N) and deletes the container. Without forwarding run dies
// of the signal and leaves the container running, never deleted.
func TestForegroundRunForwardsSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			r := newRT(t)
			b := bundle(t, []string{"sleep", "100"}, nil)
			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(exe, "--root", r.root, "run", "--bundle", b, "fg1")
			cmd.Env = append(os.Environ(), asRuntime+"=1")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if c, err := (&Store{Root: r.root}).Read("fg1"); err == nil && c.Status() == specs.StateRunning {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatal("the container did not start running")
				}
			}
			cmd.Process.Signal(sig)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatal("run did not end after the signal")
			}
			code := cmd.ProcessState.ExitCode()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				code = -int(ws.Signal())
			}
			if code != 128+int(sig) {
				t.Errorf("run got %v: exit %d (negative: killed by that signal), want %d, the command's status", sig, code, 128+int(sig))
			}
			time.Sleep(500 * time.Millisecond)
			if out, _, c := r.run(nil, nil, "state", "fg1"); c == 0 {
				t.Errorf("run ended by %v left the container behind:\n%s", sig, out)
			}
		})
	}
}

// docs/OCI.md: "podman reads the JSON file as a single object, so with
// --log-format json the file gets nothing else unless --debug is given."
// create logs a warning there first (a mount point it cannot make), so a
// create that then fails leaves two objects, which podman's
// json.Unmarshal of the file rejects, losing the runtime's reason.
func TestJSONLogFileHoldsOneObjectAfterWarning(t *testing.T) {
	r := newRT(t)
	logFile := filepath.Join(t.TempDir(), "log.json")
	b := bundle(t, []string{"fail-boot"}, func(s *specs.Spec) {
		s.Mounts = append(s.Mounts, specs.Mount{Destination: "/file/sub", Type: "tmpfs", Source: "tmpfs"})
	})
	// /file is a regular file: no mount point can be made beneath it.
	if err := os.WriteFile(filepath.Join(b, "rootfs", "file"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, e, code := r.run(nil, nil, "--log", logFile, "--log-format", "json", "create", "--bundle", b, "w1")
	if code != 1 || !strings.Contains(e, "could not boot") {
		t.Fatalf("create: exit %d, stderr %q; want the fake boot failure", code, e)
	}
	lb, _ := os.ReadFile(logFile)
	var line struct{ Level, Msg, Time string }
	if err := json.Unmarshal(lb, &line); err != nil || line.Level != "error" || !strings.Contains(line.Msg, "could not boot") {
		t.Errorf("log file, read as podman reads it (one JSON object): %v %+v; file:\n%s", err, line, lb)
	}
}
