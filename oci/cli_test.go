package oci

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// asRuntime makes the test binary act as krun-oci with the fake VM: the
// runtime re-executes itself for its monitor and exec proxies.
const asRuntime = "KRUN_OCI_TEST_AS_RUNTIME"

func TestMain(m *testing.M) {
	if os.Getenv(asRuntime) == "1" {
		os.Exit(Main(os.Args[1:], &Env{NewVM: newFakeVM, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}))
	}
	// Detached monitors and exec proxies become our children when the
	// runtime process exits, as they become conmon's: their exit
	// statuses can be checked.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "subreaper:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// rt runs the runtime with a state root and returns stdout, stderr and
// the exit status.
type rtEnv struct {
	t    *testing.T
	root string
}

func newRT(t *testing.T) *rtEnv {
	t.Helper()
	r := &rtEnv{t: t, root: t.TempDir()}
	t.Cleanup(func() {
		// Nothing may stay behind: kill what a failing test left.
		ids, _ := (&Store{Root: r.root}).List()
		for _, id := range ids {
			r.run(nil, nil, "delete", "--force", id)
		}
	})
	return r
}

// run runs the runtime; stdout and stderr go to the given files when not
// nil (create hands them to the container), else to buffers.
func (r *rtEnv) run(stdout, stderr *os.File, args ...string) (string, string, int) {
	r.t.Helper()
	cmd := r.command(args...)
	// Files, not pipes: a container's monitor inherits create's stdout
	// and stderr and keeps them open, as it must.
	tmp := r.t.TempDir()
	of, err := os.Create(filepath.Join(tmp, "stdout"))
	if err != nil {
		r.t.Fatal(err)
	}
	ef, err := os.Create(filepath.Join(tmp, "stderr"))
	if err != nil {
		r.t.Fatal(err)
	}
	defer of.Close()
	defer ef.Close()
	cmd.Stdout, cmd.Stderr = of, ef
	if stdout != nil {
		cmd.Stdout = stdout
	}
	if stderr != nil {
		cmd.Stderr = stderr
	}
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	err = cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			r.t.Fatalf("run %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	ob, _ := os.ReadFile(of.Name())
	eb, _ := os.ReadFile(ef.Name())
	return string(ob), string(eb), code
}

// command is the runtime's command line with args, acting as krun-oci.
func (r *rtEnv) command(args ...string) *exec.Cmd {
	r.t.Helper()
	exe, err := os.Executable()
	if err != nil {
		r.t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"--root", r.root}, args...)...)
	cmd.Env = append(os.Environ(), asRuntime+"=1")
	return cmd
}

func (r *rtEnv) mustRun(args ...string) string {
	r.t.Helper()
	out, errOut, code := r.run(nil, nil, args...)
	if code != 0 {
		r.t.Fatalf("krun-oci %v: exit %d: %s", args, code, errOut)
	}
	return out
}

func (r *rtEnv) state(id string) ociState {
	r.t.Helper()
	var st ociState
	if err := json.Unmarshal([]byte(r.mustRun("state", id)), &st); err != nil {
		r.t.Fatalf("state %s: %v", id, err)
	}
	return st
}

