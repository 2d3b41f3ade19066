package oci

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestNewNetNSWithoutPrivilege: a config asking for a network namespace
// without a path (what `runc spec` writes) gets the monitor born in one of
// its own, which needs CAP_SYS_ADMIN. krun-oci run by a user then gives
// the container no network, with a warning, as such a config did before;
// it failed create (from review, helper-91).
func TestNewNetNSWithoutPrivilege(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run krun-oci as an unprivileged uid")
	}
	dir, err := os.MkdirTemp("", "netns-user")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o777)
	// The test binary (the runtime), where uid 65534 can run it.
	exe := filepath.Join(dir, "oci.test")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(exe, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(dst, src)
	src.Close()
	dst.Close()
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: "pid"}, {Type: "network"}, {Type: "mount"}}}
	})
	bdir := filepath.Join(dir, "bundle")
	if out, err := exec.Command("cp", "-a", b, bdir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	exec.Command("chmod", "-R", "a+rX", bdir).Run()
	root := filepath.Join(dir, "state")
	run := func(args ...string) (string, int) {
		cmd := exec.Command(exe, append([]string{"--root", root}, args...)...)
		cmd.Env = append(os.Environ(), asRuntime+"=1", "XDG_RUNTIME_DIR="+dir)
		cmd.Dir = dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		// A file, not a pipe: the container's monitor inherits create's
		// output and keeps it open.
		of, ferr := os.CreateTemp(dir, "out")
		if ferr != nil {
			t.Fatal(ferr)
		}
		defer of.Close()
		cmd.Stdout, cmd.Stderr = of, of
		timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
		defer timer.Stop()
		err := cmd.Run()
		out, _ := os.ReadFile(of.Name())
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	logFile := filepath.Join(dir, "krun-oci.log")
	out, code := run("--log", logFile, "create", "--bundle", bdir, "u1")
	if code != 0 {
		t.Fatalf("a user's create of a config with a network namespace and no path: exit %d: %s", code, out)
	}
	if log, _ := os.ReadFile(logFile); !strings.Contains(string(log), "needs CAP_SYS_ADMIN") {
		t.Errorf("no warning in the log that the container gets no network: %q", log)
	}
	run("delete", "--force", "u1")
}
