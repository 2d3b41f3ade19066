package oci

// krun-oci against what runc's callers depend on (from review, helper-90;
// each test here failed on the code it was written against, and the fix
// is said in the commit that added it).

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// containerd's shim kills an exec'd process by signalling the pid that
// `exec --detach --pid-file` wrote, directly (pkg/process/exec.go
// execProcess.kill: unix.Kill(pid, killSignal)); containerd's CRI ExecSync
// does it with SIGKILL when a probe's timeout passes, then waits for the
// exec's I/O to finish; conmon (CRI-O ExecSync, podman exec) SIGKILLs the
// same pid on its -T timeout. Under runc that pid is the process itself.
// Under krun-oci it is the exec proxy: SIGKILL (or any signal the proxy
// does not forward) ends the proxy alone, and the process goes on in the
// guest, holding the exec's stdout and stderr and one of the 16 exec slots.
func TestExecPidSignalReachesProcess(t *testing.T) {
	for _, sig := range []unix.Signal{unix.SIGKILL, unix.SIGALRM} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			r := newRT(t)
			b := bundle(t, []string{"sleep", "100"}, nil)
			id := "xk" + strconv.Itoa(int(sig))
			r.mustRun("create", "--bundle", b, id)
			r.mustRun("start", id)
			r.waitStatus(id, specs.StateRunning)
			dir := t.TempDir()
			pidFile := filepath.Join(dir, "exec.pid")
			inner := filepath.Join(dir, "inner.pid")
			r.mustRun("exec", "--detach", "--pid-file", pidFile, id, "sh", "-c", "echo $$ > "+inner+"; exec sleep 100")
			execPid := readPid(t, pidFile)
			var procPid int
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if b, err := os.ReadFile(inner); err == nil && strings.HasSuffix(string(b), "\n") {
					procPid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the exec'd process did not start")
				}
			}
			// What containerd does for `Kill` of an exec, or CRI ExecSync
			// on timeout.
			if err := unix.Kill(execPid, sig); err != nil {
				t.Fatal(err)
			}
			if !waitDead(procPid, 0, 5*time.Second) {
				t.Errorf("kill -%s of the exec's pid %d (from --pid-file): the exec'd process %d still runs 5 s later (pid-file pid alive: %v); under runc they are one process", unix.SignalName(sig), execPid, procPid, processAlive(execPid, 0))
				unix.Kill(procPid, unix.SIGKILL)
			}
			t.Logf("pid-file pid %d ended with %d", execPid, reap(t, execPid))
			r.mustRun("delete", "--force", id)
		})
	}
}

// runc exec exits 255 when the exec itself fails ("exec failed: ...",
// exec.go: fatalWithCode(fmt.Errorf("exec failed: %w", err), 255)), so
// that a caller running it in the foreground can tell a runtime failure
// from the process's own status 1. CRI-O's streaming exec (kubectl exec;
// internal/oci/runtime_oci.go ExecContainer) runs `runtime exec --process
// F ID` and hands the runtime's exit status back as the command's
// (utilexec.ExitErrorWrapper).
func TestExecFailureStatusLikeRunc(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"true"}, nil)
	r.mustRun("create", "--bundle", b, "xf")
	r.mustRun("start", "xf")
	r.waitStatus("xf", specs.StateStopped)
	_, e, code := r.run(nil, nil, "exec", "xf", "true")
	if code != 255 {
		t.Errorf("exec in a stopped container: exit %d (stderr %q); runc exits 255, distinct from the process's own 1", code, e)
	}
	_, e, code = r.run(nil, nil, "exec", "nosuch", "true")
	if code != 255 {
		t.Errorf("exec in a missing container: exit %d (stderr %q); runc exits 255", code, e)
	}
	r.mustRun("delete", "xf")
}

// runc runs the prestart hooks and then the createRuntime hooks, both
// with the state "creating" (libcontainer/process_linux.go, procHooks:
// s.Status = specs.StateCreating; Prestart.RunHooks; CreateRuntime.RunHooks),
// which is also the runtime-spec's lifecycle order (steps 4 and 5).
func TestPrestartBeforeCreateRuntimeAsRunc(t *testing.T) {
	r := newRT(t)
	out := t.TempDir()
	order := filepath.Join(out, "order")
	hook := func(name string) specs.Hook {
		return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", "cat > " + filepath.Join(out, name) + "; echo " + name + " >> " + order}}
	}
	b := bundle(t, []string{"true"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{Prestart: []specs.Hook{hook("prestart")}, CreateRuntime: []specs.Hook{hook("createRuntime")}}
	})
	r.mustRun("create", "--bundle", b, "hp")
	ob, _ := os.ReadFile(order)
	if got := strings.Fields(string(ob)); len(got) != 2 || got[0] != "prestart" {
		t.Errorf("hook order %q; runc (and the runtime-spec) run prestart, then createRuntime", got)
	}
	for _, name := range []string{"prestart", "createRuntime"} {
		var st specs.State
		sb, err := os.ReadFile(filepath.Join(out, name))
		if err == nil {
			err = json.Unmarshal(sb, &st)
		}
		if err != nil || st.Status != specs.StateCreating {
			t.Errorf("%s hook saw status %q (%v); runc passes %q", name, st.Status, err, specs.StateCreating)
		}
	}
	r.mustRun("delete", "--force", "hp")
}

// A config.json that asks for a new network namespace (no path) is what
// Docker gives containerd's runc shim: the daemon lets runc make the
// namespace and configures it from its createRuntime hook
// (libnetwork-setkey, prestart before Docker 26), which takes the state's
// pid and works in /proc/PID/ns/net: moves the endpoint's veth in, names
// it eth0, sets addresses and the default route. Under runc that pid is
// the container's init, in the new namespace. Under krun-oci it is the
// monitor, in the runtime's own namespace: the hook would configure the
// host's network.
func TestHookPidHasNewNetworkNamespace(t *testing.T) {
	r := newRT(t)
	out := filepath.Join(t.TempDir(), "hook-netns")
	script := `pid=$(tr -d ' \n' | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'); readlink /proc/$pid/ns/net > ` + out
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}, {Type: specs.MountNamespace}, {Type: specs.PIDNamespace}}}
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", script}}}}
	})
	r.mustRun("create", "--bundle", b, "nn")
	defer r.mustRun("delete", "--force", "nn")
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Readlink("/proc/self/ns/net")
	if strings.TrimSpace(string(got)) == host {
		t.Errorf("the createRuntime hook found the state's pid (%d) in the host's network namespace %s; the config asks for a new one, which runc's init is in when the hook runs", r.state("nn").Pid, host)
	}
}
