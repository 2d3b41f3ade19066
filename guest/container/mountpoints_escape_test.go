package container

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMakeMountPointsStaysInRoot (expected to pass): the host-side mount
// point creation never follows the image's links out of the root.
func TestMakeMountPointsStaysInRoot(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink(outside, filepath.Join(root, "etc")))                               // absolute link to a host dir
	must(os.Symlink("../../../../../../"+outside+"/rel", filepath.Join(root, "run")))   // relative, climbing
	must(os.Symlink(filepath.Join(outside, "dangling"), filepath.Join(root, "dangle"))) // dangling, absolute
	must(os.Symlink("/proc/self/root"+outside, filepath.Join(root, "magic")))           // through a magic link
	must(os.MkdirAll(filepath.Join(root, "dev"), 0o755))
	must(os.Symlink(outside+"/null", filepath.Join(root, "dev", "null")))
	s := &Setup{Mounts: []Mount{
		{Destination: "/etc/resolv.conf", Type: TypeFile, Source: "0"},
		{Destination: "/etc/sub/dir", Type: TypeTmpfs},
		{Destination: "/run/secrets", Type: TypeTmpfs},
		{Destination: "/dangle", Type: TypeTmpfs},
		{Destination: "/dangle/x", Type: TypeFile, Source: "0"},
		{Destination: "/magic/y", Type: TypeTmpfs},
		{Destination: "/dev/null", Type: TypeFile, Source: "0"},
		{Destination: "/../../../escape", Type: TypeTmpfs},
	}, Files: []File{{Content: []byte("x")}}}
	errs := MakeMountPoints(root, s)
	t.Logf("errors: %v", errs)
	ents, _ := os.ReadDir(outside)
	for _, e := range ents {
		t.Errorf("created outside the root: %s", e.Name())
	}
	if _, err := os.Lstat(filepath.Join(filepath.Dir(root), "escape")); err == nil {
		t.Error("escape made beside the root")
	}
}
