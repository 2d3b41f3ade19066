package oci

// Bad input to krun-oci: one line, and nothing left behind (from review).

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestBadGlobalFlagIsOneLine: a bad global flag (`krun-oci --frob state
// x`, an id out of range, a bad boolean) is one line naming the flag with
// two dashes. Before the fix the flag package's line ("-frob") came with
// the 18-line usage (from review).
func TestBadGlobalFlagIsOneLine(t *testing.T) {
	r := newRT(t)
	for _, args := range [][]string{
		{"--frob", "state", "x"},
		{"--plugin-uid", "99999999999999999999", "state", "x"},
		{"--debug=maybe", "state", "x"},
		{"exec", "--frob", "x", "true"},
	} {
		_, stderr, code := r.run(nil, nil, args...)
		lines := strings.Count(strings.TrimRight(stderr, "\n"), "\n") + 1
		if code == 0 || lines != 1 {
			t.Errorf("krun-oci %q: exit %d, %d lines on stderr, want exit 1 and one line:\n%s", args, code, lines, stderr)
		}
		if slices.Contains(args, "--frob") && !strings.Contains(stderr, "unknown flag --frob") {
			t.Errorf("krun-oci %q: %q, want the flag named with two dashes", args, stderr)
		}
	}
}

// TestPluginIDZeroRefused: --plugin-uid 0 or --plugin-gid 0 asks for
// plugins running as host root, which krun-core run refuses; krun-oci took
// it silently as "the default" (from review).
func TestPluginIDZeroRefused(t *testing.T) {
	r := newRT(t)
	for _, flag := range []string{"--plugin-uid", "--plugin-gid"} {
		_, stderr, code := r.run(nil, nil, flag, "0", "list")
		if code != 1 || !strings.Contains(stderr, "never run as host root") {
			t.Errorf("krun-oci %s 0 list: exit %d, %q; want exit 1 and the refusal", flag, code, stderr)
		}
	}
	if _, stderr, code := r.run(nil, nil, "list"); code != 0 {
		t.Errorf("krun-oci list without the flags: exit %d, %q", code, stderr)
	}
}

// TestMissingConfigJSONNamed: `krun-oci create -b BUNDLE ID` where BUNDLE
// has no config.json names config.json. It said "bundle BUNDLE: no such
// file or directory", as if the bundle were missing (from review).
func TestMissingConfigJSONNamed(t *testing.T) {
	r := newRT(t)
	b := t.TempDir()
	if err := os.Mkdir(filepath.Join(b, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := r.run(nil, nil, "create", "--bundle", b, "c1")
	if code == 0 || !strings.Contains(stderr, "config.json") {
		t.Errorf("create with a bundle without config.json: exit %d, %q: want config.json named", code, stderr)
	}
}

// TestSignalDuringCreateLeavesNoState: a `krun-oci create` ended by
// SIGTERM or SIGHUP while it sets the container up (here in a
// createRuntime hook; on a real host also while the guest boots) removes
// what it made. Before the fix nothing caught those signals in create,
// and its state stayed, "creating", shown by list as a stopped container
// nobody made (from review).
func TestSignalDuringCreateLeavesNoState(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(sig.String(), func(t *testing.T) {
			r := newRT(t)
			marker := filepath.Join(t.TempDir(), "hook-started")
			b := bundle(t, []string{"true"}, func(s *specs.Spec) {
				s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh",
					Args: []string{"sh", "-c", "touch " + marker + "; sleep 3"}}}}
			})
			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(exe, "--root", r.root, "create", "--bundle", b, "sig1")
			cmd.Env = append(os.Environ(), asRuntime+"=1")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, err := os.Stat(marker); err == nil {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatal("the hook did not start")
				}
			}
			cmd.Process.Signal(sig)
			cmd.Wait()
			time.Sleep(4 * time.Second) // the hook and the monitor end
			ids, _ := (&Store{Root: r.root}).List()
			if len(ids) != 0 {
				out, _, _ := r.run(nil, nil, "list")
				t.Errorf("create ended by %v (%v) left containers %q behind:\n%s", sig, cmd.ProcessState, ids, out)
			}
		})
	}
}

