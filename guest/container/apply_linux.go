package container

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ApplyOptions are where Apply keeps its own things and what it logs.
type ApplyOptions struct {
	// WorkDir is a directory outside the container's root (krun-init:
	// /krun in the initramfs) for each virtio-fs tag mounted once
	// (shares/), the copied files (files/) and tmpcopyup's staging.
	WorkDir string
	// Logf reports what was skipped.
	Logf func(format string, a ...any)
}

// rootDir resolves paths inside the container's root, as runc does:
// symbolic links are followed but cannot leave the root
// (RESOLVE_IN_ROOT).
type rootDir struct {
	fd   int    // O_PATH descriptor of the root
	path string // the root's path as krun-init sees it
	work string
	logf func(string, ...any)
	// openat2 is unix.Openat2 (nil); tests replace it.
	openat2 func(dirfd int, path string, how *unix.OpenHow) (int, error)
}

func procFD(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// maxResolveRetries bounds the retries of EAGAIN. RESOLVE_IN_ROOT answers
// EAGAIN when a rename or a mount anywhere on the machine raced a ".." of
// the walk; the image chooses the walk (a chain of symbolic links of
// thousands of ".." each), and a rename storm elsewhere (another
// container's file system plugin) then failed nearly every try: retried
// without bound, the walk spun on a CPU for as long as the storm lasted
// (found in review, helper-149). An ordinary walk meets EAGAIN rarely,
// and once.
const maxResolveRetries = 128

// Openat2 is unix.Openat2 retried on EINTR, and on EAGAIN up to
// maxResolveRetries times, after which the error says why and wraps
// EAGAIN.
func Openat2(dirfd int, p string, how *unix.OpenHow) (int, error) {
	return openat2Retry(unix.Openat2, dirfd, p, how)
}

func openat2Retry(openat2 func(int, string, *unix.OpenHow) (int, error), dirfd int, p string, how *unix.OpenHow) (int, error) {
	for again := 0; ; {
		fd, err := openat2(dirfd, p, how)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN && again < maxResolveRetries:
			again++
			continue
		case err == unix.EAGAIN:
			return -1, fmt.Errorf("the walk to %q was interrupted by renames or mounts elsewhere %d times in a row: %w", p, again+1, err)
		}
		return fd, err
	}
}

func (r *rootDir) open(p string, flags int) (int, error) {
	how := &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	rel := strings.TrimLeft(path.Clean("/"+p), "/")
	if rel == "" {
		rel = "."
	}
	openat2 := r.openat2
	if openat2 == nil {
		openat2 = unix.Openat2
	}
	return openat2Retry(openat2, r.fd, rel, how)
}

// mountPoint opens p inside the root as an O_PATH descriptor, making it
// (and its parents, as directories) when missing: a directory, or an
// empty file when file is set.
func (r *rootDir) mountPoint(p string, file bool) (int, error) {
	if fd, err := r.open(p, unix.O_PATH); err == nil {
		return fd, nil
	} else if !errors.Is(err, unix.ENOENT) {
		return -1, err
	}
	comps := strings.Split(strings.Trim(path.Clean("/"+p), "/"), "/")
	for i := range comps {
		cur := "/" + strings.Join(comps[:i+1], "/")
		fd, err := r.open(cur, unix.O_PATH)
		if err == nil {
			unix.Close(fd)
			continue
		}
		if !errors.Is(err, unix.ENOENT) {
			return -1, err
		}
		parent, err := r.open("/"+strings.Join(comps[:i], "/"), unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return -1, err
		}
		last := i == len(comps)-1
		if last && file {
			var nfd int
			nfd, err = unix.Openat(parent, comps[i], unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
			if err == nil {
				unix.Close(nfd)
			}
		} else {
			err = unix.Mkdirat(parent, comps[i], 0o755)
		}
		unix.Close(parent)
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("create %s: %w", cur, err)
		}
	}
	return r.open(p, unix.O_PATH)
}

