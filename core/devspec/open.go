package devspec

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/sandbox"
)

// OpenOptions tunes Spec.Open.
type OpenOptions struct {
	// PasstPath is the passt executable for --net passt; "" looks up
	// "passt" in $PATH.
	PasstPath string
	// HelperStderr receives helper processes' (passt's) stderr; nil
	// discards it.
	HelperStderr io.Writer
	// Sandbox is the sandbox the device's plugin will be launched in; nil
	// when it runs unsandboxed (with krun-core's own ids). A shared
	// directory is then handed over as an ID-mapped mount where the
	// plugin's ids are not krun-core's (see FSSpec.Open).
	Sandbox *sandbox.LaunchConfig
	// Log receives warnings (a share that could not be ID-mapped); nil
	// discards them.
	Log hclog.Logger
}

// NamedFile is a file handed to a plugin under a name.
type NamedFile struct {
	Name string
	File *os.File
}

// Opened is what a plugin is configured with: its kind, its options and the
// files it inherits (fd 4, 5, ... in Files order).
type Opened struct {
	Kind    string
	Options map[string]string
	Files   []NamedFile
	// OpenFiles is the RLIMIT_NOFILE the sandbox is to give the plugin
	// (FSSpec.OpenFiles); 0 means its kind's default.
	OpenFiles uint64

	// locked holds a duplicate of every locked image fd: the locks belong
	// to the open file, so the host keeps them for as long as the device
	// exists, across CloseFiles and a plugin's death or restart.
	locked []*os.File
	// bound is how the RLIMIT_FSIZE of a disk's plugin is worked out
	// (FileBytes); nil for other devices.
	bound *fileBound
	// kept holds a duplicate of each share's ID-mapped mount for as long
	// as the device exists: a detached mount lives while a descriptor of
	// it does, and a plugin launched again needs the same mount (making
	// one takes privileges krun-core drops after set-up).
	kept    []*os.File
	helpers []*helper
	// exited is closed when a helper process exits (nil without one).
	exited     chan struct{}
	exitedOnce sync.Once
}

// helper is a process started for the plugin (passt), reaped by a
// goroutine of its own.
type helper struct {
	cmd     *exec.Cmd
	done    chan struct{} // closed once reaped
	started time.Time
	lived   time.Duration // set before done is closed
	err     error         // cmd.Wait's, set before done is closed
}

// HelperStartWindow is how soon after its start a helper that exits with a
// failure is taken to have refused its arguments or its environment
// (HelperStartFailure): passt's getopt and its set-up fail within
// milliseconds.
const HelperStartWindow = 2 * time.Second

// startHelper starts cmd and reaps it in the background; HelperExited
// reports its exit.
func (o *Opened) startHelper(cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	h := &helper{cmd: cmd, done: make(chan struct{}), started: time.Now()}
	if o.exited == nil {
		o.exited = make(chan struct{})
	}
	o.helpers = append(o.helpers, h)
	go func() {
		h.err = cmd.Wait()
		h.lived = time.Since(h.started)
		close(h.done)
		o.exitedOnce.Do(func() { close(o.exited) })
	}()
	return nil
}

// HelperExited is closed when a helper process (passt) exits, for whatever
// reason, Close included; nil when the device has none.
func (o *Opened) HelperExited() <-chan struct{} { return o.exited }

// HelperStartFailure says why a helper failed at its start: it exited with
// a failure within HelperStartWindow of starting, as passt does when it
// refuses an argument (a passt-arg it does not know) or cannot set up (a
// forwarded port it cannot bind). Starting it again with the same
// arguments fails alike, so the caller does not restart it. nil if every
// helper that exited lived longer or exited with status 0, or none has
// exited.
func (o *Opened) HelperStartFailure() error {
	for _, h := range o.helpers {
		select {
		case <-h.done:
		default:
			continue
		}
		if h.err != nil && h.lived < HelperStartWindow {
			return fmt.Errorf("%s failed at its start (%v after %v); its lines above say why",
				filepath.Base(h.cmd.Path), h.err, h.lived.Round(time.Millisecond))
		}
	}
	return nil
}