func (r *rtEnv) waitStatus(id string, want specs.ContainerState) ociState {
	r.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := r.state(id)
		if st.Status == want {
			return st
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("container %s is %s, want %s", id, st.Status, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// bundle writes a bundle whose command is args (run on the host by the
// fake VM) and returns its directory.
func bundle(t *testing.T, args []string, edit func(*specs.Spec)) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	s := &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=" + os.Getenv("PATH")}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
		},
		Annotations: map[string]string{"org.example": "yes"},
	}
	if edit != nil {
		edit(s)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// reap waits for an orphan that was reparented to the test process and
// returns its exit status as a shell reports it.
func reap(t *testing.T, pid int) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var ws unix.WaitStatus
		p, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil {
			t.Fatalf("wait for %d: %v", pid, err)
		}
		if p == pid {
			if ws.Signaled() {
				return 128 + int(ws.Signal())
			}
			return ws.ExitStatus()
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d did not end", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(string(b))
	if err != nil {
		t.Fatalf("pid file %q: %v", b, err)
	}
	return pid
}

// TestLifecycle: create leaves the container created (the command not
// run), start runs it, state follows it to stopped, the monitor exits
// with the command's status, delete removes everything.
func TestLifecycle(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sh", "-c", "echo started > ran; echo hi; echo err >&2; exit 3"}, nil)
	out, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(t.TempDir(), "pid")
	if _, e, code := r.run(out, out, "create", "--bundle", b, "--pid-file", pidFile, "c1"); code != 0 {
		t.Fatalf("create: exit %d: %s", code, e)
	}
	pid := readPid(t, pidFile)
	st := r.state("c1")
	if st.Status != specs.StateCreated || st.Pid != pid || st.ID != "c1" || st.Bundle != b || st.Version != specs.Version {
		t.Fatalf("state after create: %+v (pid file %d)", st, pid)
	}
	if st.Annotations["org.example"] != "yes" {
		t.Errorf("annotations %v", st.Annotations)
	}
	if _, err := os.Stat(filepath.Join(b, "rootfs", "ran")); err == nil {
		t.Fatal("the command ran before start")
	}
	if _, e, code := r.run(nil, nil, "create", "--bundle", b, "c1"); code != 1 || strings.Count(e, "\n") != 1 {
		t.Errorf("second create with the same ID: exit %d, stderr %q", code, e)
	}
	r.mustRun("start", "c1")
	if got := reap(t, pid); got != 3 {
		t.Errorf("monitor exit status %d, want the command's 3", got)
	}
	st = r.waitStatus("c1", specs.StateStopped)
	if st.Pid != 0 {
		t.Errorf("stopped container reports pid %d", st.Pid)
	}
	if _, e, code := r.run(nil, nil, "start", "c1"); code != 1 || e == "" {
		t.Errorf("start of a stopped container: exit %d, %q", code, e)
	}
	if _, e, code := r.run(nil, nil, "kill", "c1", "KILL"); code != 1 || e == "" {
		t.Errorf("kill of a stopped container: exit %d, %q", code, e)
	}
	got, _ := os.ReadFile(out.Name())
	if !strings.Contains(string(got), "hi\n") || !strings.Contains(string(got), "err\n") {
		t.Errorf("the command's output %q", got)
	}
	r.mustRun("delete", "c1")
	if _, e, code := r.run(nil, nil, "state", "c1"); code != 1 || !strings.Contains(e, "does not exist") || strings.Count(e, "\n") != 1 {
		t.Errorf("state after delete: exit %d, %q", code, e)
	}
	if ents, _ := os.ReadDir(r.root); len(ents) != 0 {
		t.Errorf("state root not empty after delete: %v", ents)
	}
}

// TestKill: a signal reaches the command (TERM: 143); SIGKILL ends the
// monitor; a created container killed before start stops.
func TestKill(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	for _, tc := range []struct {
		name, sig string
		start     bool
		want      int
	}{
		{"term", "TERM", true, 143},
		{"sigusr1", "SIGUSR1", true, 138},
		{"kill", "9", true, 137},
		{"created", "TERM", false, 143},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "k-" + tc.name
			pidFile := filepath.Join(t.TempDir(), "pid")
			r.mustRun("create", "--bundle", b, "--pid-file", pidFile, id)
			pid := readPid(t, pidFile)
			if tc.start {
				r.mustRun("start", id)
				r.waitStatus(id, specs.StateRunning)
			}
			r.mustRun("kill", id, tc.sig)
			if got := reap(t, pid); got != tc.want {
				t.Errorf("exit status %d, want %d", got, tc.want)
			}
			r.waitStatus(id, specs.StateStopped)
			r.mustRun("delete", id)
		})
	}
}

// TestDelete: a running container is deleted only with --force, which
// ends its monitor.
func TestDelete(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	pidFile := filepath.Join(t.TempDir(), "pid")
	r.mustRun("create", "--bundle", b, "--pid-file", pidFile, "d1")
	pid := readPid(t, pidFile)
	r.mustRun("start", "d1")
	if _, e, code := r.run(nil, nil, "delete", "d1"); code != 1 || !strings.Contains(e, "not stopped") {
		t.Errorf("delete of a running container: exit %d, %q", code, e)
	}
	r.mustRun("delete", "--force", "d1")
	if got := reap(t, pid); got != 137 {
		t.Errorf("monitor ended with %d, want 137 (SIGKILL)", got)
	}
	if _, _, code := r.run(nil, nil, "state", "d1"); code != 1 {
		t.Error("the container still exists")
	}
}

