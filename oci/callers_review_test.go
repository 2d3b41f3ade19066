package oci

// krun-oci as podman, containerd's runc shim and CRI-O call it (from
// review, helper-140; each test here failed before the fix its commit
// names).

import (
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// runtimeHook is a hook that runs krun-oci (the test binary acting as it)
// with the state root of r and args.
func (r *rtEnv) runtimeHook(t *testing.T, timeout int, args ...string) specs.Hook {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return specs.Hook{Path: exe, Args: append([]string{"krun-oci", "--root", r.root}, args...),
		Env: []string{asRuntime + "=1"}, Timeout: &timeout}
}

// TestPoststartHookKillsItsContainer: start runs the poststart hooks after
// the command started. It held the container's lock through them, so a
// kill (or delete --force) of the container waited for the hooks: one from
// a hook deadlocked with the start until the hook's timeout (for ever
// without one) and the container went on running; any other caller's
// waited for a slow hook. runc's lock is its own process's: the kill ends
// the container at once.
func TestPoststartHookKillsItsContainer(t *testing.T) {
	r := newRT(t)
	log := filepath.Join(t.TempDir(), "log")
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Poststart: []specs.Hook{r.runtimeHook(t, 10, "kill", "pk", "KILL")}}
	})
	r.mustRun("create", "--bundle", b, "pk")
	begin := time.Now()
	if _, e, code := r.run(nil, nil, "--log", log, "start", "pk"); code != 0 {
		t.Fatalf("start: exit %d: %s", code, e)
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Errorf("start took %v: the poststart hook's kill of its own container waited for the start", d.Round(time.Second))
	}
	if lb, _ := os.ReadFile(log); len(lb) > 0 {
		t.Errorf("the poststart hook failed: %s", lb)
	}
	r.waitStatus("pk", specs.StateStopped)
	r.mustRun("delete", "pk")
}

// TestKillDuringSlowPoststartHook: a kill from another caller (kubelet
// stopping the container) while a poststart hook still runs is answered
// at once, not when the hook is done.
func TestKillDuringSlowPoststartHook(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Poststart: []specs.Hook{{Path: "/bin/sleep", Args: []string{"sleep", "5"}}}}
	})
	r.mustRun("create", "--bundle", b, "ps")
	started := make(chan int, 1)
	go func() {
		_, _, code := r.run(nil, nil, "start", "ps")
		started <- code
	}()
	r.waitStatus("ps", specs.StateRunning)
	begin := time.Now()
	r.mustRun("kill", "ps", "KILL")
	if d := time.Since(begin); d > 3*time.Second {
		t.Errorf("kill during a poststart hook took %v: it waited for the hook", d.Round(time.Second))
	}
	if code := <-started; code != 0 {
		t.Errorf("start: exit %d", code)
	}
	r.waitStatus("ps", specs.StateStopped)
	r.mustRun("delete", "ps")
}

// TestSecondCreateSaysTheIDIsTaken: a second create with the ID of a
// container that exists fails with runc's "already exists" (what a caller
// looks for). Where cgroupsPath is made from the ID, as podman's
// (machine.slice:libpod:ID) and CRI-O's are, it said the cgroup "already
// holds processes" instead: the cgroup was checked before the ID.
func TestSecondCreateSaysTheIDIsTaken(t *testing.T) {
	root := testCgroup2Root(t)
	parent := "krun-oci-test-" + strconv.Itoa(os.Getpid())
	t.Cleanup(func() { unix.Rmdir(filepath.Join(root, parent)) })
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Linux = &specs.Linux{CgroupsPath: "/" + parent + "/dup"}
	})
	if _, e, code := r.run(nil, nil, "--cgroup-root", root, "create", "--bundle", b, "dup"); code != 0 {
		t.Skipf("create in a cgroup of %s: exit %d: %s", root, code, e)
	}
	defer r.run(nil, nil, "--cgroup-root", root, "delete", "--force", "dup")
	_, e, code := r.run(nil, nil, "--cgroup-root", root, "create", "--bundle", b, "dup")
	if code != 1 || !strings.Contains(e, "already exists") {
		t.Errorf("second create of dup: exit %d, %q; want 1 and that the container already exists", code, e)
	}
	if st := r.state("dup"); st.Status != specs.StateCreated {
		t.Errorf("the first container is %s after the second create, want created", st.Status)
	}
}

