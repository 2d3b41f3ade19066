package vmm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initramfs/cpio"
)

// The container calls (the OCI runtime, krun-oci, uses them): a container
// environment inside the root, a command that waits for StartCommand, and
// more programs started in the running guest (Exec).

// MilestoneReady is the milestone krun-init reports when the container is
// set up and the command waits for StartCommand.
const MilestoneReady = container.MilestoneReady

// guestNotify turns status-port writes into channels.
type guestNotify struct {
	once                                         sync.Once
	ready, execed, exited, ended                 chan struct{}
	readyOnce, execedOnce, exitedOnce, endedOnce sync.Once
}

func (n *guestNotify) init() {
	n.once.Do(func() {
		n.ready = make(chan struct{})
		n.execed = make(chan struct{})
		n.exited = make(chan struct{})
		n.ended = make(chan struct{})
	})
}

func (n *guestNotify) markEnded() {
	n.init()
	n.endedOnce.Do(func() { close(n.ended) })
}

func (n *guestNotify) markExeced() {
	n.init()
	n.execedOnce.Do(func() { close(n.execed) })
}

func (n *guestNotify) markReady() {
	n.init()
	n.readyOnce.Do(func() { close(n.ready) })
}

func (n *guestNotify) markExited() {
	n.init()
	n.exitedOnce.Do(func() { close(n.exited) })
}

// SetContainer makes krun-init build the container environment s inside
// the root before the command runs (mounts, devices, masked and read-only
// paths, sysctls), and start the command with s.Process's capabilities,
// no_new_privs, OOM score and umask. The shares s mounts are added with
// AddDevice (devspec.FSSpec); in container mode they are mounted where s
// says, not under /mnt. With s.WaitForStart the command waits for
// StartCommand.
func (c *Context) SetContainer(s *container.Setup) error {
	if err := s.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	c.execCfg().container = s
	return nil
}

// SetEnv sets the command's environment exactly as given (SetExec's env
// keeps krun-core's default PATH and HOME unless overridden).
func (c *Context) SetEnv(env []string) {
	e := c.execCfg()
	e.cfg.Env = append([]string{}, env...)
	e.envHome = slices.ContainsFunc(env, isHome)
}

// SetRootOptions passes options to the root's fs-virtio plugin (e.g.
// suid=on), as --fs does for a share.
func (c *Context) SetRootOptions(opts map[string]string) { c.execCfg().rootOptions = opts }

// SetRootOpenFiles sets the RLIMIT_NOFILE the sandbox gives the root's
// fs-virtio plugin, as --fs's open-files= does for a share (0: the
// default, sandbox.FSOpenFiles). The plugin keeps about a quarter of it
// for the files and directories the guest holds open on the root.
func (c *Context) SetRootOpenFiles(n uint64) error {
	if n != 0 && (n < devspec.MinFSOpenFiles || n > devspec.MaxFSOpenFiles) {
		return fmt.Errorf("%w: root open files %d: want %d to %d", ErrConfig, n, devspec.MinFSOpenFiles, devspec.MaxFSOpenFiles)
	}
	c.execCfg().openFiles = n
	return nil
}

// SetUser sets the command's uid, gid and supplementary groups. It
// replaces SetUserSpec.
func (c *Context) SetUser(uid, gid uint32, groups []uint32) {
	cfg := c.execCfg().cfg
	cfg.UID, cfg.GID, cfg.AdditionalGIDs = uid, gid, groups
	cfg.User = ""
}

// SetLookup chooses whether Start looks the command up in the root before
// anything starts (default on). A command that comes from a mount the
// guest makes cannot be found on the host; krun-init then reports it.
func (c *Context) SetLookup(on bool) { c.execCfg().noLookup = !on }

// Ready returns a channel closed once the guest has reported
// MilestoneReady: the container is set up and the command waits for
// StartCommand.
func (c *Context) Ready() <-chan struct{} {
	c.notify.init()
	return c.notify.ready
}

// CommandStarted returns a channel closed once the guest has reported that
// the command was started (MilestoneExec).
func (c *Context) CommandStarted() <-chan struct{} {
	c.notify.init()
	return c.notify.execed
}

// Exited returns a channel closed once the guest has reported the
// command's exit status (the VM then powers off).
func (c *Context) Exited() <-chan struct{} {
	c.notify.init()
	return c.notify.exited
}