// TestRun: run waits for the command and returns its status, then
// deletes the container; run --detach leaves it running.
func TestRun(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sh", "-c", "echo hi; exit 7"}, nil)
	out, _, code := r.run(nil, nil, "run", "--bundle", b, "r1")
	if code != 7 || out != "hi\n" {
		t.Errorf("run: exit %d, stdout %q; want 7, hi", code, out)
	}
	if _, _, code := r.run(nil, nil, "state", "r1"); code != 1 {
		t.Error("run left the container behind")
	}
	b2 := bundle(t, []string{"sleep", "100"}, nil)
	r.mustRun("run", "--detach", "--bundle", b2, "r2")
	r.waitStatus("r2", specs.StateRunning)
	r.mustRun("delete", "--force", "r2")
}

// TestExec: a second process in a running container, in the foreground
// (its status is exec's) and detached (the proxy's pid in --pid-file,
// its status the proxy's), with --process and flags.
func TestExec(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	r.mustRun("create", "--bundle", b, "e1")
	r.mustRun("start", "e1")
	out, _, code := r.run(nil, nil, "exec", "--env", "X=from-exec", "e1", "sh", "-c", "echo $X; exit 5")
	if code != 5 || out != "from-exec\n" {
		t.Errorf("exec: exit %d, stdout %q", code, out)
	}
	proc := filepath.Join(t.TempDir(), "process.json")
	pb, _ := json.Marshal(specs.Process{Args: []string{"sh", "-c", "sleep 0.2; exit 9"}, Cwd: "/", Env: []string{"PATH=" + os.Getenv("PATH")}})
	os.WriteFile(proc, pb, 0o644)
	pidFile := filepath.Join(t.TempDir(), "exec.pid")
	r.mustRun("exec", "--detach", "--pid-file", pidFile, "--process", proc, "e1")
	if got := reap(t, readPid(t, pidFile)); got != 9 {
		t.Errorf("detached exec proxy ended with %d, want 9", got)
	}
	// The VM ends before the process reports a status: 137, as for a
	// process killed with its VM, and a line that says so (from review:
	// a bare 137 looked like the process's own SIGKILL).
	if _, e, code := r.run(nil, nil, "exec", "e1", "vm-ends-during-exec"); code != 137 || !strings.Contains(e, "the container's VM ended before the process reported its exit status") {
		t.Errorf("exec whose VM ends: exit %d, stderr %q", code, e)
	}
	if _, e, code := r.run(nil, nil, "exec", "nosuch", "true"); code != 255 || !strings.Contains(e, "does not exist") {
		t.Errorf("exec in a missing container: exit %d, %q", code, e)
	}
	r.mustRun("delete", "--force", "e1")
}

// TestCreateFailure: a failed create leaves nothing behind and reports
// one line (JSON in the --log file with --log-format json).
func TestCreateFailure(t *testing.T) {
	r := newRT(t)
	logFile := filepath.Join(t.TempDir(), "log.json")
	b := bundle(t, []string{"fail-boot"}, nil)
	_, e, code := r.run(nil, nil, "--log", logFile, "--log-format", "json", "create", "--bundle", b, "f1")
	if code != 1 || strings.Count(e, "\n") != 1 || !strings.Contains(e, "could not boot") {
		t.Errorf("create: exit %d, stderr %q", code, e)
	}
	lb, _ := os.ReadFile(logFile)
	var line struct{ Level, Msg, Time string }
	if err := json.Unmarshal(lb, &line); err != nil || line.Level != "error" || !strings.Contains(line.Msg, "could not boot") {
		t.Errorf("log file %q: %v %+v", lb, err, line)
	}
	if _, _, code := r.run(nil, nil, "state", "f1"); code != 1 {
		t.Error("a failed create left its container")
	}
	bad := bundle(t, []string{"true"}, func(s *specs.Spec) { s.Version = "invalid" })
	if _, e, code := r.run(nil, nil, "create", "--bundle", bad, "f2"); code != 1 || !strings.Contains(e, "ociVersion") {
		t.Errorf("invalid version: exit %d, %q", code, e)
	}
	if _, e, code := r.run(nil, nil, "create", "--bundle", b); code != 1 || !strings.Contains(e, "ID is required") {
		t.Errorf("create without an ID: exit %d, %q", code, e)
	}
}

// TestConcurrentCreate: of several creates of one ID exactly one wins.
func TestConcurrentCreate(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	var wg sync.WaitGroup
	codes := make([]int, 4)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, codes[i] = r.run(nil, nil, "create", "--bundle", b, "same")
		}()
	}
	wg.Wait()
	wins := 0
	for _, c := range codes {
		if c == 0 {
			wins++
		}
	}
	if wins != 1 {
		t.Errorf("exit codes %v: want exactly one success", codes)
	}
	r.mustRun("delete", "--force", "same")
}

