package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// What the launcher needs from the host (host_linux.go): each missing
// piece is one line that names it and what to do (found in review,
// helper-143, running krun-core where deployers run it).

func TestIDMapped(t *testing.T) {
	for _, c := range []struct {
		m    string
		id   int
		want bool
	}{
		{"         0          0 4294967295\n", 65534, true},
		{"         0       1001          1\n", 0, true},
		{"         0       1001          1\n", 65534, false},
		{"         0       1001          1\n         1     100000      65536\n", 65534, true},
		{"         0       1001          1\n         1     100000      65536\n", 65537, false},
		{"0 100000 65536", 65535, true},
		{"0 100000 65536", 65536, false},
		{"", 0, false},
		{"garbage\n", 0, false},
	} {
		if got := idMapped([]byte(c.m), c.id); got != c.want {
			t.Errorf("idMapped(%q, %d) = %v, want %v", c.m, c.id, got, c.want)
		}
	}
}

// TestCheckRootUserNS: the maps and setgroups of the launcher's user
// namespace, read from a fake /proc/self.
func TestCheckRootUserNS(t *testing.T) {
	for _, c := range []struct {
		name, uidMap, gidMap, setgroups string
		want                            string // "" for no error
	}{
		{"host", "0 0 4294967295", "0 0 4294967295", "allow", ""},
		{"rootless podman", "0 1001 1\n1 100000 65536", "0 1001 1\n1 100000 65536", "allow", ""},
		{"unshare -r", "0 1001 1", "0 1001 1", "deny", "plugin ids 65534:65534 are not mapped"},
		{"gid unmapped", "0 0 65536", "0 1001 1", "allow", "are not mapped"},
		{"setgroups denied", "0 100000 65536", "0 100000 65536", "deny", "setgroups is denied"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			for f, s := range map[string]string{"uid_map": c.uidMap, "gid_map": c.gidMap, "setgroups": c.setgroups} {
				if err := os.WriteFile(filepath.Join(d, f), []byte(s+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			old := procSelf
			procSelf = d
			defer func() { procSelf = old }()
			err := checkRootUserNS(DefaultPluginUID, DefaultPluginGID)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("error %v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("error %v, want one saying %q", err, c.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Errorf("error of more than one line: %q", err)
			}
		})
	}
	old := procSelf
	procSelf = filepath.Join(t.TempDir(), "missing")
	defer func() { procSelf = old }()
	if err := checkRootUserNS(DefaultPluginUID, DefaultPluginGID); err != nil {
		t.Errorf("without /proc: %v (CheckProc says that)", err)
	}
	if err := CheckProc(); err == nil || !strings.Contains(err.Error(), "/proc is not mounted") {
		t.Errorf("CheckProc without /proc: %v", err)
	}
}

func TestCheckProc(t *testing.T) {
	if err := CheckProc(); err != nil {
		t.Fatalf("CheckProc with /proc mounted: %v", err)
	}
}

func TestExplainStartError(t *testing.T) {
	userNS := &exec.Cmd{SysProcAttr: &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWUSER}}
	plain := &exec.Cmd{}
	wrap := func(e syscall.Errno) error { return &os.PathError{Op: "fork/exec", Path: "/proc/self/fd/5", Err: e} }
	for _, c := range []struct {
		name string
		cmd  *exec.Cmd
		err  error
		want string // "" for the error unchanged
	}{
		{"ENOSPC", userNS, wrap(unix.ENOSPC), "user.max_user_namespaces"},
		{"EPERM", userNS, wrap(unix.EPERM), "kernel.unprivileged_userns_clone=0"},
		{"EPERM apparmor", userNS, wrap(unix.EPERM), "kernel.apparmor_restrict_unprivileged_userns"},
		{"EUSERS", userNS, wrap(unix.EUSERS), "32 user namespaces deep"},
		{"EAGAIN", userNS, wrap(unix.EAGAIN), "RLIMIT_NPROC"},
		{"EAGAIN without namespaces", plain, wrap(unix.EAGAIN), "pids.max"},
		{"ENOSPC without namespaces", plain, wrap(unix.ENOSPC), ""},
		{"ENOENT", userNS, wrap(unix.ENOENT), ""},
		{"not an errno", userNS, errors.New("boom"), ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := ExplainStartError(c.cmd, c.err)
			if !errors.Is(got, c.err) {
				t.Errorf("%v does not wrap %v", got, c.err)
			}
			if c.want == "" {
				if got.Error() != c.err.Error() {
					t.Errorf("changed to %q", got)
				}
				return
			}
			if !strings.Contains(got.Error(), c.want) || !strings.HasPrefix(got.Error(), c.err.Error()) || strings.Contains(got.Error(), "\n") {
				t.Errorf("%q: want %v and a line naming %q", got, c.err, c.want)
			}
		})
	}
	if ExplainStartError(userNS, nil) != nil {
		t.Error("nil error explained")
	}
}