// CloseFiles closes the host's copies of the files; call it once the plugin
// process has inherited them. Helper processes keep running, and the image
// locks stay held until Close.
func (o *Opened) CloseFiles() {
	for _, f := range o.Files {
		if f.File != nil {
			_ = f.File.Close()
		}
	}
}

// SyncFiles makes what was written to the device's image files durable
// (an fsync of each image, data file and backing file it locked), as a
// flush through its plugin does: for a host that ends the device while no
// plugin runs (krun-core serve, signalled during a restart's back-off).
func (o *Opened) SyncFiles() error {
	for _, f := range o.locked {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", f.Name(), err)
		}
	}
	return nil
}

// Close closes the files, releases the image locks and stops helper
// processes (SIGTERM, then SIGKILL after a second).
func (o *Opened) Close() error {
	o.CloseFiles()
	for _, f := range append(o.locked, o.kept...) {
		_ = f.Close()
	}
	o.locked, o.kept, o.bound = nil, nil, nil
	for _, h := range o.helpers {
		stopHelper(h)
	}
	o.helpers = nil
	return nil
}

func stopHelper(h *helper) {
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(time.Second):
		_ = h.cmd.Process.Kill()
		<-h.done
	}
}

func (o *Opened) add(name string, f *os.File) { o.Files = append(o.Files, NamedFile{name, f}) }

// lock takes QEMU's image locks of mode on f (see core/imagelock) and keeps
// a duplicate of f until Close.
func (o *Opened) lock(f *os.File, what, path string, mode imagelock.Mode) error {
	if err := imagelock.Lock(f, what, path, mode); err != nil {
		return err
	}
	dup, err := dupFile(f)
	if err != nil {
		return fmt.Errorf("%s %s: keep the lock: %w", what, path, err)
	}
	o.locked = append(o.locked, dup)
	return nil
}

// dupFile returns a close-on-exec duplicate of f (the same open file).
func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	return os.NewFile(uintptr(dup), f.Name()), nil
}

// kernelStateFS are the file systems of the host kernel's own state: a
// file there is no disk image (a /proc file reads as a 0-byte disk) and a
// directory there is no share.
var kernelStateFS = map[int64]string{
	unix.PROC_SUPER_MAGIC:    "procfs",
	unix.SYSFS_MAGIC:         "sysfs",
	unix.DEBUGFS_MAGIC:       "debugfs",
	unix.TRACEFS_MAGIC:       "tracefs",
	unix.SECURITYFS_MAGIC:    "securityfs",
	unix.CGROUP_SUPER_MAGIC:  "cgroupfs",
	unix.CGROUP2_SUPER_MAGIC: "cgroup2",
	unix.BPF_FS_MAGIC:        "bpffs",
	unix.NSFS_MAGIC:          "nsfs",
}

// KernelStateFS names fsType (statfs f_type) when it is a file system of
// the host kernel's own state, which no guest is handed: the OCI runtime
// refuses binds from it too.
func KernelStateFS(fsType int64) (string, bool) {
	name, ok := kernelStateFS[fsType]
	return name, ok
}

// refuseHostMemory is the error for st, what (path) is, when it is a host
// memory device (HostMemoryDevice), else nil.
func refuseHostMemory(what, path string, st *unix.Stat_t) error {
	if name, bad := HostMemoryDevice(st); bad {
		return fmt.Errorf("%s %q is %s, the host's memory or I/O ports: no plugin is handed that", what, path, name)
	}
	return nil
}

// HostMemoryDevice names st when it is a character device through which a
// process reads or writes the host's physical memory, kernel memory or I/O
// ports (/dev/mem, /dev/kmem, /dev/port: major 1, minors 1, 2 and 4).
// Handing one to a plugin would undo its sandbox.
func HostMemoryDevice(st *unix.Stat_t) (string, bool) {
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 {
		return "", false
	}
	switch unix.Minor(st.Rdev) {
	case 1:
		return "/dev/mem", true
	case 2:
		return "/dev/kmem", true
	case 4:
		return "/dev/port", true
	}
	return "", false
}