// TestConsoleSocket: with process.terminal the pty master arrives on the
// console socket and the command runs on its slave.
func TestConsoleSocket(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sh", "-c", "tty; sleep 0.3"}, func(s *specs.Spec) { s.Process.Terminal = true })
	sock := filepath.Join(t.TempDir(), "console.sock")
	masterc := listenConsole(t, sock)
	if _, e, code := r.run(nil, nil, "create", "--bundle", b, "--console-socket", sock, "t1"); code != 0 {
		t.Fatalf("create: exit %d: %s", code, e)
	}
	master := <-masterc
	if master == nil {
		t.Fatal("no terminal master on the console socket")
	}
	defer master.Close()
	r.mustRun("start", "t1")
	master.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 256)
	n, _ := master.Read(buf)
	if !strings.HasPrefix(string(buf[:n]), "/dev/pts/") {
		t.Errorf("the command's terminal: %q", buf[:n])
	}
	r.waitStatus("t1", specs.StateStopped)
	r.mustRun("delete", "t1")
	if _, e, code := r.run(nil, nil, "create", "--bundle", b, "t2"); code != 1 || !strings.Contains(e, "console-socket") {
		t.Errorf("terminal without --console-socket: exit %d, %q", code, e)
	}
	noTTY := bundle(t, []string{"true"}, nil)
	if _, e, code := r.run(nil, nil, "create", "--bundle", noTTY, "--console-socket", sock, "t3"); code != 1 || strings.Count(e, "\n") != 1 || !strings.Contains(e, "without process.terminal") {
		t.Errorf("--console-socket without process.terminal: exit %d, %q", code, e)
	}
	if _, _, code := r.run(nil, nil, "state", "t3"); code != 1 {
		t.Error("the refused create left its container")
	}
}

// TestExtraArguments: commands that take one container ID (or none)
// refuse anything after it, as runc does.
func TestExtraArguments(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	r.mustRun("create", "--bundle", b, "x1")
	defer r.mustRun("delete", "--force", "x1")
	for _, args := range [][]string{
		{"state", "x1", "extra"},
		{"delete", "x1", "extra"},
		{"start", "x1", "extra"},
		{"list", "extra"},
	} {
		_, e, code := r.run(nil, nil, args...)
		if code != 1 || strings.Count(e, "\n") != 1 || !strings.Contains(e, "unexpected arguments") {
			t.Errorf("%q: exit %d, stderr %q", args, code, e)
		}
	}
	if out := r.mustRun("state", "x1"); !strings.Contains(out, `"created"`) {
		t.Errorf("after the refused calls, state: %s", out)
	}
}

// TestHooks: createRuntime, poststart and poststop run on the host with
// the state on stdin.
func TestHooks(t *testing.T) {
	r := newRT(t)
	out := t.TempDir()
	hook := func(name string) specs.Hook {
		return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "cat > " + filepath.Join(out, name)}}
	}
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{hook("createRuntime")}, Poststart: []specs.Hook{hook("poststart")},
			Poststop: []specs.Hook{hook("poststop")}}
	})
	r.mustRun("create", "--bundle", b, "h1")
	r.mustRun("start", "h1")
	r.waitStatus("h1", specs.StateStopped)
	r.mustRun("delete", "h1")
	for name, status := range map[string]specs.ContainerState{"createRuntime": specs.StateCreating, "poststart": specs.StateRunning, "poststop": specs.StateStopped} {
		var st specs.State
		b, err := os.ReadFile(filepath.Join(out, name))
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err != nil || st.ID != "h1" || st.Status != status {
			t.Errorf("%s hook saw %q (%v)", name, b, err)
		}
	}
	bad := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/false"}}}
	})
	if _, e, code := r.run(nil, nil, "create", "--bundle", bad, "h2"); code != 1 || !strings.Contains(e, "createRuntime hook") {
		t.Errorf("failing hook: exit %d, %q", code, e)
	}
	// A failed poststart or poststop hook is a warning: the hooks after
	// it run and start and delete succeed.
	out2 := t.TempDir()
	after := func(name string) specs.Hook {
		return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "cat > " + filepath.Join(out2, name)}}
	}
	warn := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Poststart: []specs.Hook{{Path: "/bin/false"}, after("poststart")},
			Poststop: []specs.Hook{{Path: "/bin/false"}, after("poststop")}}
	})
	r.mustRun("create", "--bundle", warn, "h3")
	r.mustRun("start", "h3")
	r.waitStatus("h3", specs.StateStopped)
	r.mustRun("delete", "h3")
	for _, name := range []string{"poststart", "poststop"} {
		if _, err := os.Stat(filepath.Join(out2, name)); err != nil {
			t.Errorf("the %s hook after a failed one did not run: %v", name, err)
		}
	}
}