// Apply builds the container environment inside the root at rootPath
// (an already mounted directory): the mounts in order, the devices, the
// masked and read-only paths, the sysctls and the root's propagation. A
// virtio-fs share is mounted once under /krun/shares and bound where it
// is used.
func Apply(rootPath string, s *Setup, ao ApplyOptions) error {
	logf := ao.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	fd, err := unix.Open(rootPath, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open root %s: %w", rootPath, err)
	}
	defer unix.Close(fd)
	r := &rootDir{fd: fd, path: rootPath, work: ao.WorkDir, logf: logf}
	if s.RootPropagation != "" {
		if err := unix.Mount("", rootPath, "", propagationOptions[s.RootPropagation], ""); err != nil {
			return fmt.Errorf("root propagation %s: %w", s.RootPropagation, err)
		}
	}
	shares := map[string]string{}
	for i, m := range s.Mounts {
		if err := r.mount(i, &m, s, shares); err != nil {
			return fmt.Errorf("mount %s (%s): %w", m.Destination, m.Type, err)
		}
	}
	if s.DefaultDevices {
		r.defaultDevices()
	}
	for _, d := range s.Devices {
		if err := r.device(&d); err != nil {
			return fmt.Errorf("device %s: %w", d.Path, err)
		}
	}
	for _, p := range s.MaskedPaths {
		if err := r.mask(p); err != nil {
			return fmt.Errorf("masked path %s: %w", p, err)
		}
	}
	for _, p := range s.ReadonlyPaths {
		if err := r.readOnly(p); err != nil {
			return fmt.Errorf("read-only path %s: %w", p, err)
		}
	}
	for _, k := range sortedKeys(s.Sysctl) {
		// The VM is the container: its /proc/sys is the one to set.
		if err := os.WriteFile(SysctlPath(k), []byte(s.Sysctl[k]), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, s.Sysctl[k], err)
		}
	}
	return nil
}