// openFile opens path for a plugin (openAs). It never blocks on a FIFO (O_NONBLOCK
// while opening, cleared after the type check) and accepts only regular
// files and block devices (or, with dir, only directories).
func openFile(what, path string, write, dir bool) (*os.File, error) {
	flags := unix.O_RDONLY
	switch {
	case dir:
		flags |= unix.O_DIRECTORY
	case write:
		flags = unix.O_RDWR
	}
	if dir {
		return openAs(what, path, flags, "a directory", unix.S_IFDIR)
	}
	f, err := openAs(what, path, flags, "a regular file or block device", unix.S_IFREG, unix.S_IFBLK)
	if write && (errors.Is(err, unix.EACCES) || errors.Is(err, unix.EROFS)) &&
		unix.Faccessat(unix.AT_FDCWD, path, unix.R_OK, unix.AT_EACCESS) == nil {
		// A deployment's image that this user may read but not write
		// (found in review, helper-143).
		return nil, fmt.Errorf("%w (this user may read it: readonly=on serves it read-only)", err)
	}
	return f, err
}

// openAs opens path with flags (O_CLOEXEC added), without blocking on a
// FIFO or taking a terminal, and refuses it unless its type is one of
// types (want names them) and it is outside the kernel's state.
func openAs(what, path string, flags int, want string, types ...uint32) (*os.File, error) {
	// Looked at before the open too: the node says what it is whether or
	// not this kernel has the driver behind it.
	var pre unix.Stat_t
	if unix.Stat(path, &pre) == nil {
		if err := refuseHostMemory(what, path, &pre); err != nil {
			return nil, err
		}
	}
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, unix.ENOTDIR) && flags&unix.O_DIRECTORY != 0 || errors.Is(err, unix.EISDIR) {
			return nil, fmt.Errorf("%s %q is not %s", what, path, want)
		}
		return nil, fmt.Errorf("%s: %w", what, &os.PathError{Op: "open", Path: path, Err: err})
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", what, &os.PathError{Op: "stat", Path: path, Err: err})
	}
	if !slices.Contains(types, st.Mode&unix.S_IFMT) {
		unix.Close(fd)
		return nil, fmt.Errorf("%s %q is not %s", what, path, want)
	}
	if err := refuseHostMemory(what, path, &st); err != nil {
		unix.Close(fd)
		return nil, err
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err == nil {
		if name, bad := KernelStateFS(int64(sfs.Type)); bad {
			unix.Close(fd)
			return nil, fmt.Errorf("%s %q is on %s, the host kernel's own state, not something to hand a guest", what, path, name)
		}
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", what, &os.PathError{Op: "fcntl", Path: path, Err: err})
	}
	return os.NewFile(uintptr(fd), path), nil
}

// Open opens the image (O_RDWR, or O_RDONLY with readonly=on), the declared
// backing files (always O_RDONLY) and the data file (the image's mode), and
// locks each as QEMU does (core/imagelock): the image and data file as a
// writer, or as a reader with readonly=on, backing files as readers. An
// image another process writes (or, for a writer, reads) is refused with
// one line.
func (d *DiskSpec) Open(OpenOptions) (_ *Opened, err error) {
	o := &Opened{Kind: d.Kind(), Options: map[string]string{
		devopts.OptFormat:   string(d.Format),
		devopts.OptReadOnly: onOff(d.ReadOnly),
	}}
	defer func() {
		if err != nil {
			_ = o.Close()
		}
	}()
	mode := imagelock.ReadWrite
	if d.ReadOnly {
		mode = imagelock.ReadOnly
	}
	// See fileBound: a raw image never grows; a qcow2 image grows by
	// QCOW2Growth of its max-size= at most, or, without one, of the
	// capacity its plugin reports.
	o.bound = &fileBound{}
	if d.Format == devopts.QCOW2 && !d.ReadOnly {
		if d.MaxSize > 0 {
			o.bound.growth = QCOW2Growth(uint64(d.MaxSize))
		} else {
			o.bound.untilCapacity = true
		}
	}
	seen := map[[2]uint64]string{}
	// open opens, identifies and locks one file; the same file twice in
	// one device is named as such rather than as another process's lock.
	open := func(name, what, path string, write bool, mode imagelock.Mode) (string, error) {
		abs, err := absPath(what, path)
		if err != nil {
			return "", err
		}
		f, err := openFile(what, path, write, false)
		if err != nil {
			return "", err
		}
		o.add(name, f)
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return "", fmt.Errorf("%s: %w", what, &os.PathError{Op: "stat", Path: path, Err: err})
		}
		id := [2]uint64{st.Dev, st.Ino}
		if prev, ok := seen[id]; ok {
			return "", fmt.Errorf("%s %s is the same file as the %s", what, abs, prev)
		}
		seen[id] = what
		what = strings.TrimPrefix(what, "disk ")
		if err := o.lock(f, what, abs, mode); err != nil {
			return "", err
		}
		if write {
			o.bound.files = append(o.bound.files, o.locked[len(o.locked)-1])
		}
		return abs, nil
	}
	if o.Options[devopts.OptPath], err = open(devopts.FileImage, "disk image", d.Path, !d.ReadOnly, mode); err != nil {
		return nil, err
	}
	for i, b := range d.Backing {
		o.Options[devopts.OptBackingFormat(i)] = string(b.Format)
		if o.Options[devopts.OptBackingPath(i)], err = open(devopts.BackingFile(i), "backing file", b.Path, false, imagelock.ReadOnly); err != nil {
			return nil, err
		}
	}
	if d.DataFile != "" {
		if o.Options[devopts.OptDataFilePath], err = open(devopts.FileDataFile, "data file", d.DataFile, !d.ReadOnly, mode); err != nil {
			return nil, err
		}
	}
	if d.MaxSize != 0 {
		o.Options[devopts.OptMaxSize] = strconv.FormatInt(d.MaxSize, 10)
	}
	if d.Queues != 0 {
		o.Options[devopts.OptQueues] = strconv.Itoa(d.Queues)
	}
	return o, nil
}

