package sandbox

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// A plugin never runs as host root, but the directories it serves
// (virtio-fs shares: a container's root file system, a chroot tree) belong
// to the launcher's user, usually root, and the plugin reaches the files in
// them by name with its own ids. IDMapShare hands it an ID-mapped mount of
// the directory instead, on which the launcher's ids and the plugin's are
// swapped: through it the plugin owns what the launcher owns, and what it
// creates belongs on disk to the launcher's ids, as when plugins ran with
// the launcher's ids. docs/SECURITY.md ("Shared directories") has the
// design.

// IDSwap is one id (uid or gid) of an ID-mapped share: through the mount,
// files whose on-disk id is Launcher appear as Plugin's and the reverse;
// every other id is itself.
type IDSwap struct {
	Launcher, Plugin uint32
}

// Swap translates an on-disk id into the id the mount presents (and back:
// a swap is its own inverse).
func (s IDSwap) Swap(id uint32) uint32 {
	switch id {
	case s.Launcher:
		return s.Plugin
	case s.Plugin:
		return s.Launcher
	}
	return id
}

// ShareSwaps returns the uid and gid swaps of an ID-mapped share for a
// plugin launched with c, and whether one is needed at all: not when the
// plugin runs with the launcher's own ids (a launcher that is not root).
func (c LaunchConfig) ShareSwaps() (uid, gid IDSwap, needed bool, err error) {
	pu, pg, err := c.PluginIDs()
	if err != nil {
		return IDSwap{}, IDSwap{}, false, fmt.Errorf("sandbox: %w", err)
	}
	uid = IDSwap{Launcher: uint32(os.Geteuid()), Plugin: uint32(pu)}
	gid = IDSwap{Launcher: uint32(os.Getegid()), Plugin: uint32(pg)}
	return uid, gid, uid.Launcher != uid.Plugin || gid.Launcher != gid.Plugin, nil
}

// PluginSeesShareIDs reports whether a plugin launched with c sees the ids
// of an ID-mapped share as the mount presents them, swapped (ShareSwaps):
// only when it has no user namespace of its own (the namespaces layer
// disabled). In its own user namespace only its host ids are mapped, as
// its uid and gid 0, and they stand on the share for the launcher's: the
// plugin sees the launcher's files as its root's, as it saw them when it
// ran with the launcher's ids, and every other id as the overflow id.
func (c LaunchConfig) PluginSeesShareIDs() bool {
	d, err := normalizeDisabled(c.Disable)
	if err != nil {
		return false
	}
	for _, l := range d {
		if l == LayerNamespaces {
			return true
		}
	}
	return false
}

// IDMapShare returns an ID-mapped mount of the directory dir (an open
// directory fd) for a plugin launched with c: a detached copy of the
// directory's mount tree (open_tree with OPEN_TREE_CLONE and AT_RECURSIVE,
// so mounts below it come along), on which mount_setattr sets
// MOUNT_ATTR_IDMAP with the swaps of ShareSwaps (every other id maps to
// itself, so no file has an owner the kernel cannot map, which would make it
// read-only), MOUNT_ATTR_NOSUID and MOUNT_ATTR_NODEV, and with
// ReadOnlyDirs MOUNT_ATTR_RDONLY. The result is an
// O_PATH fd of the copy's root, to hand to the plugin instead of dir; the
// copy lives as long as a descriptor of it (or of a file opened through it)
// does. Mounts made below the directory later are not in the copy.
//
// It returns nil, nil when no mapping is needed (ShareSwaps). It fails when
// this host cannot make the mount: Linux before 5.12 (no mount_setattr), a
// file system without ID-mapped mounts (tmpfs before Linux 6.3, procfs,
// ...; the directory's or any mount below it), a launcher without
// CAP_SYS_ADMIN, or a directory on a mount that is itself ID-mapped. The
// caller then hands over the plain directory, which the plugin uses with
// its own ids.
func (c LaunchConfig) IDMapShare(dir *os.File) (*os.File, error) {
	uid, gid, needed, err := c.ShareSwaps()
	if err != nil || !needed {
		return nil, err
	}
	ns, err := c.userNamespace(swapMappings(uid), swapMappings(gid))
	if err != nil {
		return nil, fmt.Errorf("sandbox: user namespace for an ID-mapped mount: %w", err)
	}
	defer ns.Close()
	attr := unix.MountAttr{
		Attr_set:  unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV,
		Userns_fd: uint64(ns.Fd()),
	}
	if c.ReadOnlyDirs {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY // the kernel refuses every write through it
	}
	return cloneTree(dir, "ID-mapped mount", &attr)
}

