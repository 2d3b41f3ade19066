package oci

// krun-oci's commands run concurrently on one container, as containerd's
// shim, CRI-O/conmon and podman run them (from review, helper-100; each
// test here failed on the code it was written against).

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Under runc a container is stopped once its init process has exited: the
// pid in state (the one a subreaper such as conmon or containerd's shim
// collects for the container's exit status) is done, its status fixed.
// krun-oci reports stopped as soon as the monitor made its "exited" file,
// while the monitor still tears the VM down (up to ExitGrace for a guest
// that does not power off); a delete meanwhile (a caller that polled state
// until stopped, as engines do) SIGKILLs the monitor, and the container's
// exit status becomes 137 instead of the command's.
//
// From review, helper-100; fixed: delete waits up to ExitGrace for a
// stopped container's monitor to end before it kills it.
func TestDeleteOfStoppedContainerKeepsExitStatus(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"linger-after-exit", "sh", "-c", "exit 3"}, nil)
	r.mustRun("create", "--bundle", b, "d1")
	pid := r.state("d1").Pid
	r.mustRun("start", "d1")
	r.waitStatus("d1", specs.StateStopped)
	r.mustRun("delete", "d1")
	if got := reap(t, pid); got != 3 {
		t.Errorf("the monitor (the container's pid %d) exited %d after a delete of the stopped container, want the command's 3", pid, got)
	}
}

// runc delete --force during a runc create ends at once: the container's
// directory is removed (a create still under way fails). krun-oci's create
// holds the container's lock until the guest is ready (up to ReadyTimeout,
// 5 minutes), and delete --force (a shim cleaning up after a create whose
// caller gave up, a podman rm -f) waits for it all that time.
//
// From review, helper-100; fixed: delete --force ends the monitor of a
// create that holds the lock, which then undoes itself.
func TestForceDeleteDuringCreateIsPrompt(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"slow-boot", "sleep", "100"}, nil)
	created := make(chan int, 1)
	go func() {
		_, _, code := r.run(nil, nil, "create", "--bundle", b, "dc")
		created <- code
	}()
	// Wait until the monitor runs (the guest boots).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(r.root, "dc", monitorSock)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("create did not start the monitor")
		}
	}
	t0 := time.Now()
	_, e, code := r.run(nil, nil, "delete", "--force", "dc")
	took := time.Since(t0)
	if code != 0 {
		t.Errorf("delete --force during create: exit %d: %s", code, strings.TrimSpace(e))
	}
	if took > 5*time.Second {
		t.Errorf("delete --force during create took %v (the boot takes %v)", took.Round(time.Second), slowBoot)
	}
	select {
	case <-created:
	case <-time.After(slowBoot + 20*time.Second):
		t.Error("create did not end")
	}
}

// A stopped container's record still names its cgroup until delete. The
// cgroup is empty then, and create lets a new container have it (as runc
// does: a container's cgroup is new or empty). Delete of the old container
// then ends the new one: removeCgroup finds the cgroup busy and writes
// cgroup.kill, killing the other container's monitor (its VM). runc's
// delete of a stopped container (private pid namespace) only removes the
// cgroup, and leaves processes that are not its own.
//
// From review, helper-100; fixed: the cgroup of a stopped container is
// not killed when another container of the store has taken it over.
func TestDeleteOfStoppedContainerSparesCgroupsNewOwner(t *testing.T) {
	root := testCgroup2Root(t)
	cg := "/krun-oci-test-reuse-" + strconv.Itoa(os.Getpid())
	t.Cleanup(func() {
		for i := 0; i < 100 && dirExists(filepath.Join(root, cg)); i++ {
			os.Remove(filepath.Join(root, cg))
			time.Sleep(20 * time.Millisecond)
		}
	})
	r := newRT(t)
	withCg := func(s *specs.Spec) { s.Linux = &specs.Linux{CgroupsPath: cg} }
	old := bundle(t, []string{"true"}, withCg)
	r.mustRun("--cgroup-root", root, "create", "--bundle", old, "old")
	oldPid := r.state("old").Pid
	r.mustRun("--cgroup-root", root, "start", "old")
	r.waitStatus("old", specs.StateStopped)
	if !waitDead(oldPid, 0, 10*time.Second) {
		t.Fatal("the old container's monitor did not exit")
	}
	nb := bundle(t, []string{"sleep", "100"}, withCg)
	if _, e, code := r.run(nil, nil, "--cgroup-root", root, "create", "--bundle", nb, "new"); code != 0 {
		t.Skipf("create in the stopped container's cgroup refused (exit %d: %s): the reuse cannot happen", code, strings.TrimSpace(e))
	}
	r.mustRun("--cgroup-root", root, "start", "new")
	r.waitStatus("new", specs.StateRunning)
	r.run(nil, nil, "--cgroup-root", root, "delete", "old")
	time.Sleep(300 * time.Millisecond)
	if st := r.state("new").Status; st != specs.StateRunning {
		t.Errorf("delete of the stopped container \"old\" left container \"new\" (now owning the same cgroup %s) %s, want running", cg, st)
	}
	r.mustRun("--cgroup-root", root, "delete", "--force", "new")
}