// absPath makes path absolute and clean (symlinks are kept as written).
func absPath(what, path string) (string, error) {
	p, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("%s %q: %w", what, path, err)
	}
	return p, nil
}

// Open opens the shared directory. When the plugin will run with other
// ids than krun-core's (oo.Sandbox under a root krun-core), the directory
// is handed over as an ID-mapped mount of it instead
// (sandbox.LaunchConfig.IDMapShare): krun-core's ids and the plugin's are
// swapped on it, so the plugin works in the share as krun-core's ids, as
// it did when plugins ran with them. Where the host cannot make the mount
// (a file system or kernel without ID-mapped mounts) the plain directory
// is handed over, the plugin works in it with its own ids, and oo.Log says
// so once for this share.
func (f *FSSpec) Open(oo OpenOptions) (_ *Opened, err error) {
	dir, err := openFile("shared directory", f.Path, false, true)
	if err != nil {
		return nil, err
	}
	opts := map[string]string{devopts.OptTag: f.Tag, devopts.OptReadOnly: onOff(f.ReadOnly)}
	for k, v := range f.PluginOptions {
		opts[k] = v
	}
	o := &Opened{Kind: devopts.KindFS, Options: opts, OpenFiles: f.OpenFiles}
	defer func() {
		if err != nil {
			dir.Close()
			_ = o.Close()
		}
	}()
	if oo.Sandbox == nil {
		o.add(devopts.FileDir, dir)
		return o, nil
	}
	// useMount hands over mnt, a detached mount of the directory, instead
	// of the directory; a copy is kept for a plugin launched again (the
	// mount lives while a descriptor of it does).
	useMount := func(mnt *os.File, what string) error {
		dir.Close()
		dir = mnt
		kept, err := dupFile(mnt)
		if err != nil {
			return fmt.Errorf("shared directory %s: keep its %s: %w", f.Path, what, err)
		}
		o.kept = append(o.kept, kept)
		return nil
	}
	// plain hands over a detached copy of the directory's mounts where
	// the host can make one (a root krun-core), else the directory:
	// from a directory fd, ".." reaches the whole host for the calls
	// Landlock does not confine (stat, chmod, chown, utimes).
	plain := func() (*Opened, error) {
		if c, err := sandbox.CloneShare(dir, f.ReadOnly); err == nil {
			if err := useMount(c, "mount"); err != nil {
				return nil, err
			}
		}
		o.add(devopts.FileDir, dir)
		return o, nil
	}
	mnt, err := oo.Sandbox.IDMapShare(dir)
	switch {
	case err != nil:
		if oo.Log != nil {
			uid, gid, _ := oo.Sandbox.PluginIDs()
			oo.Log.Warn("no ID-mapped mount of a shared directory on this host: the plugin works in it with its own ids, so the guest can change only what they may and its new files are theirs",
				"dir", f.Path, "plugin_ids", fmt.Sprintf("%d:%d", uid, gid), "error", err)
		}
		return plain()
	case mnt == nil: // the plugin runs with krun-core's ids
		return plain()
	}
	if err := useMount(mnt, "ID-mapped mount"); err != nil {
		return nil, err
	}
	o.add(devopts.FileDir, mnt)
	if oo.Sandbox.PluginSeesShareIDs() {
		// Without a user namespace of its own the plugin sees the mount's
		// ids (krun-core's and its own swapped): the guest's id maps go
		// through the swap, so the guest sees on-disk ids as before.
		uid, gid, _, err := oo.Sandbox.ShareSwaps()
		if err != nil {
			return nil, err
		}
		for _, m := range []struct {
			key  string
			swap sandbox.IDSwap
		}{{devopts.OptUIDMap, uid}, {devopts.OptGIDMap, gid}} {
			ms, err := devopts.ParseIDMaps(opts[m.key])
			if err != nil {
				return nil, fmt.Errorf("%s=%s: %w", m.key, opts[m.key], err)
			}
			opts[m.key] = devopts.FormatIDMaps(ComposeSwap(ms, m.swap))
		}
	}
	return o, nil
}

