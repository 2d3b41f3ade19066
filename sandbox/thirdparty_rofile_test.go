package sandbox

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// A hostile third-party plugin handed a file read-only (`--plugin
// KIND,file.NAME=PATH`, docs/PLUGINS.md: "opens PATH read-only") cannot
// change that file: not its content, and not its mode, group, times or
// extended attributes either. Those act on the inode, whatever the fd's
// open mode, and are allowed to the file's owner; the plugin is its owner
// whenever it runs with the file owner's ids: always under a krun-core
// that is not root (its plugins run as the user), and under a root one
// with --plugin-uid of the owner (here: HostUID 1000, the file 1000's).
// Landlock does not cover these calls and a third-party kind's launch
// filter is the fs profile, whose fs-tree layer allows fchmod, fchown,
// fsetxattr, utimensat ... unconditionally. On current code the plugin
// makes the user's file set-uid and world-writable (mode 04777), before
// and after its own Restrict.
func TestThirdPartyCannotChangeReadOnlyFile(t *testing.T) {
	for _, tc := range []struct{ name, arg string }{{"launch filter", ""}, {"after Restrict", "restrict"}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			os.Chmod(dir, 0o755)
			path := filepath.Join(dir, "data")
			if err := os.WriteFile(path, []byte("the user's data"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(path, 1000, 1000); err != nil {
				t.Fatal(err)
			}
			var before unix.Stat_t
			unix.Stat(path, &before)
			ro, err := os.Open(path) // file.NAME=PATH: O_RDONLY
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			p := startAttack(t, "thirdparty", "x-rofile", tc.arg, LaunchConfig{HostUID: 1000, HostGID: 1000}, ro)
			r, ok := p.result(t)
			if !ok {
				t.Fatalf("probe died: %s", p.stderr.String())
			}
			t.Logf("errnos: %v", r.Errnos)
			var after unix.Stat_t
			unix.Stat(path, &after)
			_, xerr := unix.Getxattr(path, "user.planted", nil)
			if after.Mode != before.Mode || after.Gid != before.Gid || after.Mtim != before.Mtim || xerr == nil {
				t.Errorf("a third-party plugin handed %s read-only changed it: mode %#o -> %#o, gid %d -> %d, mtime %v -> %v, xattr planted: %v",
					path, before.Mode&0o7777, after.Mode&0o7777, before.Gid, after.Gid, before.Mtim, after.Mtim, xerr == nil)
			}
		})
	}
}
