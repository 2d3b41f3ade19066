package oci

// The poststop hooks of a delete and of a create that fails or is ended
// by a signal run once the container is gone and its lock released, as
// runc's destroy runs them; run's poststart hooks run unlocked, as
// start's (from review, helper-140/145).

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// probeHook is a hook that runs krun-oci (the test binary acting as it,
// with r's state root) once for each of cmds, appending each one's exit
// status to out, one a line. A command that waits for the container's
// lock, held by whoever runs the hook, keeps the hook from finishing
// before its timeout, and out from being complete.
func (r *rtEnv) probeHook(t *testing.T, out string, timeout int, cmds ...string) specs.Hook {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var script strings.Builder
	for _, c := range cmds {
		fmt.Fprintf(&script, "%s=1 '%s' --root '%s' %s >/dev/null 2>&1; echo $? >> '%s'\n", asRuntime, exe, r.root, c, out)
	}
	return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", script.String()}, Timeout: &timeout}
}

// countHook appends a line to out each time it runs.
func countHook(out string) specs.Hook {
	return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "echo ran >> '" + out + "'"}}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

// TestDeleteRunsPoststopHooksUnlocked: delete held the container's lock
// through the poststop hooks, so a slow hook kept a kill or a second
// delete of the same ID waiting, and a hook that deleted its own
// container (a clean-up script) deadlocked with the delete until its
// timeout. The container is gone when they run: a delete then finds
// none (exit 1, 0 with --force), and the hooks run once.
func TestDeleteRunsPoststopHooksUnlocked(t *testing.T) {
	r := newRT(t)
	dir := t.TempDir()
	probe, count := filepath.Join(dir, "probe"), filepath.Join(dir, "count")
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Poststop: []specs.Hook{
			r.probeHook(t, probe, 5, "delete dp", "delete --force dp", "kill dp KILL"),
			countHook(count),
		}}
	})
	r.mustRun("create", "--bundle", b, "dp")
	r.mustRun("start", "dp")
	r.waitStatus("dp", specs.StateStopped)
	begin := time.Now()
	if _, e, code := r.run(nil, nil, "delete", "dp"); code != 0 {
		t.Fatalf("delete: exit %d: %s", code, e)
	}
	if d := time.Since(begin); d > 4*time.Second {
		t.Errorf("delete took %v: the hook's commands waited for its lock", d.Round(time.Second))
	}
	if got := strings.Join(readLines(t, probe), " "); got != "1 0 1" {
		t.Errorf("delete, delete --force and kill from the poststop hook exited %q, want \"1 0 1\" (the container gone, the lock free)", got)
	}
	if got := readLines(t, count); len(got) != 1 {
		t.Errorf("the poststop hooks ran %d times, want once", len(got))
	}
	if _, _, code := r.run(nil, nil, "state", "dp"); code == 0 {
		t.Error("the container is still there after delete")
	}
}

// TestFailedCreateRunsPoststopHooksUnlocked: a create that fails, or is
// ended by SIGTERM or SIGINT (a shim's timeout, ^C), ran its poststop
// hooks holding the container's lock, its state and cgroup still there;
// a SIGTERM while a failed create ran them ended it at once (its signals
// no longer caught), its state left behind. It now removes the cgroup and
// the state first, then runs the hooks unlocked, and a signal meanwhile
// does not cut that short.
func TestFailedCreateRunsPoststopHooksUnlocked(t *testing.T) {
	for _, tc := range []struct {
		name string
		// failing: a createRuntime hook that fails (else one that is
		// ended by sig while it runs).
		failing bool
		sig     syscall.Signal
		// sigInPoststop: the signal comes while the poststop hooks run.
		sigInPoststop bool
	}{
		{"createRuntime-fails", true, 0, false},
		{"SIGTERM", false, syscall.SIGTERM, false},
		{"SIGINT", false, syscall.SIGINT, false},
		{"SIGTERM-during-poststop", true, syscall.SIGTERM, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRT(t)
			dir := t.TempDir()
			probe, count := filepath.Join(dir, "probe"), filepath.Join(dir, "count")
			started, poststop := filepath.Join(dir, "started"), filepath.Join(dir, "poststop")
			hookPid := filepath.Join(dir, "hookpid")
			id := "fc"
			b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
				cr := specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "echo $$ > '" + hookPid + "'; touch '" + started + "'; exec sleep 30"}}
				if tc.failing {
					cr = specs.Hook{Path: "/bin/false"}
				}
				s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{cr}, Poststop: []specs.Hook{
					{Path: "/bin/sh", Args: []string{"sh", "-c", "touch '" + poststop + "'; sleep 1"}},
					r.probeHook(t, probe, 5, "delete "+id, "delete --force "+id),
					countHook(count),
				}}
			})
			cmd := r.command("create", "--bundle", b, id)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if tc.sig != 0 {
				mark := started
				if tc.sigInPoststop {
					mark = poststop
				}
				for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
					if _, err := os.Stat(mark); err == nil {
						break
					}
					if time.Now().After(deadline) {
						cmd.Process.Kill()
						t.Fatalf("%s did not appear", filepath.Base(mark))
					}
				}
				cmd.Process.Signal(tc.sig)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				t.Fatal("create did not end")
			}
			code := cmd.ProcessState.ExitCode()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				code = 128 + int(ws.Signal())
			}
			want := 1
			if tc.sig != 0 && !tc.sigInPoststop {
				want = 128 + int(tc.sig)
			}
			if code != want {
				t.Errorf("create exited %d, want %d", code, want)
			}
			if got := strings.Join(readLines(t, probe), " "); got != "1 0" {
				t.Errorf("delete and delete --force from the poststop hook exited %q, want \"1 0\" (the container gone, the lock free)", got)
			}
			if got := readLines(t, count); len(got) != 1 {
				t.Errorf("the poststop hooks ran to their end %d times, want once", len(got))
			}
			if ids, _ := (&Store{Root: r.root}).List(); len(ids) != 0 {
				t.Errorf("the create left containers %q behind", ids)
			}
			if tc.sig != 0 && !tc.sigInPoststop {
				// The createRuntime hook create ran ended with it: it
				// was left running (here for its 30 s).
				b, err := os.ReadFile(hookPid)
				pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
				if err != nil || pid <= 0 {
					t.Fatalf("the hook's pid: %q, %v", b, err)
				}
				if !waitDead(pid, 0, 5*time.Second) {
					syscall.Kill(pid, syscall.SIGKILL)
					t.Fatalf("the createRuntime hook (pid %d) still runs after create ended", pid)
				}
			}
		})
	}
}

