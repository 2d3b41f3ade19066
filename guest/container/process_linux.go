package container

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// The launcher (krun-init's process between fork and exec) calls these in
// order: EnterRoot, ApplyPrivileged, its own limits and identity change,
// ApplyUnprivileged, exec, all on one locked OS thread (capabilities,
// the bounding set and no_new_privs belong to a thread).

// EnterRoot makes root the process's root directory and cwd (inside it)
// its working directory, creating cwd when missing (as runc does).
func EnterRoot(root, cwd string) error {
	if err := unix.Chroot(root); err != nil {
		return fmt.Errorf("chroot %s: %w", root, err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := os.MkdirAll(cwd, 0o755); err != nil {
		return fmt.Errorf("working directory %s: %w", cwd, err)
	}
	if err := unix.Chdir(cwd); err != nil {
		return fmt.Errorf("working directory %s: %w", cwd, err)
	}
	return nil
}

// lastCap is the highest capability the running kernel knows.
func lastCap() int {
	n := 0
	for n < 63 {
		if _, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(n+1), 0, 0, 0); err != nil {
			break
		}
		n++
	}
	return n
}

// ApplyPrivileged sets the OOM score adjustment and, when capabilities
// are given, keeps them across the identity change and drops the
// bounding set to what is listed.
func (e *Extras) ApplyPrivileged() error {
	if e.OOMScoreAdj != nil {
		if err := os.WriteFile("/proc/self/oom_score_adj", []byte(strconv.Itoa(*e.OOMScoreAdj)), 0); err != nil {
			return fmt.Errorf("oom_score_adj %d: %w", *e.OOMScoreAdj, err)
		}
	}
	c := e.Capabilities
	if c == nil {
		return nil
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("keep capabilities: %w", err)
	}
	keep := capMask(c.Bounding)
	for n := 0; n <= lastCap(); n++ {
		if keep&(1<<uint(n)) != 0 {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(n), 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("drop capability %d from the bounding set: %w", n, err)
		}
	}
	return nil
}

// ApplyUnprivileged sets the effective, permitted, inheritable and
// ambient capabilities, no_new_privs and the umask.
func (e *Extras) ApplyUnprivileged() error {
	if c := e.Capabilities; c != nil {
		// Capabilities the kernel does not know are left out, as runc
		// does on an older kernel.
		known := uint64(1)<<uint(lastCap()+1) - 1
		eff, perm, inh := capMask(c.Effective)&known, capMask(c.Permitted)&known, capMask(c.Inheritable)&known
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		data := [2]unix.CapUserData{
			{Effective: uint32(eff), Permitted: uint32(perm), Inheritable: uint32(inh)},
			{Effective: uint32(eff >> 32), Permitted: uint32(perm >> 32), Inheritable: uint32(inh >> 32)},
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return fmt.Errorf("set capabilities: %w", err)
		}
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
			return err
		}
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("clear ambient capabilities: %w", err)
		}
		amb := capMask(c.Ambient) & known
		for n := 0; n < 64; n++ {
			if amb&(1<<uint(n)) == 0 {
				continue
			}
			if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(n), 0, 0); err != nil {
				return fmt.Errorf("raise ambient capability %d: %w", n, err)
			}
		}
	}
	if e.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	if e.Umask != nil {
		unix.Umask(int(*e.Umask))
	}
	return nil
}
