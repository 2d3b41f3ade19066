package oci

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSystemdCgroupHint: a systemd cgroup the caller has no rights to
// make or join (rootless podman's user.slice:libpod:ID, without systemd's
// D-Bus) is one line that says why and what to use instead; other errors,
// and the same one without --systemd-cgroup, are left as they are.
func TestSystemdCgroupHint(t *testing.T) {
	mkdir := func(errno unix.Errno) error {
		return fmt.Errorf("create cgroup /sys/fs/cgroup/user.slice/libpod-x.scope: %w",
			&os.PathError{Op: "mkdir", Path: "/sys/fs/cgroup/user.slice/libpod-x.scope", Err: errno})
	}
	for _, tc := range []struct {
		err     error
		systemd bool
		hint    bool
	}{
		{mkdir(unix.EACCES), true, true},
		{mkdir(unix.EPERM), true, true},
		{mkdir(unix.EROFS), true, true},
		{fmt.Errorf("join cgroup /cg/x: %w", unix.EACCES), true, true},
		{mkdir(unix.EACCES), false, false},
		{mkdir(unix.ENOENT), true, false},
		{errors.New("cgroup x: /cg is not a cgroup v2 mount (cgroup v1 is not supported)"), true, false},
	} {
		got := systemdCgroupHint(tc.err, tc.systemd)
		hinted := strings.Contains(got.Error(), `cgroup_manager = "cgroupfs"`)
		if hinted != tc.hint || !strings.HasPrefix(got.Error(), tc.err.Error()) || strings.Contains(got.Error(), "\n") || !errors.Is(got, tc.err) {
			t.Errorf("systemdCgroupHint(%v, %v) = %q; want the error%s", tc.err, tc.systemd, got, map[bool]string{true: " with the hint", false: " as it is"}[tc.hint])
		}
	}
}