func (r *rootDir) mount(i int, m *Mount, s *Setup, shares map[string]string) error {
	o, err := ParseOptions(m.Options)
	if err != nil {
		return err
	}
	switch m.Type {
	case TypeVirtiofs:
		src, ok := shares[m.Source]
		if !ok {
			src = filepath.Join(r.work, "shares", m.Source)
			if err := mountShare(m.Source, src); err != nil {
				return err
			}
			shares[m.Source] = src
		}
		return r.bindFrom(src, m.Destination, false, o)
	case TypeFile:
		n, _ := fileIndex(m.Source, len(s.Files))
		f := s.Files[n]
		src := filepath.Join(r.work, "files", strconv.Itoa(n))
		if err := os.MkdirAll(filepath.Dir(src), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(src, f.Content, 0o600); err != nil {
			return err
		}
		if err := os.Chown(src, int(f.UID), int(f.GID)); err != nil {
			return err
		}
		if err := os.Chmod(src, os.FileMode(f.Mode)); err != nil {
			return err
		}
		return r.bindFrom(src, m.Destination, true, o)
	case TypeBind:
		sfd, err := r.open(m.Source, unix.O_PATH)
		if err != nil {
			return fmt.Errorf("source %s: %w", m.Source, err)
		}
		defer unix.Close(sfd)
		var st unix.Stat_t
		if err := unix.Fstat(sfd, &st); err != nil {
			return err
		}
		return r.bindFrom(procFD(sfd), m.Destination, st.Mode&unix.S_IFMT != unix.S_IFDIR, o)
	}
	// A file system the guest makes itself.
	fstype := m.Type
	if fstype == TypeCgroup {
		fstype = TypeCgroup2 // the guest offers cgroup v2 only
	}
	dst, err := r.mountPoint(m.Destination, false)
	if err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	defer unix.Close(dst)
	target := procFD(dst)
	if o.TmpCopyUp && fstype == TypeTmpfs {
		return r.tmpCopyUp(target, m.Destination, o)
	}
	source := m.Source
	if source == "" {
		source = fstype
	}
	if err := unix.Mount(source, target, fstype, o.Flags, o.Data); err != nil {
		return err
	}
	return r.propagate(m.Destination, o)
}

// bindFrom binds src (a path krun-init sees) on dest inside the root and
// applies the options' flags with a remount.
func (r *rootDir) bindFrom(src, dest string, file bool, o *Options) error {
	dst, err := r.mountPoint(dest, file)
	if err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	defer unix.Close(dst)
	target := procFD(dst)
	flags := uintptr(unix.MS_BIND)
	if o.Recursive {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(src, target, "", flags, ""); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	if o.Flags != 0 {
		// The flags of a bind mount are set by remounting it; the
		// target descriptor names the old mount point, so go by the
		// path through the root.
		if err := remountAt(r, dest, o.Flags); err != nil {
			return err
		}
	}
	return r.propagate(dest, o)
}

// remountAt remounts the mount on dest with flags (a bind remount).
func remountAt(r *rootDir, dest string, flags uintptr) error {
	fd, err := r.open(dest, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Mount("", procFD(fd), "", unix.MS_REMOUNT|unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("remount with flags %#x: %w", flags, err)
	}
	return nil
}

// propagate applies the options' propagation to the mount now on dest
// (opened anew: a descriptor from before the mount names the mount
// point below it).
func (r *rootDir) propagate(dest string, o *Options) error {
	if o.Propagation == 0 {
		return nil
	}
	fd, err := r.open(dest, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Mount("", procFD(fd), "", o.Propagation, ""); err != nil {
		return fmt.Errorf("propagation: %w", err)
	}
	return nil
}

// mountShare mounts virtio-fs tag on dir, retrying while the device is
// probed.
func mountShare(tag, dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.Mount(tag, dir, "virtiofs", 0, "")
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mount virtio-fs tag %q: %w", tag, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tmpCopyUp mounts a tmpfs holding a copy of what target held.
func (r *rootDir) tmpCopyUp(target, dest string, o *Options) error {
	stagingDir := filepath.Join(r.work, "staging")
	if err := os.MkdirAll(stagingDir, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", stagingDir, "tmpfs", o.Flags&^unix.MS_RDONLY, o.Data); err != nil {
		return err
	}
	if err := copyTree(target+"/.", stagingDir); err != nil {
		unix.Unmount(stagingDir, unix.MNT_DETACH)
		return fmt.Errorf("tmpcopyup: %w", err)
	}
	if err := unix.Mount(stagingDir, target, "", unix.MS_MOVE, ""); err != nil {
		unix.Unmount(stagingDir, unix.MNT_DETACH)
		return err
	}
	if o.Flags&unix.MS_RDONLY != 0 {
		fd, err := r.open(dest, unix.O_PATH)
		if err != nil {
			return err
		}
		err = unix.Mount("", procFD(fd), "", unix.MS_REMOUNT|o.Flags, o.Data)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return r.propagate(dest, o)
}

// copyTree copies directories, regular files and symbolic links with
// their modes and owners.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, _ := info.Sys().(*unix.Stat_t)
		switch {
		case d.IsDir():
			if rel != "." {
				if err := os.Mkdir(to, info.Mode().Perm()); err != nil && !errors.Is(err, os.ErrExist) {
					return err
				}
			}
			if err := os.Chmod(to, info.Mode()&(fs.ModePerm|fs.ModeSticky|fs.ModeSetuid|fs.ModeSetgid)); err != nil {
				return err
			}
		case info.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(t, to); err != nil {
				return err
			}
		case info.Mode().IsRegular():
			if err := copyFile(p, to, info.Mode().Perm()); err != nil {
				return err
			}
		default:
			return nil // sockets, devices, fifos are not copied
		}
		if st != nil {
			return os.Lchown(to, int(st.Uid), int(st.Gid))
		}
		return nil
	})
}

func copyFile(src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

type defaultDevice struct {
	name         string
	major, minor uint32
}

var defaultDevices = []defaultDevice{
	{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
}

var defaultLinks = [][2]string{
	{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"},
	{"stderr", "/proc/self/fd/2"}, {"ptmx", "pts/ptmx"},
}

// defaultDevices makes runc's default devices and links in /dev where
// they are missing.
func (r *rootDir) defaultDevices() {
	logf := r.logf
	dev, err := r.open("/dev", unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		logf("default devices: /dev: %v", err)
		return
	}
	defer unix.Close(dev)
	for _, d := range defaultDevices {
		err := unix.Mknodat(dev, d.name, unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor)))
		if err == nil {
			err = unix.Fchmodat(dev, d.name, 0o666, 0)
		}
		if err != nil && !errors.Is(err, unix.EEXIST) {
			logf("default device /dev/%s: %v", d.name, err)
		}
	}
	for _, l := range defaultLinks {
		if err := unix.Symlinkat(l[1], dev, l[0]); err != nil && !errors.Is(err, unix.EEXIST) {
			logf("default link /dev/%s: %v", l[0], err)
		}
	}
}

// device makes one device node (replacing what is there).
func (r *rootDir) device(d *Device) error {
	dir, name := path.Split(path.Clean(d.Path))
	pfd, err := r.mountPoint(dir, false)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	mode := d.Mode
	if mode == 0 {
		mode = 0o666
	}
	var typ uint32
	switch d.Type {
	case "c", "u":
		typ = unix.S_IFCHR
	case "b":
		typ = unix.S_IFBLK
	case "p":
		typ = unix.S_IFIFO
	}
	_ = unix.Unlinkat(pfd, name, 0)
	if err := unix.Mknodat(pfd, name, typ|mode, int(unix.Mkdev(uint32(d.Major), uint32(d.Minor)))); err != nil {
		return err
	}
	if err := unix.Fchmodat(pfd, name, mode, 0); err != nil {
		return err
	}
	return unix.Fchownat(pfd, name, int(d.UID), int(d.GID), unix.AT_SYMLINK_NOFOLLOW)
}

// mask hides p: /dev/null over a file, an empty read-only tmpfs over a
// directory. A missing path is left alone.
func (r *rootDir) mask(p string) error {
	fd, err := r.open(p, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return unix.Mount("tmpfs", procFD(fd), "tmpfs", unix.MS_RDONLY, "size=0k")
	}
	return unix.Mount("/dev/null", procFD(fd), "", unix.MS_BIND, "")
}

// readOnly remounts p read-only (keeping nosuid, nodev and noexec). A
// missing path is left alone.
func (r *rootDir) readOnly(p string) error {
	fd, err := r.open(p, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	target := procFD(fd)
	err = unix.Mount(target, target, "", unix.MS_BIND|unix.MS_REC, "")
	unix.Close(fd)
	if err != nil {
		return err
	}
	// The mount's nosuid, nodev and noexec are read back and kept: a
	// bind remount sets exactly the flags it is given, so one made
	// without them clears them. A walk or statfs that fails stops here
	// (an EAGAIN storm beyond Openat2's retries made the path suid, dev
	// and exec; found in review).
	fd2, err := r.open(p, unix.O_PATH)
	if err != nil {
		return err
	}
	var sfs unix.Statfs_t
	err = unix.Fstatfs(fd2, &sfs)
	unix.Close(fd2)
	if err != nil {
		return err
	}
	flags := uintptr(unix.MS_RDONLY) | uintptr(sfs.Flags)&(unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC)
	return remountAt(r, p, flags)
}

// MakeMountPoints creates, in the root at rootPath, the mount points of
// s's mounts that are missing (directories, or empty files for file
// mounts), as runc does before it mounts. The OCI runtime calls it on the
// host, where it runs with the rights to do so (the guest's file server
// may not have them); the guest does the same for what is still missing.
// It returns what it could not make.
func MakeMountPoints(rootPath string, s *Setup) []error {
	fd, err := unix.Open(rootPath, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return []error{err}
	}
	defer unix.Close(fd)
	r := &rootDir{fd: fd, path: rootPath}
	var errs []error
	for _, m := range s.Mounts {
		file := m.Type == TypeFile
		if m.Type == TypeBind {
			if sfd, err := r.open(m.Source, unix.O_PATH); err == nil {
				var st unix.Stat_t
				if unix.Fstat(sfd, &st) == nil {
					file = st.Mode&unix.S_IFMT != unix.S_IFDIR
				}
				unix.Close(sfd)
			}
		}
		mfd, err := r.mountPoint(m.Destination, file)
		if err != nil {
			errs = append(errs, fmt.Errorf("mount point %s: %w", m.Destination, err))
			continue
		}
		unix.Close(mfd)
	}
	return errs
}