// TestEmptyRootRefused: `krun-oci --root "" ...` (a variable that is not
// set) took the working directory as the state root, where every
// subdirectory reads as a container whose create died: `delete NAME`
// removed ./NAME with everything in it (from review, helper-114).
func TestEmptyRootRefused(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "data")
	if err := os.MkdirAll(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(victim, "file"), []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	for _, args := range [][]string{{"--root", "", "delete", "data"}, {"--root", "", "delete", "--force", "data"}, {"--root", "", "list"}} {
		_, stderr, code := mainWith(t, args...)
		if code != 1 || !strings.Contains(stderr, "--root is empty") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("krun-oci %q: exit %d, %q: want exit 1 and one line saying --root is empty", args, code, stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(victim, "file")); err != nil {
		t.Errorf("krun-oci --root \"\" delete data removed ./data: %v", err)
	}
}

// TestConfigJSONNotRegular: a config.json that is a FIFO hung `krun-oci
// create` in open(2) for ever; one that is a directory or a device is
// refused as well, in one line (from review, helper-114).
func TestConfigJSONNotRegular(t *testing.T) {
	for _, kind := range []string{"fifo", "dir", "dev"} {
		b := t.TempDir()
		p := filepath.Join(b, "config.json")
		var err error
		switch kind {
		case "fifo":
			err = syscall.Mkfifo(p, 0o644)
		case "dir":
			err = os.Mkdir(p, 0o755)
		case "dev":
			err = os.Symlink("/dev/zero", p)
		}
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { _, err := LoadSpec(b); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "config.json is not a regular file") || strings.Contains(err.Error(), "\n") {
				t.Errorf("config.json a %s: %v, want one line saying it is not a regular file", kind, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("config.json a %s: LoadSpec still blocked after 5 s", kind)
		}
	}
}

// TestProcessFileNotRegular: `krun-oci exec --process P` with P a FIFO
// blocked in open(2) for ever, as config.json did (from review,
// helper-114).
func TestProcessFileNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "process.json")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	// A pipe with a writer, as `--process /dev/stdin` is (runc reads it).
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		w.Write([]byte(`{"args":["/bin/true"],"cwd":"/"}`))
		w.Close()
	}()
	for _, tc := range []struct {
		name, path, want string // want: "" for a process read
	}{
		{"FIFO nobody writes", fifo, "unexpected end of JSON input"},
		{"pipe with a writer", fmt.Sprintf("/proc/self/fd/%d", r.Fd()), ""},
		{"character device", os.DevNull, "character device, not a regular file or a pipe"},
		{"directory", dir, "not a regular file or a pipe"},
	} {
		done := make(chan error, 1)
		go func() { _, err := loadProcess(tc.path); done <- err }()
		select {
		case err := <-done:
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("--process %s (%s): %v, want %q", tc.path, tc.name, err, tc.want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("--process %s (%s): still blocked after 5 s", tc.path, tc.name)
		}
	}
}

// TestConfigJSONEmptyOrCutShort: an empty config.json said "config.json:
// EOF", one cut short "config.json: unexpected EOF" (from review,
// helper-114).
func TestConfigJSONEmptyOrCutShort(t *testing.T) {
	for content, want := range map[string]string{
		"":                   "config.json is empty",
		" \n":                "config.json is empty",
		`{"ociVersion":`:     "config.json is cut short",
		`{"process":{"args"`: "config.json is cut short",
	} {
		b := t.TempDir()
		if err := os.WriteFile(filepath.Join(b, "config.json"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadSpec(b); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config.json %q: %v, want %q", content, err, want)
		}
	}
}

// TestLogFIFOWithoutReader: `krun-oci --log FIFO ...` with nobody reading
// the FIFO blocked in open(2) for ever; it is one line now. A FIFO that
// is read still gets the log (from review, helper-114).
func TestLogFIFOWithoutReader(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "log")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var stderr string
	var code int
	go func() {
		_, stderr, code = mainWith(t, "--root", filepath.Join(dir, "root"), "--log", fifo, "state", "nosuch")
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("krun-oci --log FIFO without a reader: still blocked after 5 s")
	}
	if code != 1 || !strings.Contains(stderr, "no process reads") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("krun-oci --log FIFO without a reader: exit %d, %q: want one line saying nobody reads it", code, stderr)
	}
	// With a reader the log line arrives.
	r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, _, code = mainWith(t, "--root", filepath.Join(dir, "root"), "--log", fifo, "state", "nosuch")
	buf := make([]byte, 4096)
	n, _ := r.Read(buf)
	if code != 1 || !strings.Contains(string(buf[:n]), "does not exist") {
		t.Errorf("krun-oci --log FIFO with a reader: exit %d, log %q: want the error line in the FIFO", code, buf[:n])
	}
}
