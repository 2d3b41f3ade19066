package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// What the launcher needs from the host beyond the kernel's features, and
// the one-line errors that say what is missing and what to do when a
// deployment lacks it (docs/SECURITY.md, "Deploying").

// procSelf is the launcher's own /proc/self (a variable for tests).
var procSelf = "/proc/self"

// CheckProc reports an error when /proc is not mounted: the launcher
// starts the trampoline as /proc/self/exe or /proc/self/fd/N, marks its
// fds close-on-exec from /proc/self/fd and writes a plugin's id maps under
// /proc/PID. A /proc mounted with hidepid= or subset=pid is enough.
func CheckProc() error {
	if _, err := os.Readlink(procSelf + "/exe"); err != nil {
		return fmt.Errorf("sandbox: /proc is not mounted (%v): krun-core starts its plugins through /proc/self/exe and /proc/self/fd; mount it (mount -t proc proc /proc; hidepid= and subset=pid are fine)", err)
	}
	return nil
}

// idMapped reports whether id is mapped by an id map in the format of
// /proc/PID/uid_map ("inside outside count" per line), as seen from inside.
func idMapped(m []byte, id int) bool {
	sc := bufio.NewScanner(bytes.NewReader(m))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 {
			continue
		}
		first, err1 := strconv.ParseUint(f[0], 10, 32)
		count, err2 := strconv.ParseUint(f[2], 10, 32)
		if err1 == nil && err2 == nil && uint64(id) >= first && uint64(id)-first < count {
			return true
		}
	}
	return false
}

// checkRootUserNS is PluginIDs' check for a launcher that is uid 0 of a
// user namespace other than the host's (rootless podman, unshare -r, a
// container with a user namespace of its own): it is root only over the
// ids that namespace maps, and joins the plugin's group (JoinGroup) and
// drops the plugin's supplementary groups only where setgroups is allowed.
// Without the check the launch fails later with a bare EPERM or EINVAL.
// A launcher that cannot read its maps (no /proc) is not refused here:
// CheckProc says what is missing then.
func checkRootUserNS(uid, gid int) error {
	um, err1 := os.ReadFile(procSelf + "/uid_map")
	gm, err2 := os.ReadFile(procSelf + "/gid_map")
	if err1 != nil || err2 != nil {
		return nil
	}
	if !idMapped(um, uid) || !idMapped(gm, gid) {
		return fmt.Errorf("plugin ids %d:%d are not mapped in krun-core's user namespace (uid_map %q): krun-core is uid 0 there, not the host's root; "+
			"map them (a subordinate id range, as podman unshare or newuidmap give), choose mapped ids with --plugin-uid and --plugin-gid, or run krun-core as its own user outside that namespace",
			uid, gid, strings.Join(strings.Fields(string(um)), " "))
	}
	if sg, err := os.ReadFile(procSelf + "/setgroups"); err == nil && strings.TrimSpace(string(sg)) == "deny" {
		return errors.New("setgroups is denied in krun-core's user namespace (/proc/self/setgroups: deny), and krun-core, uid 0 there, needs it to run plugins as other ids; " +
			"create the namespace with setgroups allowed, or run krun-core as its own user outside that namespace")
	}
	return nil
}

// namespaceHint says what to do when the kernel refused to create a
// plugin's namespaces with errno e; "" for an errno that does not mean
// that.
func namespaceHint(e syscall.Errno) string {
	const weaker = "; or run krun-core with --sandbox-disable=namespaces,root, a weaker sandbox that warns"
	switch e {
	case unix.ENOSPC:
		return "the kernel refused the plugin's namespaces: user.max_user_namespaces (or another user.max_*_namespaces) is 0 or used up for this user, " +
			"on the host or in the container krun-core runs in; raise it (sysctl -w user.max_user_namespaces=15000)" + weaker
	case unix.EPERM:
		return "the kernel refused the plugin's user namespace: unprivileged user namespaces are turned off (kernel.unprivileged_userns_clone=0 on Debian, " +
			"kernel.apparmor_restrict_unprivileged_userns=1 on Ubuntu without an AppArmor profile that allows them to krun-core), " +
			"a seccomp filter refuses them (a container's profile, systemd's RestrictNamespaces=), or krun-core runs in a chroot; allow them" + weaker
	case unix.EUSERS:
		return "the kernel refused the plugin's user namespace: krun-core already runs 32 user namespaces deep, the kernel's limit; run it in a shallower one" + weaker
	}
	return ""
}

// ExplainStartError adds what to do to cmd.Start's error for a command
// Apply prepared, when the kernel refused what the sandbox needs from it:
// the plugin's namespaces, or a new process (RLIMIT_NPROC, pids.max).
// Other errors are returned as they are.
func ExplainStartError(cmd *exec.Cmd, err error) error {
	var e syscall.Errno
	if err == nil || !errors.As(err, &e) {
		return err
	}
	if e == unix.EAGAIN {
		return fmt.Errorf("%w: no new process allowed: the limit on this user's processes and threads (RLIMIT_NPROC, ulimit -u) or the control group's pids.max is reached; raise it (prlimit --nproc, LimitNPROC=, TasksMax=)", err)
	}
	if cmd.SysProcAttr == nil || cmd.SysProcAttr.Cloneflags&unix.CLONE_NEWUSER == 0 {
		return err
	}
	if h := namespaceHint(e); h != "" {
		return fmt.Errorf("%w: %s", err, h)
	}
	return err
}

// noexecMount reports whether the file f (an O_PATH fd is enough) is on a
// file system mounted noexec, where the trampoline's exec of it fails with
// a bare EACCES.
func noexecMount(f *os.File) bool {
	var s unix.Statfs_t
	return unix.Fstatfs(int(f.Fd()), &s) == nil && s.Flags&unix.ST_NOEXEC != 0
}