// ComposeSwap returns id maps that translate a guest id as ms does (an
// empty ms is the identity) and then swap s.Launcher and s.Plugin on the
// host side: what a plugin that sees a share through its ID-mapped mount
// needs to show the guest the ids on disk.
func ComposeSwap(ms []devopts.IDMap, s sandbox.IDSwap) []devopts.IDMap {
	if len(ms) == 0 {
		ms = []devopts.IDMap{{Guest: 0, Host: 0, Count: 1<<32 - 1}}
	}
	var out []devopts.IDMap
	for _, r := range ms {
		start, end := uint64(r.Host), uint64(r.Host)+uint64(r.Count) // host ids [start, end)
		cuts := []uint64{start, end}
		for _, p := range []uint32{s.Launcher, s.Plugin} {
			if uint64(p) > start && uint64(p) < end {
				cuts = append(cuts, uint64(p))
			}
			if uint64(p)+1 > start && uint64(p)+1 < end {
				cuts = append(cuts, uint64(p)+1)
			}
		}
		slices.Sort(cuts)
		cuts = slices.Compact(cuts)
		for i := 0; i+1 < len(cuts); i++ {
			a, b := cuts[i], cuts[i+1]
			g := uint64(r.Guest) + (a - start)
			// A piece longer than one id holds no swapped id (both ends of
			// each are cuts), so the swap leaves it alone.
			h := uint64(s.Swap(uint32(a)))
			if n := len(out); n > 0 {
				// Join to the previous piece where both sides continue it.
				if p := out[n-1]; uint64(p.Guest)+uint64(p.Count) == g && uint64(p.Host)+uint64(p.Count) == h {
					out[n-1].Count += uint32(b - a)
					continue
				}
			}
			out = append(out, devopts.IDMap{Guest: uint32(g), Host: uint32(h), Count: uint32(b - a)})
		}
	}
	return out
}