// TestExecConsoleSocketWithoutTerminal: exec --console-socket for a process
// without a terminal is refused, as create refuses it and runc's exec does
// ("cannot use console socket if runc will not detach or allocate tty"):
// the caller waits on its socket for a pty master. It was ignored, the
// process run, and nothing ever sent to the socket.
func TestExecConsoleSocketWithoutTerminal(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	r.mustRun("create", "--bundle", b, "xs")
	r.mustRun("start", "xs")
	dir := t.TempDir()
	sock := filepath.Join(dir, "console.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ran := filepath.Join(dir, "ran")
	proc := filepath.Join(dir, "process.json")
	if err := os.WriteFile(proc, []byte(`{"args":["touch","`+ran+`"],"cwd":"/","env":["PATH=`+os.Getenv("PATH")+`"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"exec", "--console-socket", sock, "xs", "touch", ran},
		{"exec", "--detach", "--console-socket", sock, "--process", proc, "xs"},
	} {
		_, e, code := r.run(nil, nil, args...)
		if code == 0 || !strings.Contains(e, "--console-socket") {
			t.Errorf("krun-oci %s: exit %d, %q; want it refused, naming --console-socket", strings.Join(args, " "), code, e)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := os.Stat(ran); err == nil {
		t.Errorf("a refused exec ran its process")
	}
	r.mustRun("delete", "--force", "xs")
}

// TestHookLeavesAProcessHoldingItsOutput: a hook that starts a process in
// the background without redirecting its output (a shell script's
// `daemon &`) ends, or is killed at its timeout, while that process holds
// the hook's stdout. create waited for the process too: past the hook's
// exit, and past its timeout ("timeouts honoured", docs/OCI.md).
func TestHookLeavesAProcessHoldingItsOutput(t *testing.T) {
	r := newRT(t)
	for _, c := range []struct {
		name, script string
		timeout      int
		ok           bool
	}{
		{"exits", "sleep 20 & exit 0", 0, true},
		{"times-out", "sleep 20 & sleep 20", 1, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
				h := specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", c.script}}
				if c.timeout > 0 {
					h.Timeout = &c.timeout
				}
				s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{h}}
			})
			begin := time.Now()
			_, e, code := r.run(nil, nil, "create", "--bundle", b, "hd-"+c.name)
			if d := time.Since(begin); d > 10*time.Second {
				t.Errorf("create took %v: it waited for what the hook left running", d.Round(time.Second))
			}
			if c.ok && code != 0 {
				t.Errorf("create: exit %d: %s", code, e)
			}
			if !c.ok && (code == 0 || !strings.Contains(e, "timed out")) {
				t.Errorf("create: exit %d, %q; want the hook's timeout", code, e)
			}
			r.run(nil, nil, "delete", "--force", "hd-"+c.name)
		})
	}
}

// TestHookWithoutEnvGetsTheRuntimes: a hook whose config has no env runs
// with the runtime's environment, as runc's (configs.Command's Env left
// nil for exec.Cmd): hooks that find their tools through PATH or read
// the caller's variables (XDG_RUNTIME_DIR for a rootless engine) ran with
// an empty environment. A hook with env gets exactly that.
func TestHookWithoutEnvGetsTheRuntimes(t *testing.T) {
	r := newRT(t)
	out := t.TempDir()
	hook := func(name string, env []string) specs.Hook {
		return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "echo \"[$" + asRuntime + "][$OWN]\" > " + filepath.Join(out, name)}, Env: env}
	}
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{
			CreateRuntime: []specs.Hook{hook("createRuntime", nil), hook("own", []string{"OWN=x"})},
			Poststop:      []specs.Hook{hook("poststop", nil)},
		}
	})
	r.mustRun("create", "--bundle", b, "he")
	r.mustRun("delete", "he")
	for name, want := range map[string]string{"createRuntime": "[1][]", "poststop": "[1][]", "own": "[][x]"} {
		got, err := os.ReadFile(filepath.Join(out, name))
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Errorf("the %s hook saw %q (%v), want %s", name, got, err, want)
		}
	}
}

// TestCreateHooksRunInTheBundle: create's hooks (prestart, createRuntime)
// run in the bundle directory, as runc's, whose create changes into the
// bundle before anything else (setupSpec): a hook naming files relative
// to it found them under runc only.
func TestCreateHooksRunInTheBundle(t *testing.T) {
	r := newRT(t)
	out := t.TempDir()
	hook := func(name string) specs.Hook {
		return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "pwd -P > " + filepath.Join(out, name)}}
	}
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Prestart: []specs.Hook{hook("prestart")}, CreateRuntime: []specs.Hook{hook("createRuntime")}}
	})
	want, err := filepath.EvalSymlinks(b)
	if err != nil {
		t.Fatal(err)
	}
	r.mustRun("create", "--bundle", b, "hb")
	r.mustRun("delete", "hb")
	for _, name := range []string{"prestart", "createRuntime"} {
		got, err := os.ReadFile(filepath.Join(out, name))
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Errorf("the %s hook ran in %q (%v), want the bundle %s", name, got, err, want)
		}
	}
}

// TestFailedCreateRunsPoststopHooks: a create that fails once the
// container exists (a createRuntime hook that fails, a guest that does
// not boot) runs the poststop hooks, as runc's destroy does and as the
// runtime-spec's lifecycle continues after a failed hook: they release
// what the hooks before set up (a CNI hook's address). They did not run,
// and no later delete could run them: the failed create leaves no state.
func TestFailedCreateRunsPoststopHooks(t *testing.T) {
	r := newRT(t)
	for _, c := range []struct {
		name  string
		args  []string
		hooks func(*specs.Hooks)
	}{
		{"createRuntime-fails", []string{"sleep", "100"}, func(h *specs.Hooks) { h.CreateRuntime = []specs.Hook{{Path: "/bin/false"}} }},
		{"boot-fails", []string{"fail-boot"}, func(*specs.Hooks) {}},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "poststop")
			b := bundle(t, c.args, func(s *specs.Spec) {
				s.Hooks = &specs.Hooks{Poststop: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "cat > " + out}}}}
				c.hooks(s.Hooks)
			})
			id := "pf-" + c.name
			if _, _, code := r.run(nil, nil, "create", "--bundle", b, id); code == 0 {
				t.Fatal("create succeeded")
			}
			var st specs.State
			sb, err := os.ReadFile(out)
			if err == nil {
				err = json.Unmarshal(sb, &st)
			}
			if err != nil || st.ID != id || st.Status != specs.StateStopped {
				t.Errorf("poststop hook after the failed create: %q (%v); want it run with the container stopped", sb, err)
			}
			if _, _, code := r.run(nil, nil, "state", id); code == 0 {
				t.Errorf("the failed create left its container behind")
			}
		})
	}
}

// TestHostnameWithUnderscore: config.json's hostname may hold an
// underscore, as Docker and podman pass it (compose's `hostname: my_db`)
// and runc sets it; create refused it ("character '_' not allowed").
func TestHostnameWithUnderscore(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"true"}, func(s *specs.Spec) { s.Hostname = "my_db" })
	if _, e, code := r.run(nil, nil, "create", "--bundle", b, "hn"); code != 0 {
		t.Fatalf("create with hostname my_db: exit %d: %s", code, e)
	}
	r.mustRun("delete", "hn")
}

// TestPsOfContainerBeingCreated: ps of a container whose create has not
// started its monitor yet lists no process; it listed pid 0, which a
// caller that signals what ps lists (kill(0, sig)) sends to its own
// process group.
func TestPsOfContainerBeingCreated(t *testing.T) {
	r := newRT(t)
	c := creatingContainer(t, &Store{Root: r.root}, "pc", time.Time{})
	defer c.Remove()
	if out := strings.TrimSpace(r.mustRun("ps", "--format", "json", "pc")); out != "[]" {
		t.Errorf("ps --format json of a container being created, without a monitor yet: %s, want []", out)
	}
}

// TestMonitorDropsTheCallersDescriptors: a descriptor create (or exec
// --detach) inherited from its caller without close-on-exec went on to
// the container's monitor (or the exec's proxy), which held it as long as
// the container ran: a caller waiting for the end of a pipe it had left
// open in create never saw it. runc's container process closes what it
// inherits beyond stdio (and --preserve-fds).
func TestMonitorDropsTheCallersDescriptors(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	// runs krun-oci with a pipe's write end as its fd 5 and says whether
	// the read end sees its end once krun-oci has returned.
	ended := func(args ...string) bool {
		t.Helper()
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		cmd := r.command(args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = devNull, devNull, devNull
		cmd.ExtraFiles = []*os.File{devNull, devNull, pw}
		err = cmd.Run()
		pw.Close()
		if err != nil {
			t.Fatalf("krun-oci %v: %v", args, err)
		}
		pr.SetReadDeadline(time.Now().Add(2 * time.Second))
		var buf [1]byte
		_, err = pr.Read(buf[:])
		return err == io.EOF
	}
	if !ended("create", "--bundle", b, "fd") {
		t.Errorf("after create, a pipe the caller left open in it is still held (by the container's monitor)")
	}
	r.mustRun("start", "fd")
	if !ended("exec", "--detach", "fd", "sleep", "100") {
		t.Errorf("after exec --detach, a pipe the caller left open in it is still held (by the exec's proxy)")
	}
	r.mustRun("delete", "--force", "fd")
}
