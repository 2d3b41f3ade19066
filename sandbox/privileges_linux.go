package sandbox

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Capability is a Linux capability (unix.CAP_*).
type Capability int

var capNames = map[Capability]string{
	unix.CAP_CHOWN: "CAP_CHOWN", unix.CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", unix.CAP_KILL: "CAP_KILL",
	unix.CAP_SETGID: "CAP_SETGID", unix.CAP_SETUID: "CAP_SETUID", unix.CAP_SETPCAP: "CAP_SETPCAP",
	unix.CAP_SYS_ADMIN:        "CAP_SYS_ADMIN",
	unix.CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
}

func (c Capability) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("capability %d", int(c))
}

// KeepCapabilities are the capabilities a launcher that is root (or holds
// capabilities) keeps after set-up (DropPrivileges) to go on running
// plugins launched with c, and to launch them again:
//
//   - CAP_KILL: signalling the processes it started that run as other ids
//     outside a user namespace of its own: passt (it makes itself nobody,
//     in a user namespace nobody owns) and plugins without user namespaces
//     (LayerNamespaces disabled). A plugin in its own user namespace needs
//     nothing: the launcher created that namespace, and a user namespace's
//     creator holds every capability in it (also CAP_SYS_PTRACE, for its
//     /proc/PID/root and ns links, and CAP_SYS_RESOURCE, for prlimit).
//   - CAP_SETUID, CAP_SETGID: mapping a new plugin's user namespace onto its
//     host ids, which are not the launcher's (an unprivileged writer of
//     uid_map can only map its own id); switching to them without a user
//     namespace; passt's own switch to nobody.
//   - with LayerRoot disabled, CAP_CHOWN and CAP_DAC_OVERRIDE: handing a new
//     plugin its socket directory and removing it when the plugin is gone
//     (the directory is the plugin's then).
//
// Not kept: CAP_SYS_ADMIN and CAP_SETFCAP, which an ID-mapped mount needs
// (IDMapShare: the mount, and a user namespace that maps host root). A
// share's mount is made at set-up and kept, and a plugin launched again is
// handed the same mount.
func (c LaunchConfig) KeepCapabilities() []Capability {
	keep := []Capability{unix.CAP_KILL, unix.CAP_SETUID, unix.CAP_SETGID}
	if d, err := normalizeDisabled(c.Disable); err == nil && slices.Contains(d, LayerRoot) {
		keep = append(keep, unix.CAP_CHOWN, unix.CAP_DAC_OVERRIDE)
	}
	return keep
}

// DropPrivileges is what a launcher calls once its set-up is done: it sets
// no_new_privs and reduces the permitted and effective capability sets to
// keep (those it holds of them), empties the inheritable and ambient sets,
// and, when it may (CAP_SETPCAP), removes every other capability from the
// bounding set, on every thread of the process (syscall.AllThreadsSyscall:
// these belong to threads). Its uid stays what it is: a root launcher still
// owns root's files (see docs/SECURITY.md).
//
// AllThreadsSyscall refuses to run in a binary linked with cgo; the error
// then says so and nothing was changed. A failure half-way leaves the
// process with less than it had, never more.
func DropPrivileges(keep []Capability) error {
	var mask uint64
	for _, c := range keep {
		if c < 0 || c > 63 {
			return fmt.Errorf("sandbox: drop privileges: %v is not a capability", c)
		}
		mask |= 1 << uint(c)
	}
	if _, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); e != 0 {
		if e == unix.ENOTSUP {
			return errors.New("sandbox: drop privileges: this binary links cgo, where Go cannot change every thread's credentials (build with CGO_ENABLED=0)")
		}
		return fmt.Errorf("sandbox: drop privileges: no_new_privs: %w", e)
	}
	eff, perm, _, err := capget()
	if err != nil {
		return fmt.Errorf("sandbox: drop privileges: capget: %w", err)
	}
	if eff&(1<<unix.CAP_SETPCAP) != 0 {
		for c := 0; c <= 63; c++ {
			in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0)
			if err != nil {
				break // EINVAL: past the last capability of this kernel
			}
			if in == 0 || mask&(1<<uint(c)) != 0 {
				continue
			}
			if _, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(c), 0); e != 0 {
				return fmt.Errorf("sandbox: drop privileges: drop %v from the bounding set: %w", Capability(c), e)
			}
		}
	}
	if _, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); e != 0 {
		return fmt.Errorf("sandbox: drop privileges: clear the ambient set: %w", e)
	}
	if err := capsetAllThreads(perm & mask); err != nil {
		return fmt.Errorf("sandbox: drop privileges: capset: %w", err)
	}
	if eff, perm, inh, err := capget(); err != nil || (eff|perm)&^mask != 0 || inh != 0 {
		return fmt.Errorf("sandbox: drop privileges: capabilities left: eff %#x perm %#x inh %#x (%v)", eff, perm, inh, err)
	}
	return nil
}

