package oci

// krun-oci against runc, where engines depend on runc's behaviour (from a
// review of the command line and state handling).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// runc (libcontainer ErrNotRunning) answers a kill of a stopped container
// with "container not running", the words containerd's shim matches
// (pkg/process/utils.go checkKillError) to turn it into ErrNotFound; and
// `runc kill --all` of a stopped container succeeds (kill.go: "if
// errors.Is(err, libcontainer.ErrNotRunning) && context.Bool("all") { err
// = nil }").
func TestKillOfStoppedContainerLikeRunc(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sh", "-c", "exit 0"}, nil)
	r.mustRun("create", "--bundle", b, "ks")
	r.mustRun("start", "ks")
	r.waitStatus("ks", specs.StateStopped)
	if _, e, code := r.run(nil, nil, "kill", "ks", "TERM"); code != 1 || !strings.Contains(e, "container not running") {
		t.Errorf("kill of a stopped container: exit %d, stderr %q; want exit 1 and runc's \"container not running\"", code, e)
	}
	for _, all := range []string{"--all", "-a"} {
		if _, e, code := r.run(nil, nil, "kill", all, "ks", "KILL"); code != 0 {
			t.Errorf("kill %s of a stopped container: exit %d, stderr %q; runc exits 0", all, code, e)
		}
	}
	r.mustRun("delete", "ks")
}

// runc deletes a created container without --force (delete.go: "case
// libcontainer.Created: return killContainer(container)"), and
// containerd's shim relies on it: createdState.Delete -> Init.delete ->
// runc.Delete(ctx, id, nil), no force. docs/OCI.md also says delete
// "removes a stopped (or never started) container".
func TestDeleteOfCreatedContainerWithoutForce(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	pidFile := filepath.Join(t.TempDir(), "pid")
	r.mustRun("create", "--bundle", b, "--pid-file", pidFile, "dc")
	pid := readPid(t, pidFile)
	if _, e, code := r.run(nil, nil, "delete", "dc"); code != 0 {
		t.Fatalf("delete of a created container: exit %d, stderr %q; runc deletes it", code, e)
	}
	reap(t, pid)
	if _, _, code := r.run(nil, nil, "state", "dc"); code != 1 {
		t.Error("the container still exists after delete")
	}
}

// A created container's process under runc is `runc init`, a Go program
// that ignores SIGWINCH, SIGCHLD, SIGURG and SIGCONT: `runc kill ID WINCH`
// leaves the container created. krun-oci ends it "as if killed by" any
// signal.
func TestKillCreatedWithIgnoredSignalKeepsIt(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	r.mustRun("create", "--bundle", b, "kw")
	r.mustRun("kill", "kw", "WINCH")
	if st := r.state("kw"); st.Status != specs.StateCreated {
		t.Errorf("after kill WINCH of a created container: %s, want created (runc init ignores SIGWINCH)", st.Status)
	}
	// A signal that stops a process stops runc init, and the container
	// stays created; it ended krun-oci's (from review, helper-90).
	for _, sig := range []string{"STOP", "TSTP", "TTIN", "TTOU"} {
		r.mustRun("kill", "kw", sig)
		if st := r.state("kw"); st.Status != specs.StateCreated {
			t.Fatalf("after kill %s of a created container: %s, want created", sig, st.Status)
		}
	}
	r.mustRun("delete", "--force", "kw")
}

