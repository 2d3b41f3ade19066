package oci

import (
	"testing"
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
	c, err := st.Create("hk")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Remove()
	c.Rec = Record{ID: "hk", Phase: phaseCreating}
	if err := c.Save(); err != nil {
		t.Fatal(err)
	}
	// This process holds the lock, as a running create does.
	_, e, code := r.run(nil, nil, "kill", "--all", "hk", "KILL")
	if code != 0 {
		t.Errorf("kill --all of a container whose create is running: exit %d, stderr %q; docs/OCI.md: with --all success, as runc", code, e)
	}
}