// rootlessLine is what the rootless helper reports.
type rootlessLine struct {
	IDs      string `json:"ids"`       // PluginIDs' error, or the ids
	NoUserNS string `json:"no_userns"` // a start refused by user.max_user_namespaces=0, explained
	Noexec   string `json:"noexec"`    // noexecMount of a file on a noexec and on an exec tmpfs
}

// rootlessMain runs as uid 0 of a user namespace that maps only the test's
// own uid (as `unshare --map-root-user` makes one).
func rootlessMain() int {
	var l rootlessLine
	if uid, gid, err := (LaunchConfig{}).PluginIDs(); err != nil {
		l.IDs = err.Error()
	} else {
		l.IDs = fmt.Sprintf("%d:%d", uid, gid)
	}
	l.Noexec = noexecProbe()
	if err := os.WriteFile("/proc/sys/user/max_user_namespaces", []byte("0\n"), 0); err != nil {
		l.NoUserNS = "cannot set user.max_user_namespaces: " + err.Error()
	} else {
		cmd := exec.Command("/proc/self/exe", "-test.run=^$")
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWUSER}
		l.NoUserNS = fmt.Sprint(ExplainStartError(cmd, cmd.Start()))
	}
	json.NewEncoder(os.Stdout).Encode(l)
	return 0
}

// noexecProbe mounts a noexec and an exec tmpfs (in the helper's own mount
// namespace) and says what noexecMount finds on each.
func noexecProbe() string {
	var out []string
	for _, opt := range []string{"noexec", "exec"} {
		d, err := os.MkdirTemp("", "noexec")
		if err != nil {
			return err.Error()
		}
		defer os.Remove(d)
		flags := uintptr(0)
		if opt == "noexec" {
			flags = unix.MS_NOEXEC
		}
		if err := unix.Mount("tmpfs", d, "tmpfs", flags, ""); err != nil {
			return "mount: " + err.Error()
		}
		defer unix.Unmount(d, unix.MNT_DETACH)
		p := filepath.Join(d, "krun-plugin-x")
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
			return err.Error()
		}
		f, err := os.OpenFile(p, unix.O_PATH, 0)
		if err != nil {
			return err.Error()
		}
		out = append(out, fmt.Sprintf("%s=%v", opt, noexecMount(f)))
		f.Close()
	}
	return strings.Join(out, " ")
}

// TestRootlessLauncher: krun-core as uid 0 of `unshare -r` (rootless
// podman's namespace without its subordinate ids) failed to launch any
// plugin with "sandbox: join group 65534: operation not permitted", and
// with user namespaces refused (user.max_user_namespaces=0) with "fork/exec
// /proc/self/fd/5: no space left on device", and a plugin on a noexec mount
// with the trampoline's bare "permission denied": none says what is wrong.
func TestRootlessLauncher(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), envHelper+"=rootless")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER | unix.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}},
	}
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("no user namespace for the helper here: %v", err)
	}
	var l rootlessLine
	if err := json.Unmarshal(out, &l); err != nil {
		t.Fatalf("helper said %q: %v", out, err)
	}
	if !strings.Contains(l.IDs, "not mapped in krun-core's user namespace") || !strings.Contains(l.IDs, "--plugin-uid") {
		t.Errorf("PluginIDs as uid 0 of a one-id user namespace: %q, want an error naming the unmapped ids and what to do", l.IDs)
	}
	if !strings.Contains(l.NoUserNS, "no space left on device") || !strings.Contains(l.NoUserNS, "user.max_user_namespaces") {
		t.Errorf("a start with user namespaces refused: %q, want ENOSPC explained with the sysctl", l.NoUserNS)
	}
	if l.Noexec != "noexec=true exec=false" {
		t.Errorf("noexecMount: %q, want noexec=true exec=false", l.Noexec)
	}
}