func TestListPsFeaturesVersion(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, nil)
	pidFile := filepath.Join(t.TempDir(), "pid")
	r.mustRun("create", "--bundle", b, "--pid-file", pidFile, "l1")
	var list []ociState
	if err := json.Unmarshal([]byte(r.mustRun("list", "--format", "json")), &list); err != nil || len(list) != 1 || list[0].ID != "l1" {
		t.Errorf("list: %v %+v", err, list)
	}
	// OWNER, as runc shows it: the creator's name (it was empty).
	if len(list) == 1 && list[0].Owner != ownerName(os.Geteuid()) {
		t.Errorf("list: owner %q, want %q", list[0].Owner, ownerName(os.Geteuid()))
	}
	if ownerName(0) != "root" || ownerName(1<<30) != "#1073741824" {
		t.Errorf("owner of root %q, of an unknown uid %q", ownerName(0), ownerName(1<<30))
	}
	var pids []int
	if err := json.Unmarshal([]byte(r.mustRun("ps", "--format", "json", "l1")), &pids); err != nil || len(pids) != 1 || pids[0] != readPid(t, pidFile) {
		t.Errorf("ps: %v %v", err, pids)
	}
	var f map[string]any
	if err := json.Unmarshal([]byte(r.mustRun("features")), &f); err != nil || f["ociVersionMax"] != specs.Version {
		t.Errorf("features: %v %v", err, f)
	}
	// Its --help is a help, as every command's (it printed the JSON).
	if out := r.mustRun("features", "--help"); !strings.HasPrefix(out, "usage: krun-oci [global options] features") {
		t.Errorf("features --help: %q", out)
	}
	if v := r.mustRun("--version"); !strings.HasPrefix(v, "krun-oci version ") {
		t.Errorf("--version: %q", v)
	}
	r.mustRun("delete", "--force", "l1")
}

func TestParseSignal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want unix.Signal
		ok   bool
	}{
		{"TERM", unix.SIGTERM, true}, {"SIGKILL", unix.SIGKILL, true}, {"9", unix.SIGKILL, true},
		{"usr1", unix.SIGUSR1, true}, {"RTMIN+2", 36, true}, {"SIGRTMAX", 64, true},
		{"0", 0, false}, {"65", 0, false}, {"BOGUS", 0, false}, {"", 0, false},
	} {
		got, err := ParseSignal(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSignal(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// TestGuestLingersAfterExit: a guest that reports its command's exit
// status but goes on running (its root wrote the status port itself;
// krun-init powers off right after) has its VM stopped within ExitGrace:
// a container reported stopped keeps no VM, and no monitor. Before the
// fix the monitor waited for the VM for good (from review).
func TestGuestLingersAfterExit(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"linger-after-exit", "sh", "-c", "exit 3"}, nil)
	r.mustRun("create", "--bundle", b, "l1")
	pid := r.state("l1").Pid
	r.mustRun("start", "l1")
	r.waitStatus("l1", specs.StateStopped)
	if !waitDead(pid, 0, ExitGrace+10*time.Second) {
		t.Fatalf("the monitor (pid %d) still runs %v after the guest reported its exit status", pid, ExitGrace+10*time.Second)
	}
	r.mustRun("delete", "l1")
}

// TestKillAfterExitWhileMonitorSilent: once the command has exited the
// container is stopped, even while its monitor, still tearing the VM down,
// does not answer (here: its socket is gone). kill must refuse it. Before
// the fix the status fell back to the record's phase (running) and the
// kill succeeded; e2e/oci's TestLifecycle saw it under nested TCG.
func TestKillAfterExitWhileMonitorSilent(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"linger-after-exit", "sh", "-c", "exit 0"}, nil)
	r.mustRun("create", "--bundle", b, "s1")
	r.mustRun("start", "s1")
	r.waitStatus("s1", specs.StateStopped)
	// The VM lingers for ExitGrace; the monitor lives meanwhile.
	if err := os.Remove(filepath.Join(r.root, "s1", monitorSock)); err != nil {
		t.Fatal(err)
	}
	if _, e, code := r.run(nil, nil, "kill", "s1", "KILL"); code != 1 || !strings.Contains(e, "not running") {
		t.Errorf("kill of a stopped container whose monitor is silent: exit %d, %q", code, e)
	}
	r.mustRun("delete", "--force", "s1")
}