// runc (init_linux.go finalizeNamespace): "caps := &configs.Capabilities{};
// if config.Capabilities != nil {...} else if config.Config.Capabilities !=
// nil {...}": a process without capabilities runs with none, and an exec'd
// process without them gets the container's. krun-oci passes nil on,
// which krun-init reads as "keep root's full set"
// (guest/container/config.go Extras.Capabilities, ApplyPrivileged returns
// early).
func TestAbsentCapabilitiesAreNotFullRoot(t *testing.T) {
	s, b := baseSpec(t)
	s.Process.Capabilities = nil
	p, err := Translate("c", b, s, translateOptions{OwnCgroup: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if p.Process.Extras.Capabilities == nil || p.Setup.Process.Capabilities == nil {
		t.Errorf("config.json without process.capabilities: the command keeps root's full capability set in the guest; runc gives it none")
	}
	if c := p.Process.Extras.Capabilities; c != nil && (len(c.Bounding) > 0 || len(c.Effective) > 0 || len(c.Permitted) > 0) {
		t.Errorf("config.json without process.capabilities: %+v, want none", c)
	}
	// exec --process FILE without capabilities: the container's.
	proc := filepath.Join(t.TempDir(), "process.json")
	pb, _ := json.Marshal(specs.Process{Args: []string{"/bin/sh"}, Cwd: "/"})
	if err := os.WriteFile(proc, pb, 0o644); err != nil {
		t.Fatal(err)
	}
	gp, err := loadProcess(proc)
	if err != nil {
		t.Fatal(err)
	}
	inheritCapabilities(gp, p)
	if c := gp.Extras.Capabilities; c == nil || c != p.Process.Extras.Capabilities {
		t.Errorf("exec --process without capabilities: %+v, want the container's %+v (runc's)", c, p.Process.Extras.Capabilities)
	}
}

// runc's global --rootless is a string flag (true, false or auto;
// default auto), which krun-oci accepts (and ignores) as such.
func TestRootlessAutoAccepted(t *testing.T) {
	root := t.TempDir()
	for _, args := range [][]string{{"--rootless=auto", "list"}, {"--rootless", "auto", "list"}, {"--rootless", "false", "list"}} {
		if _, e, code := mainWith(t, append([]string{"--root", root}, args...)...); code != 0 {
			t.Errorf("krun-oci %v: exit %d, %q; runc accepts it", args, code, e)
		}
	}
}

// A bad global flag's line reaches --log too: podman reads the error from
// the JSON log file.
func TestGlobalFlagErrorInLog(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "log.json")
	_, _, code := mainWith(t, "--root", t.TempDir(), "--log", logPath, "--log-format", "json", "--rootless=sometimes", "list")
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	b, err := os.ReadFile(logPath)
	var entry map[string]any
	if err != nil || json.Unmarshal(b, &entry) != nil || !strings.Contains(fmt.Sprint(entry["msg"]), "--rootless") {
		t.Errorf("log file %q (%v): want one JSON object naming --rootless", b, err)
	}
}

// TestKillAllReachesExecs: `runc kill --all` signals every process of the
// container's cgroup, exec'd ones included; without --all only the
// command gets the signal. krun-oci sent --all's signal to the command
// alone.
func TestKillAllReachesExecs(t *testing.T) {
	r := newRT(t)
	// A command that ignores TERM, so that the container keeps running.
	b := bundle(t, []string{"sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"}, nil)
	r.mustRun("create", "--bundle", b, "ka")
	r.mustRun("start", "ka")
	r.waitStatus("ka", specs.StateRunning)
	pidFile := filepath.Join(t.TempDir(), "exec.pid")
	r.mustRun("exec", "--detach", "--pid-file", pidFile, "ka", "sleep", "100")
	proxy := readPid(t, pidFile)

	r.mustRun("kill", "ka", "TERM")
	time.Sleep(200 * time.Millisecond)
	var ws unix.WaitStatus
	if p, err := unix.Wait4(proxy, &ws, unix.WNOHANG, nil); err != nil || p == proxy {
		t.Fatalf("kill without --all reached the exec'd process (wait4: %d, %v)", p, err)
	}
	r.mustRun("kill", "--all", "ka", "TERM")
	if got := reap(t, proxy); got != 143 {
		t.Errorf("exec'd process ended with %d after kill --all TERM, want 143", got)
	}
	if st := r.state("ka"); st.Status != specs.StateRunning {
		t.Errorf("after kill --all TERM: %s, want running (the command ignores TERM)", st.Status)
	}
	r.mustRun("delete", "--force", "ka")
}

// TestKillSignalZero: `runc kill ID 0` signals nothing and says whether
// the container is there to signal: success while it is created or
// running, runc's "container not running" once it has ended. krun-oci
// refused 0 as an invalid signal.
func TestKillSignalZero(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	pidFile := filepath.Join(t.TempDir(), "pid")
	r.mustRun("create", "--bundle", b, "--pid-file", pidFile, "k0")
	r.mustRun("kill", "k0", "0")
	if st := r.state("k0"); st.Status != specs.StateCreated {
		t.Errorf("after kill 0 of a created container: %s, want created", st.Status)
	}
	r.mustRun("start", "k0")
	r.waitStatus("k0", specs.StateRunning)
	r.mustRun("kill", "k0", "0")
	if st := r.state("k0"); st.Status != specs.StateRunning {
		t.Errorf("after kill 0: %s, want running", st.Status)
	}
	r.mustRun("kill", "k0", "KILL")
	reap(t, readPid(t, pidFile))
	r.waitStatus("k0", specs.StateStopped)
	if _, e, code := r.run(nil, nil, "kill", "k0", "0"); code != 1 || !strings.Contains(e, "container not running") {
		t.Errorf("kill 0 of a stopped container: exit %d, stderr %q", code, e)
	}
	r.mustRun("delete", "k0")
}