// A container whose state file cannot be read (empty, as a disk-backed
// --root can leave it after a host crash; cut short; naming another
// container) is refused by delete with one line that names --force, and
// delete --force removes it: its monitor, found through its control
// socket, killed, its directory gone. Before, not even delete --force
// could remove it, and an engine's clean-up failed for good (from review,
// helper-100; fixed: openUnreadable, deleteUnreadable).
func TestForceDeleteOfUnreadableState(t *testing.T) {
	for _, tc := range []struct{ name, content string }{
		{"empty", ""},
		{"cut short", `{"id":"u1","bundle":`},
		{"other container", `{"id":"someone-else"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRT(t)
			b := bundle(t, []string{"sleep", "100"}, nil)
			pidFile := filepath.Join(t.TempDir(), "pid")
			r.mustRun("create", "--bundle", b, "--pid-file", pidFile, "u1")
			pid := readPid(t, pidFile)
			if err := os.WriteFile(filepath.Join(r.root, "u1", recordFile), []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, e, code := r.run(nil, nil, "delete", "u1")
			if code == 0 || !strings.Contains(e, "corrupt") || !strings.Contains(e, "delete --force") || strings.Count(strings.TrimSpace(e), "\n") > 0 {
				t.Errorf("delete of a container with an unreadable state: exit %d, stderr %q; want one line that names delete --force", code, e)
			}
			if err := unix.Kill(pid, 0); err != nil {
				t.Fatalf("delete without --force ended the monitor: %v", err)
			}
			if _, e, code := r.run(nil, nil, "delete", "--force", "u1"); code != 0 {
				t.Fatalf("delete --force: exit %d, stderr %q", code, e)
			}
			if got := reap(t, pid); got != 137 {
				t.Errorf("monitor ended with %d, want 137 (SIGKILL)", got)
			}
			if _, err := os.Lstat(filepath.Join(r.root, "u1")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the state directory is still there: %v", err)
			}
		})
	}
}

// A createRuntime hook that signals its own container (a network hook
// giving up, say) ran while create held the container's lock, and kill
// waited for that lock: create waited for its hook, the hook for create,
// until something killed one of them. kill of a container still being
// created answers at once that it is not running, as runc's would (from
// review, helper-100; fixed: cmdKill reads the record first).
func TestKillFromCreateHookDoesNotDeadlock(t *testing.T) {
	r := newRT(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "kill-status")
	script := asRuntime + "=1 timeout 10 " + exe + " --root " + r.root + " kill hk KILL 2>" + out + ".err; echo $? > " + out
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", script}}}}
	})
	start := time.Now()
	r.mustRun("create", "--bundle", b, "hk")
	defer r.mustRun("delete", "--force", "hk")
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := os.ReadFile(out + ".err")
	if code := strings.TrimSpace(string(got)); code != "1" || !strings.Contains(string(msg), "container not running (creating)") {
		t.Errorf("kill from the container's own createRuntime hook: exit %s (124: killed by timeout after 10 s), stderr %q, create took %v; want exit 1 at once, saying the container is not running", code, msg, time.Since(start).Round(time.Millisecond))
	}
}

// A createRuntime hook that force-deletes its own container (giving up on
// it) waited for the container's lock, which its create held while it
// waited for the hook. The delete kills the monitor and, when the create
// still holds the lock after createUndoWait, returns: the create then
// fails and undoes itself (from review, helper-100).
func TestForceDeleteFromCreateHookDoesNotDeadlock(t *testing.T) {
	r := newRT(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "delete-status")
	script := asRuntime + "=1 timeout 20 " + exe + " --root " + r.root + " delete --force hd 2>" + out + ".err; echo $? > " + out
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", script}}}}
	})
	start := time.Now()
	_, e, code := r.run(nil, nil, "create", "--bundle", b, "hd")
	took := time.Since(start)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := os.ReadFile(out + ".err")
	if status := strings.TrimSpace(string(got)); status != "0" {
		t.Errorf("delete --force from the container's own createRuntime hook: exit %s (124: killed by timeout after 20 s), stderr %q, create took %v", status, msg, took.Round(time.Millisecond))
	}
	if code == 0 {
		t.Errorf("create succeeded although its monitor was killed (stderr %q)", e)
	}
	if _, _, code := r.run(nil, nil, "state", "hd"); code == 0 {
		t.Error("the container is still there after its create undid itself")
	}
}

// A delete renames the container's directory away before it removes it:
// state and list find the container or nothing, never a directory half
// removed, whose missing record read as a create in progress ("creating",
// pid 0), for good when the removal failed (here: a mount inside it that
// RemoveAll cannot remove). From review, helper-100.
func TestRemoveLeavesNoHalfRemovedContainer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a tmpfs inside the state directory, which the removal cannot remove")
	}
	st := &Store{Root: t.TempDir()}
	c, err := st.Create("rm1")
	if err != nil {
		t.Fatal(err)
	}
	c.Rec = Record{ID: "rm1", Phase: phaseCreated}
	if err := c.Save(); err != nil {
		t.Fatal(err)
	}
	busy := filepath.Join(c.Dir, "busy")
	if err := os.Mkdir(busy, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", busy, "tmpfs", 0, "size=64k"); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() {
		unix.Unmount(busy, unix.MNT_DETACH)
		unix.Unmount(filepath.Join(st.Root, "rm1"+removedSuffix, "busy"), unix.MNT_DETACH)
	})
	if err := c.Remove(); err == nil {
		t.Fatal("the removal of a directory holding a mount point succeeded")
	}
	if r, err := st.Read("rm1"); !errors.Is(err, ErrNotExist) {
		t.Errorf("state after a removal that failed half-way: %+v, %v; want the container gone", r, err)
	}
	ids, err := st.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if strings.HasPrefix(id, "rm1") {
			t.Errorf("list shows %q after the container was deleted", id)
		}
	}
}
