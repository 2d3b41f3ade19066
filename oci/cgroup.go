package oci

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// defaultCgroupRoot is where cgroup v2 is mounted.
const defaultCgroupRoot = "/sys/fs/cgroup"

// cgroupDir turns linux.cgroupsPath into a cgroup2 directory. With
// --systemd-cgroup the path is "slice:prefix:name" and names a scope in a
// slice, as systemd lays them out (krun-oci creates the directories
// itself; it does not ask systemd over D-Bus). Otherwise an absolute path
// is below the cgroup root and a relative one below the runtime's own
// cgroup.
func cgroupDir(p, id string, opt translateOptions) (string, error) {
	root := opt.CgroupRoot
	if root == "" {
		root = defaultCgroupRoot
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", errors.New("contains NUL")
	}
	var rel string
	if opt.SystemdCgroup {
		parts := strings.Split(p, ":")
		if len(parts) != 3 {
			return "", fmt.Errorf("%q is not slice:prefix:name (--systemd-cgroup)", p)
		}
		slice, prefix, name := parts[0], parts[1], parts[2]
		if slice == "" {
			slice = "system.slice"
		}
		sdir, err := expandSlice(slice)
		if err != nil {
			return "", err
		}
		if name == "" {
			name = id
		}
		unit := name
		if !strings.HasSuffix(name, ".slice") {
			if prefix != "" {
				unit = prefix + "-" + name
			}
			unit += ".scope"
		}
		if strings.Contains(unit, "/") || unit == ".." {
			return "", fmt.Errorf("%q names a unit with a slash", p)
		}
		rel = path.Join(sdir, unit)
	} else if strings.HasPrefix(p, "/") {
		rel = p
	} else {
		own := opt.OwnCgroup
		if own == "" {
			var err error
			if own, err = ownCgroup(); err != nil {
				return "", err
			}
		}
		rel = path.Join(own, p)
	}
	rel = path.Clean("/" + rel)
	if rel == "/" {
		return "", fmt.Errorf("%q is the root cgroup", p)
	}
	return filepath.Join(root, rel), nil
}

// expandSlice turns "a-b-c.slice" into "a.slice/a-b.slice/a-b-c.slice".
func expandSlice(slice string) (string, error) {
	name, ok := strings.CutSuffix(slice, ".slice")
	if !ok || name == "" || strings.Contains(name, "/") {
		return "", fmt.Errorf("%q is not a systemd slice", slice)
	}
	if name == "-" {
		return "", nil // the root slice
	}
	var out []string
	prefix := ""
	for _, comp := range strings.Split(name, "-") {
		if comp == "" {
			return "", fmt.Errorf("%q is not a valid slice name", slice)
		}
		prefix += comp
		out = append(out, prefix+".slice")
		prefix += "-"
	}
	return path.Join(out...), nil
}

// ownCgroup reads the runtime's own cgroup v2 path.
func ownCgroup() (string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if p, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			return p, nil
		}
	}
	return "", errors.New("no cgroup v2 entry in /proc/self/cgroup")
}

// isCgroup2 reports whether dir is on a cgroup2 file system.
func isCgroup2(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// joinCgroup creates the cgroup (enabling the cpu, memory and pids
// controllers along the way, as far as the parents offer them), writes
// cpu.max when given and moves the calling process into it.
func joinCgroup(c CgroupPlan, root string) error {
	if root == "" {
		root = defaultCgroupRoot
	}
	if !isCgroup2(root) {
		return fmt.Errorf("cgroup %s: %s is not a cgroup v2 mount (cgroup v1 is not supported)", c.Path, root)
	}
	rel, err := filepath.Rel(root, c.Path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("cgroup %s is not below %s", c.Path, root)
	}
	cur := root
	for _, comp := range strings.Split(rel, "/") {
		enableControllers(cur)
		cur = filepath.Join(cur, comp)
		if err := os.Mkdir(cur, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup %s: %w", cur, err)
		}
	}
	if c.CPUMax != "" {
		if err := os.WriteFile(filepath.Join(c.Path, "cpu.max"), []byte(c.CPUMax), 0); err != nil {
			return fmt.Errorf("cgroup %s: cpu.max %q: %w", c.Path, c.CPUMax, unwrapPath(err))
		}
	}
	if err := os.WriteFile(filepath.Join(c.Path, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		return fmt.Errorf("join cgroup %s: %w", c.Path, unwrapPath(err))
	}
	return nil
}

// systemdCgroupHint adds to err, a cgroup that could not be made or
// joined for want of rights, why, with --systemd-cgroup: krun-oci lays the
// slice and scope out itself, where runc asks systemd (the user's own
// instance, for a rootless caller) over D-Bus. Rootless podman's default
// on a systemd host (cgroupsPath user.slice:libpod:ID) failed with a bare
// "permission denied" (from review, helper-140/145).
func systemdCgroupHint(err error, systemd bool) error {
	if !systemd || !errors.Is(err, os.ErrPermission) && !errors.Is(err, unix.EROFS) {
		return err
	}
	return fmt.Errorf("%w (--systemd-cgroup: krun-oci makes the slice and scope itself and does not ask systemd over D-Bus; "+
		"a caller without rights on the cgroup tree, as rootless podman, needs cgroup_manager = \"cgroupfs\" or --cgroups=disabled)", err)
}

// enableControllers enables cpu, memory and pids for dir's children, each
// as far as dir offers it (failures are not errors: a controller that
// cannot be enabled only means its files are missing below).
func enableControllers(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return
	}
	avail := strings.Fields(string(b))
	for _, want := range []string{"cpu", "memory", "pids"} {
		for _, a := range avail {
			if a == want {
				_ = os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+"+want), 0)
			}
		}
	}
}

// cgroupInUse refuses a cgroup that exists and is not empty: one that
// holds processes or has child cgroups belongs to someone else (or to
// another container), and delete would end whatever is in it. As runc, a
// container's cgroup is new or empty.
func cgroupInUse(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil // made at create
	}
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", dir, unwrapPath(err))
	}
	if len(strings.TrimSpace(string(b))) != 0 {
		return fmt.Errorf("cgroup %s already holds processes; a container needs a cgroup of its own", dir)
	}
	if hasChildCgroups(dir) {
		return fmt.Errorf("cgroup %s has child cgroups; a container needs a cgroup of its own", dir)
	}
	return nil
}

// hasChildCgroups reports whether the cgroup dir has child cgroups (or
// cannot be listed).
func hasChildCgroups(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return true
	}
	for _, e := range ents {
		if e.IsDir() {
			return true
		}
	}
	return false
}

// removeCgroup ends every process left in the cgroup (plugins and passt
// whose parent died) and removes the directory. A cgroup with child
// cgroups is never ended as a whole (cgroup.kill ends the subtree, and
// krun-oci makes none): only the processes in it are.
func removeCgroup(dir string, kill bool) error {
	if dir == "" {
		return nil
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || !kill || time.Now().After(deadline) {
			if errors.Is(err, unix.EBUSY) && !kill {
				return fmt.Errorf("remove cgroup %s: in use again (another container's?), left in place: %w", dir, err)
			}
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		// cgroup.kill (Linux 5.14) ends the whole subtree at once;
		// otherwise each process listed is killed.
		if hasChildCgroups(dir) || os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0) != nil {
			killProcs(filepath.Join(dir, "cgroup.procs"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func killProcs(procs string) {
	b, err := os.ReadFile(procs)
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// ownerOf returns a file's owner.
func ownerOf(st os.FileInfo) (uint32, uint32) {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Uid, s.Gid
	}
	return 0, 0
}