// TestRootDirSymlink: a root directory reached through a symbolic link
// into a directory above it ($TMPDIR=/tmp/x/link pointing at /tmp) failed
// every launch with "sandbox: root: make the new root read-only: invalid
// argument": the trampoline remounted by a path its first mount had
// covered (found in review, helper-143).
func TestRootDirSymlink(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // reachable by a root launcher's plugin ids
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=execed"}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := (LaunchConfig{RootDir: link, Log: hclog.NewNullLogger()}).Apply(cmd); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), "execed") {
		t.Errorf("exit %v, stdout %q, stderr %q; want the plugin run", err, out, stderr.String())
	}
}

// TestTrampolineNotExecutableByPlugin: the trampoline starts as the
// plugin's ids, so a root launcher whose trampoline (krun-core itself, or
// krun-sandbox-exec) those ids may not execute failed every launch with a
// bare "fork/exec /proc/self/exe: permission denied" (a root-only
// krun-core of mode 0700; found in review, helper-143). Apply says so.
func TestTrampolineNotExecutableByPlugin(t *testing.T) {
	requireSandboxHost(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root: the plugin must run as other ids than the trampoline's owner")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		mode os.FileMode
		want string // "" for a launch that runs the plugin
	}{
		{0o700, "(mode 0700, owner 0:0) is not executable by 65534:65534"},
		{0o750, "(mode 0750, owner 0:0) is not executable by 65534:65534"},
		{0o755, ""},
	} {
		t.Run(c.mode.String(), func(t *testing.T) {
			tramp := filepath.Join(t.TempDir(), TrampolineName)
			if err := os.WriteFile(tramp, b, c.mode); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(self)
			cmd.Env = []string{envHelper + "=execed"}
			err := (LaunchConfig{Trampoline: tramp, RootDir: "/tmp", Log: hclog.NewNullLogger()}).Apply(cmd)
			if c.want != "" {
				if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "mode 0755") {
					t.Errorf("Apply = %v, want an error saying %q and what to do", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if out, err := cmd.Output(); err != nil || !strings.Contains(string(out), "execed") {
				t.Errorf("exit %v, stdout %q; want the plugin run", err, out)
			}
		})
	}
}

// TestLimitsCut: the limits a launcher's lower hard limits cut, which
// Apply warns of (the trampoline gives the plugin the lower one).
func TestLimitsCut(t *testing.T) {
	l := Limits{OpenFiles: FSOpenFiles, DataBytes: DefaultDataBytes, FileBytes: 1 << 20}
	hard := map[int]uint64{unix.RLIMIT_NOFILE: 64, unix.RLIMIT_DATA: unix.RLIM_INFINITY, unix.RLIMIT_FSIZE: 1 << 20}
	got := limitsCut(l, func(res int) uint64 { return hard[res] })
	want := []string{fmt.Sprintf("RLIMIT_NOFILE 64 (not %d)", FSOpenFiles)}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("limitsCut = %q, want %q", got, want)
	}
	hard[unix.RLIMIT_DATA] = 100 << 20
	hard[unix.RLIMIT_FSIZE] = 4096
	if got := limitsCut(l, func(res int) uint64 { return hard[res] }); len(got) != 3 {
		t.Errorf("limitsCut = %q, want NOFILE, DATA and FSIZE", got)
	}
	if got := limitsCut(Limits{}, func(int) uint64 { return 0 }); len(got) != 0 {
		t.Errorf("limitsCut of unset limits = %q", got)
	}
}