// TestRunPoststartHooksUnlocked: run (create and start in one, detached
// or in the foreground) runs the poststart hooks once the command has
// started, with the container's lock released, as start does: a kill
// from the hook is answered at once.
func TestRunPoststartHooksUnlocked(t *testing.T) {
	for _, detach := range []bool{true, false} {
		name := map[bool]string{true: "detach", false: "foreground"}[detach]
		t.Run(name, func(t *testing.T) {
			r := newRT(t)
			dir := t.TempDir()
			probe, state := filepath.Join(dir, "probe"), filepath.Join(dir, "state")
			id := "rp-" + name
			b := bundle(t, []string{"sleep", "2"}, func(s *specs.Spec) {
				s.Hooks = &specs.Hooks{Poststart: []specs.Hook{
					{Path: "/bin/sh", Args: []string{"sh", "-c", "cat > '" + state + "'"}},
					r.probeHook(t, probe, 5, "kill "+id+" 0"),
				}}
			})
			args := []string{"run", "--bundle", b, id}
			if detach {
				args = []string{"run", "--detach", "--bundle", b, id}
			}
			if _, e, code := r.run(nil, nil, args...); code != 0 {
				t.Fatalf("run: exit %d: %s", code, e)
			}
			if sb, err := os.ReadFile(state); err != nil || !strings.Contains(string(sb), `"running"`) {
				t.Errorf("the poststart hook saw %q (%v), want the container running", sb, err)
			}
			if got := strings.Join(readLines(t, probe), " "); got != "0" {
				t.Errorf("kill %s 0 from the poststart hook exited %q, want \"0\" (the lock free)", id, got)
			}
			if detach {
				r.waitStatus(id, specs.StateStopped)
				r.mustRun("delete", id)
			}
		})
	}
}

// TestRelativeConsoleSocket: a relative --console-socket is the caller's,
// found from its working directory, not from the bundle's (krun-oci never
// changes directory; runc's create changes into the bundle first, where
// a relative socket path would be looked for).
func TestRelativeConsoleSocket(t *testing.T) {
	for _, cmdName := range []string{"create", "run"} {
		t.Run(cmdName, func(t *testing.T) {
			r := newRT(t)
			b := bundle(t, []string{"true"}, func(s *specs.Spec) { s.Process.Terminal = true })
			cwd := t.TempDir()
			masterc := listenConsole(t, filepath.Join(cwd, "console.sock"))
			args := []string{"create", "--bundle", b, "--console-socket", "console.sock", "rc"}
			if cmdName == "run" {
				args = []string{"run", "--detach", "--bundle", b, "--console-socket", "console.sock", "rc"}
			}
			cmd := r.command(args...)
			cmd.Dir = cwd
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s from the socket's directory: %v: %s", cmdName, err, out)
			}
			select {
			case m := <-masterc:
				if m == nil {
					t.Fatal("no terminal master on the console socket")
				}
				// Open until the end: its hang-up ends the container.
				defer m.Close()
			case <-time.After(10 * time.Second):
				t.Fatal("no terminal master on the console socket")
			}
			if cmdName == "create" {
				r.mustRun("start", "rc")
			}
			r.waitStatus("rc", specs.StateStopped)
			r.mustRun("delete", "rc")
		})
	}
}

// listenConsole listens on the unix socket path and returns the first
// file received there (nil on failure).
func listenConsole(t *testing.T, path string) <-chan *os.File {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	masterc := make(chan *os.File, 1)
	go func() {
		conn, err := l.AcceptUnix()
		if err != nil {
			masterc <- nil
			return
		}
		defer conn.Close()
		buf, oob := make([]byte, 256), make([]byte, 256)
		_, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		files, _ := parseRights(oob[:oobn])
		if err != nil || len(files) != 1 {
			masterc <- nil
			return
		}
		masterc <- files[0]
	}()
	return masterc
}
