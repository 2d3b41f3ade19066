package main

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
)

const newRoot = "/newroot"

// mountEarly mounts /dev, /proc and /sys of the initramfs: module loading,
// the stdio port lookup and the root's mount need them.
func mountEarly() error {
	for _, m := range []struct{ fstype, target, data string }{
		{"devtmpfs", "/dev", "mode=0755"},
		{"proc", "/proc", ""},
		{"sysfs", "/sys", ""},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", m.target, err)
		}
		err := unix.Mount(m.fstype, m.target, m.fstype, unix.MS_NOSUID, m.data)
		if err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	return nil
}

// mountVirtiofs mounts the virtio-fs share tag on target, retrying until
// timeout: the device may be probed a little after its driver is loaded.
func mountVirtiofs(tag, target string, readOnly bool, timeout time.Duration) error {
	flags := uintptr(unix.MS_NODEV)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Mount(tag, target, "virtiofs", flags, "")
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mount virtio-fs tag %q on %s: %w (is a virtio-fs device with that tag attached?)", tag, target, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// errMountPoint marks a mount point that cannot be opened (or made): no
// point in retrying.
var errMountPoint = errors.New("open mount point in the root")

// rootFS is the new root while it is being prepared.
type rootFS struct {
	fd int // O_PATH descriptor of newRoot
}

// openBeneath opens rel (relative to the root) as an O_PATH directory
// without following any symbolic link and without leaving the root: the
// root's content is the user's, and a link such as /proc -> /newroot/..
// must not move a mount out of it. With create, missing directories are
// made (0755).
func (r *rootFS) openBeneath(rel string, create bool) (int, error) {
	rel = strings.Trim(path.Clean("/"+rel), "/")
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	if rel == "" {
		return unix.Openat2(r.fd, ".", how)
	}
	fd, err := unix.Openat2(r.fd, rel, how)
	if err == nil || !create || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	// Walk and create component by component.
	cur, err := unix.Openat2(r.fd, ".", how)
	if err != nil {
		return -1, err
	}
	for _, comp := range strings.Split(rel, "/") {
		if err := unix.Mkdirat(cur, comp, 0o755); err != nil && err != unix.EEXIST {
			unix.Close(cur)
			return -1, fmt.Errorf("mkdir %s: %w", comp, err)
		}
		next, err := unix.Openat2(cur, comp, how)
		unix.Close(cur)
		if err != nil {
			return -1, err
		}
		cur = next
	}
	return cur, nil
}

// mount mounts fstype on rel inside the root.
func (r *rootFS) mount(rel, fstype, source string, flags uintptr, data string, create bool) error {
	fd, err := r.openBeneath(rel, create)
	if err != nil {
		return fmt.Errorf("mount %s on %s: %w: %w", fstype, rel, errMountPoint, err)
	}
	defer unix.Close(fd)
	if err := unix.Mount(source, "/proc/self/fd/"+strconv.Itoa(fd), fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, rel, err)
	}
	return nil
}

// setupRoot mounts the root share and everything inside it, then makes it
// the root (switch_root style: the initramfs cannot be pivot_root'ed, so
// the new root is moved over / and chroot'ed into).
func (in *initProc) setupRoot() error {
	cfg := in.cfg
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", newRoot, err)
	}
	if err := mountVirtiofs(cfg.Root.Tag, newRoot, cfg.Root.ReadOnly, 10*time.Second); err != nil {
		return fmt.Errorf("root file system: %w", err)
	}
	if in.ctr != nil {
		// Container mode: the mounts are the config's, and PID 1 stays
		// where it is (the launcher enters the root): it keeps its own
		// /proc for /proc/self/exe whatever the config mounts.
		if err := container.Apply(newRoot, in.ctr, container.ApplyOptions{WorkDir: "/krun", Logf: in.log.Printf}); err != nil {
			return fmt.Errorf("container: %w", err)
		}
		in.rootDir = newRoot
		return nil
	}
	fd, err := unix.Open(newRoot, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", newRoot, err)
	}
	r := &rootFS{fd: fd}
	defer unix.Close(fd)
	const nosuidNodev = unix.MS_NOSUID | unix.MS_NODEV
	type mnt struct {
		rel, fstype  string
		flags        uintptr
		data         string
		required     bool
		createInRoot bool // make a missing mount point
	}
	create := !cfg.Root.ReadOnly
	mounts := []mnt{
		{"proc", "proc", nosuidNodev | unix.MS_NOEXEC, "", true, create},
		{"sys", "sysfs", nosuidNodev | unix.MS_NOEXEC, "", true, create},
		{"dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", true, create},
		{"dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", cfg.TTY, true},
		{"dev/shm", "tmpfs", nosuidNodev, "mode=1777", false, true},
		{"tmp", "tmpfs", nosuidNodev, "mode=1777", false, create},
		{"run", "tmpfs", nosuidNodev, "mode=0755", false, create},
	}
	for _, m := range mounts {
		err := r.mount(m.rel, m.fstype, m.fstype, m.flags, m.data, m.createInRoot)
		if err == nil {
			continue
		}
		if m.required {
			return err
		}
		in.log.Printf("skipped: %v", err)
	}
	for _, m := range cfg.Mounts {
		flags := uintptr(unix.MS_NODEV)
		if m.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		var err error
		deadline := time.Now().Add(5 * time.Second)
		for {
			// A read-only root gets no new directory, but krun-init's
			// own tmpfs mounts (/tmp, /run) take one.
			err = r.mount(m.Target, "virtiofs", m.Source, flags, "", create || initconfig.GuestTmpfs(m.Target))
			if err == nil || errors.Is(err, errMountPoint) || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			return fmt.Errorf("share %q: %w", m.Source, err)
		}
	}
	// The initramfs's own API mounts are not needed any more (open
	// files on them, the stdio port and /dev/kmsg, stay valid).
	for _, p := range []string{"/dev", "/sys", "/proc"} {
		_ = unix.Unmount(p, unix.MNT_DETACH)
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	devLinks(in.log)
	return nil
}

// devLinks makes the links udev makes and devtmpfs lacks, as runc's
// default devices have them: /dev/fd, /dev/stdin, /dev/stdout and
// /dev/stderr (without them, echo >/dev/stdout made a file in /dev and
// the output never reached the host), and /dev/ptmx's companion is the
// devpts one already. A name that exists is left alone.
func devLinks(log *logger) {
	for _, l := range [][2]string{{"/dev/fd", "/proc/self/fd"}, {"/dev/stdin", "/proc/self/fd/0"},
		{"/dev/stdout", "/proc/self/fd/1"}, {"/dev/stderr", "/proc/self/fd/2"}} {
		if err := os.Symlink(l[1], l[0]); err != nil && !errors.Is(err, os.ErrExist) {
			log.Printf("link %s: %v", l[0], err)
		}
	}
}
