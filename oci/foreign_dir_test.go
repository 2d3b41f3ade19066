package oci

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestForeignDirectoryIsNotAContainer: with a wrong --root (a home
// directory), every directory there without a record looked like a create
// that died, and delete (with or without --force) removed it and all it
// held; so did delete --force for one whose state.json was not a record
// of its name. A state directory is krun-oci's only with its marker or a
// record of its own ID: the others are no container, and nothing removes
// them (from review, helper-114).
func TestForeignDirectoryIsNotAContainer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		state string // state.json's content; "" for none
	}{
		{"no state file", ""},
		{"a state.json of something else", `{"version": 3, "items": []}`},
		{"a state.json that is not JSON", "key = value\n"},
		{"a record of another ID", `{"id":"someone-else","phase":"started"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, "docs")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			precious := filepath.Join(dir, "thesis.txt")
			if err := os.WriteFile(precious, []byte("precious"), 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.state != "" {
				if err := os.WriteFile(filepath.Join(dir, recordFile), []byte(tc.state), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, e, code := mainWith(t, "--root", root, "delete", "docs")
			if code != 1 || !strings.Contains(e, "not a krun-oci state directory") || strings.Count(e, "\n") != 1 {
				t.Errorf("delete docs: exit %d, %q: want exit 1 and one line saying it is not krun-oci's", code, e)
			}
			if _, e, code := mainWith(t, "--root", root, "delete", "--force", "docs"); code != 0 {
				t.Errorf("delete --force docs: exit %d, %q: want 0, as for a container that does not exist", code, e)
			}
			if _, e, code := mainWith(t, "--root", root, "state", "docs"); code == 0 {
				t.Errorf("state docs: exit 0, %q: a foreign directory reported as a container", e)
			}
			if out, _, _ := mainWith(t, "--root", root, "list"); strings.Contains(out, "docs") {
				t.Errorf("list shows the foreign directory:\n%s", out)
			}
			if b, err := os.ReadFile(precious); err != nil || string(b) != "precious" {
				t.Fatalf("the foreign directory's file is gone or changed: %q, %v", b, err)
			}
			createConflicts(t, root, "docs")
		})
	}
}

// createConflicts checks that a create of id under root, where a foreign
// directory of that name is, fails as for a taken ID.
func createConflicts(t *testing.T, root, id string) {
	t.Helper()
	st := &Store{Root: root}
	c, err := st.Create(id)
	if err == nil {
		c.Unlock()
		t.Fatalf("create of %s over a foreign directory succeeded", id)
	}
	if !strings.Contains(err.Error(), ErrExist.Error()) {
		t.Errorf("create of %s over a foreign directory: %v, want %v", id, err, ErrExist)
	}
}

// TestDeadCreateIsStillDeleted: a create that died before writing its
// record leaves a state directory with the marker, which is a stopped
// container that delete removes (the case the marker keeps working), and
// Create leaves nothing under its temporary name.
func TestDeadCreateIsStillDeleted(t *testing.T) {
	root := t.TempDir()
	st := &Store{Root: root}
	c, err := st.Create("dead")
	if err != nil {
		t.Fatal(err)
	}
	c.Unlock() // died here: no record
	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != "dead" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("the root holds %q after a create, want only \"dead\"", names)
	}
	if out, e, code := mainWith(t, "--root", root, "state", "dead"); code != 0 || !strings.Contains(out, `"stopped"`) {
		t.Errorf("state of a create that died: exit %d, %q %q; want stopped", code, out, e)
	}
	if _, e, code := mainWith(t, "--root", root, "delete", "dead"); code != 0 {
		t.Fatalf("delete of a create that died: exit %d, %q", code, e)
	}
	if _, err := os.Lstat(filepath.Join(root, "dead")); !os.IsNotExist(err) {
		t.Fatalf("the dead create's state directory is still there: %v", err)
	}
}

// TestCreateSweepsDeadCreates: a create that died between making its
// temporary directory and renaming it left ~new-PID-... in the root for
// good; the next create removes those of processes that are gone, and
// keeps those of a create under way (from review, helper-118).
func TestCreateSweepsDeadCreates(t *testing.T) {
	root := t.TempDir()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := filepath.Join(root, newPrefix+strconv.Itoa(cmd.Process.Pid)+"-123")
	alive := filepath.Join(root, newPrefix+strconv.Itoa(os.Getpid())+"-456")
	for _, d := range []string{dead, alive} {
		if err := os.MkdirAll(filepath.Join(d, "x"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	c, err := (&Store{Root: root}).Create("c1")
	if err != nil {
		t.Fatal(err)
	}
	c.Unlock()
	if _, err := os.Lstat(dead); !os.IsNotExist(err) {
		t.Errorf("a dead create's temporary directory is still there: %v", err)
	}
	if _, err := os.Lstat(alive); err != nil {
		t.Errorf("a live create's temporary directory was removed: %v", err)
	}
}