// Open starts passt on one end of a socket pair (passt --fd) and hands the
// other end to the plugin as "passt". passt runs until Opened.Close. With no
// mac=, a random locally administered unicast MAC is chosen.
func (n *NetSpec) Open(oo OpenOptions) (_ *Opened, err error) {
	mac := n.MAC
	if mac == nil {
		mac = make(net.HardwareAddr, 6)
		if _, err := rand.Read(mac); err != nil {
			return nil, fmt.Errorf("random MAC: %w", err)
		}
		mac[0] = mac[0]&^1 | 2 // unicast, locally administered
	}
	passt := oo.PasstPath
	if passt == "" {
		if passt, err = exec.LookPath("passt"); err != nil {
			return nil, fmt.Errorf("--net passt needs the passt program: %w", err)
		}
	}
	ours, theirs, err := PasstSocketPair()
	if err != nil {
		return nil, err
	}
	defer theirs.Close()
	o := &Opened{Kind: devopts.KindNetPasst, Options: map[string]string{devopts.OptMAC: mac.String()}}
	if n.MTU != 0 {
		o.Options[devopts.OptMTU] = strconv.Itoa(int(n.MTU))
	}
	o.add(devopts.FilePasst, ours)
	defer func() {
		if err != nil {
			_ = o.Close()
		}
	}()
	args := []string{"--foreground", "--quiet", "--fd", "3"}
	for _, p := range n.Ports {
		args = append(args, "--tcp-ports", p.String())
	}
	if n.MTU != 0 {
		args = append(args, "--mtu", strconv.Itoa(int(n.MTU)))
	}
	args = append(args, n.PasstArgs...)
	cmd := exec.Command(passt, args...)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stdout = oo.HelperStderr
	cmd.Stderr = oo.HelperStderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := o.startHelper(cmd); err != nil {
		return nil, fmt.Errorf("start passt: %w", err)
	}
	return o, nil
}

// PasstSocketBuffer is the send buffer asked for on each end of passt's
// socket pair: about one large TCP window. passt drops the frames of a
// short send to its socket, so a burst larger than the buffer is lost
// whenever the device is slow to read, and a TCP connection then waits for
// passt's retransmission timer.
const PasstSocketBuffer = 4 << 20

// PasstSocketPair makes the stream socket pair between passt (theirs, for
// --fd) and the network device (ours), with PasstSocketBuffer of send
// buffer on each end: forced where the process may (CAP_NET_ADMIN),
// otherwise up to net.core.wmem_max.
func PasstSocketPair() (ours, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("passt socket pair: %w", err)
	}
	for _, fd := range fds {
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, PasstSocketBuffer) != nil {
			// Capped by the kernel at net.core.wmem_max; not an error.
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, PasstSocketBuffer)
		}
	}
	return os.NewFile(uintptr(fds[0]), "passt"), os.NewFile(uintptr(fds[1]), "passt-peer"), nil
}

// Checker is a Spec that can check the files it names before anything
// starts (vmm.Context.Validate): a missing or wrong file is then named on
// its own, before the KVM check and before any plugin starts.
type Checker interface {
	Check() error
}

// Check opens the image, the declared backing files and the data file
// read-only, with the checks Open makes (a regular file or block device,
// not on a file system of the kernel's state), and closes them. Nothing is
// locked: Open still decides, since the files may change in between.
func (d *DiskSpec) Check() error {
	files := []struct{ what, path string }{{"disk image", d.Path}}
	for _, b := range d.Backing {
		files = append(files, struct{ what, path string }{"backing file", b.Path})
	}
	if d.DataFile != "" {
		files = append(files, struct{ what, path string }{"data file", d.DataFile})
	}
	for _, f := range files {
		fh, err := openFile(f.what, f.path, false, false)
		if err != nil {
			return err
		}
		fh.Close()
	}
	return nil
}

// Check opens the shared directory with Open's checks and closes it.
func (f *FSSpec) Check() error {
	dir, err := openFile("shared directory", f.Path, false, true)
	if err != nil {
		return err
	}
	return dir.Close()
}

// KeepCapabilities is what a launcher keeps once set up
// (sandbox.DropPrivileges) for the devices of specs: what the sandbox
// needs to launch plugins again (lc.KeepCapabilities) and, with a --net
// device, CAP_NET_BIND_SERVICE. A plugin or passt restart starts a new
// passt (see Open), which binds the forwarded host ports itself; a root
// krun-core's passt gets only the capabilities left in krun-core's
// bounding set, and a host port below net.ipv4.ip_unprivileged_port_start
// (1024 by default) needs this one. Without it the new passt exits
// ("Failed to bind any port") and every restart fails alike until the
// device fails. It is kept for every --net device: passt-arg= and the OCI
// runtime forward ports too.
func KeepCapabilities(lc sandbox.LaunchConfig, specs []Spec) []sandbox.Capability {
	keep := lc.KeepCapabilities()
	for _, s := range specs {
		if _, ok := s.(*NetSpec); ok {
			return append(keep, unix.CAP_NET_BIND_SERVICE)
		}
	}
	return keep
}