// Ended returns a channel closed once the guest has ended (its vCPUs
// stopped: it powered off, rebooted, crashed, or was stopped), before
// Start shuts its devices down and returns. From then on Exec, Signal and
// Resize fail with ErrGuestEnded.
func (c *Context) Ended() <-chan struct{} {
	c.notify.init()
	return c.notify.ended
}

// guestEnded records that the guest has ended (Ended).
func (c *Context) guestEnded() {
	if c.exec != nil {
		c.exec.guestEnded()
	}
	c.notify.markEnded()
}

// StartCommand releases a command that waits for it (SetContainer with
// WaitForStart).
func (c *Context) StartCommand() error {
	return c.control(devopts.StartRecord())
}

// execIDs numbers exec'd programs; 0 is never used.
var execIDs atomic.Uint32

// Exec starts program p in the running guest with its standard input,
// output and error on the given files (for a terminal, one pty end for
// all three) and returns its id. When it ends its exit status (one byte,
// 128+N for signal N) is written to status, which is then closed by the
// console plugin; status closed without a byte means the VM ended first.
// The files are passed to the console plugin; the caller may close its
// own copies when Exec returns.
func (c *Context) Exec(p *container.Process, stdin, stdout, stderr, status *os.File) (uint32, error) {
	if err := p.Validate(); err != nil {
		return 0, err
	}
	if stdin == nil || stdout == nil || stderr == nil || status == nil {
		return 0, errors.New("vmm: exec needs stdin, stdout, stderr and a status file")
	}
	b, err := json.Marshal(p)
	if err != nil {
		return 0, fmt.Errorf("encode exec request: %w", err)
	}
	id := execIDs.Add(1)
	if id == 0 {
		id = execIDs.Add(1)
	}
	rec, err := devopts.ExecRecord(id, b)
	if err != nil {
		return 0, err
	}
	files, err := execFiles(stdin, stdout, stderr, status)
	if err != nil {
		return 0, err
	}
	defer closeAll(files)
	if err := c.controlFiles(rec, files...); err != nil {
		return 0, err
	}
	return id, nil
}

// execFiles returns the console plugin's copies of an exec's files, as
// the main console's (devspec.HandOver): a terminal or pipe opened again
// for the one direction the plugin uses it in. krun-oci exec's stdout and
// stderr are often the caller's terminal, one O_RDWR description with
// its stdin; passed as they were, the plugin could read what the user
// types to the shell's foreground job through them, out of job control
// (found in review).
func execFiles(stdin, stdout, stderr, status *os.File) ([]*os.File, error) {
	var files []*os.File
	for _, f := range []struct {
		name   string
		file   *os.File
		access int
	}{{"stdin", stdin, unix.O_RDONLY}, {"stdout", stdout, unix.O_WRONLY}, {"stderr", stderr, unix.O_WRONLY}, {"status", status, unix.O_WRONLY}} {
		c, err := devspec.HandOver(f.file, f.name, f.access)
		if err != nil {
			closeAll(files)
			return nil, fmt.Errorf("exec %s: %w", f.name, err)
		}
		files = append(files, c)
	}
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// ExecSignal sends sig to exec'd program id.
func (c *Context) ExecSignal(id uint32, sig unix.Signal) error {
	return c.control(devopts.ExecSignalRecord(id, uint8(sig)))
}

// ExecResize tells exec'd program id's terminal its new size.
func (c *Context) ExecResize(id uint32, rows, cols uint16) error {
	return c.control(devopts.ExecWinsizeRecord(id, rows, cols))
}

// controlFiles sends a control record with files attached.
func (c *Context) controlFiles(rec []byte, files ...*os.File) error {
	if c.exec == nil {
		return errors.New("vmm: no program is running")
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	c.exec.controlMu.Lock()
	defer c.exec.controlMu.Unlock()
	if err := c.exec.usableLocked(); err != nil {
		return err
	}
	return unix.Sendmsg(int(c.exec.controlW.Fd()), rec, unix.UnixRights(fds...), nil, 0)
}

// containerArchive is a second newc archive the kernel unpacks over the
// initramfs: container.Path with the setup.
func containerArchive(s *container.Setup) ([]byte, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("encode container setup: %w", err)
	}
	var buf bytes.Buffer
	w := cpio.NewWriter(&buf)
	// krun/ exists: the first archive has krun-init's config in it.
	if err := w.Add(&cpio.Entry{Name: container.Path[1:], Mode: cpio.Reg | 0o600, Data: b}); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