// cloneTree returns a detached copy of dir's mount tree rooted at dir
// (open_tree with OPEN_TREE_CLONE and AT_RECURSIVE) with attr set on it;
// what names the mount in errors. Closing the last descriptor of a
// detached tree unmounts it.
func cloneTree(dir *os.File, what string, attr *unix.MountAttr) (*os.File, error) {
	rc, err := dir.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("sandbox: %s of %s: %w", what, dir.Name(), err)
	}
	tree, oerr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		tree, oerr = unix.OpenTree(int(fd), "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH|unix.AT_RECURSIVE)
	}); err != nil {
		return nil, fmt.Errorf("sandbox: %s of %s: %w", what, dir.Name(), err)
	}
	if oerr != nil {
		return nil, fmt.Errorf("sandbox: %s of %s: open_tree: %w", what, dir.Name(), oerr)
	}
	mnt := os.NewFile(uintptr(tree), dir.Name())
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, attr); err != nil {
		mnt.Close()
		if errors.Is(err, unix.EINVAL) && attr.Attr_set&unix.MOUNT_ATTR_IDMAP != 0 {
			err = fmt.Errorf("%w (a file system here, or below, has no ID-mapped mounts)", err)
		}
		return nil, fmt.Errorf("sandbox: %s of %s: mount_setattr: %w", what, dir.Name(), err)
	}
	return mnt, nil
}

// CloneShare returns a detached copy of dir's mount tree rooted at dir
// (open_tree with OPEN_TREE_CLONE and AT_RECURSIVE; nosuid, nodev, and
// read-only with readOnly), for a plugin that cannot have an ID-mapped
// mount of it. A path walk through the copy cannot leave it: ".." at its
// root stays there. Landlock confines what a plugin opens below a
// directory, but not stat, readlink, chmod, chown or utimes, which a walk
// from a plain directory fd through ".." would reach anywhere on the host.
// It needs CAP_SYS_ADMIN (a root krun-core); the caller falls back to the
// plain directory without it.
func CloneShare(dir *os.File, readOnly bool) (*os.File, error) {
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if readOnly {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	return cloneTree(dir, "mount", &attr)
}

// maxID is the largest id a mapping can name: (uid_t)-1 is never an id.
const maxID = 1<<32 - 2

// swapMappings are the lines of a user namespace's id map (inside: the
// id on disk, outside: the id the mount presents) that swap s.Launcher and
// s.Plugin and map every other id to itself.
func swapMappings(s IDSwap) []syscall.SysProcIDMap {
	lo, hi := min(s.Launcher, s.Plugin), max(s.Launcher, s.Plugin)
	if lo == hi {
		return []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: maxID + 1}}
	}
	var m []syscall.SysProcIDMap
	same := func(from, to uint64) { // ids from..to-1 map to themselves
		if to > from {
			m = append(m, syscall.SysProcIDMap{ContainerID: int(from), HostID: int(from), Size: int(to - from)})
		}
	}
	same(0, uint64(lo))
	m = append(m, syscall.SysProcIDMap{ContainerID: int(lo), HostID: int(hi), Size: 1})
	same(uint64(lo)+1, uint64(hi))
	m = append(m, syscall.SysProcIDMap{ContainerID: int(hi), HostID: int(lo), Size: 1})
	same(uint64(hi)+1, maxID+1)
	return m
}

// userNSArg is argv[1] of a launcher's binary re-executed to hold a user
// namespace (with envUserNS set): it reads its stdin to the end and exits.
const (
	userNSArg = "hold-user-namespace"
	envUserNS = "KRUN_SANDBOX_USERNS"
)

// holdUserNamespace is the held process's whole life.
func holdUserNamespace() int {
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// userNamespace returns an fd of a new user namespace with the given id
// maps. A user namespace exists only with a process in it: the
// trampoline binary (or this one) is started in a new one, holds it while
// the launcher opens /proc/PID/ns/user, and exits when its stdin closes.
func (c LaunchConfig) userNamespace(uids, gids []syscall.SysProcIDMap) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	cmd := &exec.Cmd{Path: "/proc/self/exe", Args: []string{TrampolineName, userNSArg},
		Env: []string{envUserNS + "=1"}, Stdin: r}
	tramp, err := c.trampoline()
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("trampoline: %w", err)
	}
	if tramp != nil {
		defer tramp.Close()
		cmd.ExtraFiles = []*os.File{tramp}
		cmd.Path = "/proc/self/fd/3"
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER,
		UidMappings: uids, GidMappings: gids, GidMappingsEnableSetgroups: true,
		Pdeathsig: syscall.SIGKILL,
	}
	err = cmd.Start()
	r.Close()
	if err != nil {
		return nil, err
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", cmd.Process.Pid))
	w.Close()
	if werr := cmd.Wait(); werr != nil && err == nil {
		// The namespace is the held process's, whatever its end; but a
		// binary that did not hold it may not be this package's.
		ns.Close()
		return nil, fmt.Errorf("holder process: %w", werr)
	}
	if err != nil {
		return nil, err
	}
	return ns, nil
}
