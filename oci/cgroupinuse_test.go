package oci

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// testCgroup2Root finds a writable cgroup2 mount for the test, or skips.
func testCgroup2Root(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, d := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		if isCgroup2(d) {
			return d
		}
	}
	t.Skip("no cgroup2 mount")
	return ""
}

// TestCgroupPathInUseKilledOnDelete: linux.cgroupsPath (config.json) may
// name a cgroup that already exists and holds processes that are not the
// container's. Create refuses it, as runc does ("container's cgroup is
// not empty"), and its clean-up leaves the cgroup alone. Before the fix
// krun-oci joined it, and delete (or a failed create's clean-up) wrote
// cgroup.kill on it, killing every foreign process in it and in its
// subtree (from review).
func TestCgroupPathInUseKilledOnDelete(t *testing.T) {
	// The container names the victim's own cgroup, or its parent (whose
	// subtree cgroup.kill ends too).
	for _, name := range []string{"same", "parent"} {
		t.Run(name, func(t *testing.T) { testCgroupInUse(t, name == "parent") })
	}
}

func testCgroupInUse(t *testing.T, useParent bool) {
	root := testCgroup2Root(t)
	parent := "krun-oci-test-" + strconv.Itoa(os.Getpid())
	victimCg := filepath.Join(root, parent, "victim")
	if err := os.MkdirAll(victimCg, 0o755); err != nil {
		t.Skipf("cannot make a test cgroup: %v", err)
	}
	victim := exec.Command("sleep", "300")
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { victim.Wait(); close(waited) }()
	t.Cleanup(func() {
		victim.Process.Kill()
		<-waited
		for i := 0; i < 100; i++ {
			if unix.Rmdir(victimCg) == nil || !dirExists(victimCg) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		unix.Rmdir(filepath.Join(root, parent))
	})
	if err := os.WriteFile(filepath.Join(victimCg, "cgroup.procs"), []byte(strconv.Itoa(victim.Process.Pid)), 0); err != nil {
		t.Skipf("cannot move a process into the test cgroup: %v", err)
	}

	r := newRT(t)
	b := bundle(t, []string{"sleep", "100"}, func(s *specs.Spec) {
		s.Linux = &specs.Linux{CgroupsPath: "/" + parent + "/victim"}
		if useParent {
			s.Linux.CgroupsPath = "/" + parent
		}
	})
	_, e, code := r.run(nil, nil, "--cgroup-root", root, "create", "--bundle", b, "cg1")
	if code == 0 {
		r.run(nil, nil, "--cgroup-root", root, "delete", "--force", "cg1")
		t.Errorf("create accepted a cgroup that is not empty")
	} else if !strings.Contains(e, "a container needs a cgroup of its own") {
		t.Errorf("create refused with %q, want it to say the cgroup is not empty", e)
	}
	select {
	case <-waited:
		t.Fatalf("a process that was never the container's (pid %d, in the pre-existing cgroup %s) was killed by krun-oci (create exit %d)", victim.Process.Pid, victimCg, code)
	case <-time.After(200 * time.Millisecond):
	}
}

func dirExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestRemoveCgroupSparesChildCgroups: removing a container's cgroup ends
// the processes in it, but never a child cgroup's (cgroup.kill would end
// the whole subtree; krun-oci makes no child cgroups, so one there is
// someone else's).
func TestRemoveCgroupSparesChildCgroups(t *testing.T) {
	root := testCgroup2Root(t)
	dir := filepath.Join(root, "krun-oci-test-"+strconv.Itoa(os.Getpid()))
	child := filepath.Join(dir, "other")
	if err := os.MkdirAll(child, 0o755); err != nil {
		t.Skipf("cannot make a test cgroup: %v", err)
	}
	victim := exec.Command("sleep", "300")
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(child, "cgroup.procs"), []byte(strconv.Itoa(victim.Process.Pid)), 0); err != nil {
		victim.Process.Kill()
		victim.Wait()
		unix.Rmdir(child)
		unix.Rmdir(dir)
		t.Skipf("cannot move a process into the test cgroup: %v", err)
	}
	waited := make(chan struct{})
	go func() { victim.Wait(); close(waited) }()
	t.Cleanup(func() {
		victim.Process.Kill()
		<-waited
		for i := 0; i < 100 && dirExists(child); i++ {
			unix.Rmdir(child)
			time.Sleep(20 * time.Millisecond)
		}
		unix.Rmdir(dir)
	})
	if err := removeCgroup(dir, true); err == nil {
		t.Errorf("removeCgroup of a cgroup with a child cgroup succeeded")
	}
	select {
	case <-waited:
		t.Fatalf("removeCgroup killed a process in a child cgroup it did not make")
	case <-time.After(200 * time.Millisecond):
	}
}
