package oci

// The poststop hooks of a delete and of a create that fails or is ended
// by a signal run once the container is gone and its lock released, as
// runc's destroy runs them (from review, helper-140/145).

import (
	"fmt"
	"os"
	"path/filepath"
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
			id := "fc"
			b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
				cr := specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "touch '" + started + "'; sleep 3"}}
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
		})
	}
}