// CapabilityNames renders capabilities for a log line: "CAP_KILL,CAP_SETUID"
// or "none".
func CapabilityNames(cs []Capability) string {
	if len(cs) == 0 {
		return "none"
	}
	s := make([]string, len(cs))
	for i, c := range cs {
		s[i] = c.String()
	}
	return strings.Join(s, ",")
}

// HeldCapabilities are the capabilities of keep this thread holds
// (effective): what DropPrivileges(keep) leaves.
func HeldCapabilities(keep []Capability) []Capability {
	eff, _, _, err := capget()
	if err != nil {
		return nil
	}
	var out []Capability
	for _, c := range keep {
		if c >= 0 && c <= 63 && eff&(1<<uint(c)) != 0 {
			out = append(out, c)
		}
	}
	return out
}

// SocketGroup is the group a root launcher and its plugin share for the
// plugin's gRPC socket: go-plugin makes the socket (and its directory)
// writable by that group (UnixSocketConfig.Group, named as the plugin sees
// it), and the launcher joins the group (JoinGroup), so it reaches a
// plugin it starts again after DropPrivileges took CAP_DAC_OVERRIDE,
// without which root is only "other" to a directory of the plugin's ids.
// It returns the plugin's gid as the plugin names it ("0" in its own user
// namespace, the host gid without one) and the host gid to join; "" and
// -1 when nothing is needed (a launcher that is not root runs plugins as
// its own ids).
func (c LaunchConfig) SocketGroup() (pluginName string, hostGID int) {
	if os.Geteuid() != 0 {
		return "", -1
	}
	_, gid, err := c.PluginIDs()
	if err != nil {
		return "", -1
	}
	d, err := normalizeDisabled(c.Disable)
	if err != nil {
		return "", -1
	}
	if slices.Contains(d, LayerNamespaces) {
		return strconv.Itoa(gid), gid
	}
	return "0", gid
}

// JoinGroup adds gid to this process's supplementary groups (on every
// thread) unless it is there already. It needs CAP_SETGID, which
// KeepCapabilities keeps.
func JoinGroup(gid int) error {
	groups, err := unix.Getgroups()
	if err != nil {
		return fmt.Errorf("sandbox: getgroups: %w", err)
	}
	if slices.Contains(groups, gid) || os.Getegid() == gid {
		return nil
	}
	// syscall.Setgroups changes every thread's groups (Go 1.16 and later).
	if err := syscall.Setgroups(append(groups, gid)); err != nil {
		return fmt.Errorf("sandbox: join group %d: %w", gid, err)
	}
	return nil
}

// JoinSocketGroup returns the name go-plugin is to give the plugin's
// socket ("" for none) and joins SocketGroup's host gid if this launcher
// needs the group now to reach the socket: without CAP_DAC_OVERRIDE, as
// after DropPrivileges (which keeps CAP_SETGID for the join). A launcher
// that holds it reaches the socket without the group, and so does not
// join before its first launches: a join changes every thread's groups
// (syscall.AllThreadsSyscall stops the world and signals each thread),
// about 0.5 ms of serve's start-up on the development machine
// (docs/BENCHMARKS.md).
func (c LaunchConfig) JoinSocketGroup() (string, error) {
	name, gid := c.SocketGroup()
	if gid < 0 || len(HeldCapabilities([]Capability{unix.CAP_DAC_OVERRIDE})) > 0 {
		return name, nil
	}
	return name, JoinGroup(gid)
}
