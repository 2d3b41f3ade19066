package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestKillAllOfCreatingContainer: docs/OCI.md (kill) says that for
// "a container that has ended, or one whose create is still running":
// `container not running` ... "with --all success, as runc" (runc's
// Signal with all=true signals the cgroup whatever the status). cmdKill's
// new early check for a create in progress returns the error before
// looking at --all, so `kill --all ID SIG` of a container being created
// fails (exit 1), where the docs and runc succeed; an engine that kills
// --all while cleaning up sees a failed kill.
//
// From review, helper-105; fixed: with --all it succeeds (SIGKILL ends the
// monitor, any other signal has no guest process to reach yet).
func TestKillAllOfCreatingContainer(t *testing.T) {
	r := newRT(t)
	st := &Store{Root: r.root}
	c := creatingContainer(t, st, "hk", time.Time{})
	defer c.Remove()
	// This process holds the lock, as a running create does.
	_, e, code := r.run(nil, nil, "kill", "--all", "hk", "KILL")
	if code != 0 {
		t.Errorf("kill --all of a container whose create is running: exit %d, stderr %q; docs/OCI.md: with --all success, as runc", code, e)
	}
}

// A kill --all KILL while create had not yet saved its monitor's pid
// found no process to kill, returned success, and the create went on to
// make a container the engine had killed (left open in an earlier note).
// The kill now leaves a mark in the container's directory, which create
// looks for before it lets the VM boot.
func TestKillAllBeforeMonitorPidLeavesMark(t *testing.T) {
	r := newRT(t)
	st := &Store{Root: r.root}
	c := creatingContainer(t, st, "hm", time.Time{}) // no monitor yet
	defer c.Remove()
	_, e, code := r.run(nil, nil, "kill", "--all", "hm", "KILL")
	if code != 0 {
		t.Fatalf("kill --all KILL of a container being created: exit %d, stderr %q", code, e)
	}
	if !killMarked(c.Dir) {
		t.Error("kill --all KILL before the monitor's pid was saved left no mark for create")
	}
	// Any other signal has nobody to reach and leaves nothing.
	os.Remove(filepath.Join(c.Dir, killMarkName))
	if _, e, code := r.run(nil, nil, "kill", "--all", "hm", "TERM"); code != 0 || killMarked(c.Dir) {
		t.Errorf("kill --all TERM: exit %d (%q), mark left %v", code, e, killMarked(c.Dir))
	}
}

// TestCreateEndsOnKillMark: create, finding the mark of a kill that came
// before its monitor's pid was saved (here left by its createRuntime
// hook, which runs after that), fails, says why, and undoes itself.
func TestCreateEndsOnKillMark(t *testing.T) {
	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "touch " + filepath.Join(r.root, "hc", killMarkName)}}}}
	})
	_, e, code := r.run(nil, nil, "create", "--bundle", b, "hc")
	if code == 0 {
		r.mustRun("delete", "--force", "hc")
		t.Fatal("create went on after a kill --all KILL marked its container")
	}
	if !strings.Contains(e, "killed (kill --all KILL) while it was being created") || strings.Count(strings.TrimSpace(e), "\n") > 0 {
		t.Errorf("create's error %q, want one line saying it was killed", e)
	}
	if _, err := os.Lstat(filepath.Join(r.root, "hc")); !os.IsNotExist(err) {
		t.Errorf("the killed create left its state: %v", err)
	}
}

// A kill that read a creating container, then stalled while that create
// failed, undid itself and a new create of the same ID began, left its
// mark in the new container's directory, which then failed for a kill
// meant for the old one. From review, helper-109; fixed: the mark goes
// only into the directory the kill read.
func TestStaleKillMarksNoReusedID(t *testing.T) {
	st := &Store{Root: t.TempDir()}
	c := creatingContainer(t, st, "hr", time.Now().UTC())
	old, err := st.Read("hr")
	if err != nil {
		t.Fatal(err)
	}
	// The create undoes itself; another create of "hr" begins.
	c.Unlock()
	if err := c.Remove(); err != nil {
		t.Fatal(err)
	}
	c2 := creatingContainer(t, st, "hr", time.Now().UTC().Add(time.Microsecond))
	defer c2.Remove()
	killCreating(st, old)
	if killMarked(c2.Dir) {
		t.Error("a kill of the earlier create of this ID marked the new one")
	}
	// The kill of the new one still marks it.
	cur, err := st.Read("hr")
	if err != nil {
		t.Fatal(err)
	}
	killCreating(st, cur)
	if !killMarked(c2.Dir) {
		t.Error("kill --all KILL of a container being created left no mark")
	}
}

// creatingContainer makes id's state in st as a create does before its
// monitor starts (phase creating, no pid, created at created), and holds
// its lock, as a running create does; the caller removes it.
func creatingContainer(t *testing.T, st *Store, id string, created time.Time) *Container {
	t.Helper()
	c, err := st.Create(id)
	if err != nil {
		t.Fatal(err)
	}
	c.Rec = Record{ID: id, Phase: phaseCreating, Created: created}
	if err := c.Save(); err != nil {
		c.Remove()
		t.Fatal(err)
	}
	return c
}
