// Package vmm is the core's Go API, in the spirit of libkrun's context
// calls: create a Context, set the VM configuration, the kernel and the
// console, add disks (with an explicit format) and other plugin devices,
// then Start, which boots the guest on KVM and returns when it powers off
// or reboots.
//
// The machine is minimal: vCPUs with an in-kernel irqchip and PIT, guest
// RAM in a memfd that plugins map, a 16550A at COM1, ACPI tables for
// poweroff and the vCPU/IOAPIC layout, the i8042 and ACPI reset ports, and
// one virtio-mmio transport per plugin device. Device data never passes
// through the core: kicks reach plugins through ioeventfds and their
// interrupts reach the guest through irqfds.
package vmm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/boot"
	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/initramfs/kmod"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/sandbox"
)

// Defaults.
const (
	DefaultCPUs      = 1
	DefaultMemoryMiB = 512
	DefaultCmdline   = "console=ttyS0 panic=-1"
	// MaxDevices is how many virtio-mmio devices fit the GSIs the core
	// reserves for them (IOAPIC pins 16..23).
	MaxDevices = 8
	// MaxMemoryMiB bounds guest RAM (1 TiB).
	MaxMemoryMiB = 1 << 20
	// DefaultBootTimeout is how long a guest may run without any sign of
	// life before the boot watchdog ends it (SetBootTimeout).
	DefaultBootTimeout = 2 * time.Minute
)

// Errors for a configuration the core refuses.
var ErrConfig = errors.New("invalid VM configuration")

// ErrBootTimeout says the boot watchdog ended a guest that showed no sign
// of life: no console output and no access to any device.
var ErrBootTimeout = errors.New("boot watchdog")

// ErrEssentialDevice is wrapped by the error that ends a VM because a
// device it cannot do without failed (the root file system or the
// console of `run -- CMD`, whose plugins are not restarted).
var ErrEssentialDevice = errors.New("the guest cannot go on without it")

// Context collects a VM's configuration; Start runs it. A Context runs one
// VM once.
type Context struct {
	log hclog.Logger

	cpus      int
	memoryMiB uint64

	kernelPath, initrdPath string
	cmdline                string
	cmdlineSet             bool
	mmioCmdline            bool

	devices []devspec.Spec
	// essential names the devices the guest cannot do without (with
	// -- CMD: the root share and the console): their failure ends the VM.
	essential map[devspec.Spec]string

	consoleOut io.Writer
	consoleSet bool
	// consoleTail keeps the last lines of a console the core logs itself
	// (SetExec without SetConsoleOutput): Result.ConsoleTail.
	consoleTail *consoleTail
	consoleIn   io.Reader

	pluginDir      string
	sandboxOff     bool
	sandboxDisable []sandbox.Layer
	pluginUID      int // 0: the sandbox's default (sandbox.LaunchConfig.PluginIDs)
	syscallGrants  devspec.SyscallGrants
	pluginGID      int
	bootMarker     string
	bootTimeout    time.Duration
	restartPolicy  pluginhost.RestartPolicy
	handshake      time.Duration // a plugin's start-up limit; 0: DefaultPluginHandshakeTimeout
	started        bool
	keepPrivileges bool
	// pluginsLeft: a plugin outlived SIGKILL and was left running
	// (killReaped); the command's output pumps do not wait for it.
	pluginsLeft atomic.Bool

	// SetExec mode (exec.go): the program, and the initramfs built for it.
	exec       *execConfig
	initrdData io.ReaderAt
	initrdSize int64
	// notify turns the guest's milestones into channels (container.go).
	notify guestNotify
}

// NewContext returns a Context with the defaults: one vCPU, 512 MiB, the
// default command line, console output discarded.
func NewContext(log hclog.Logger) *Context {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Context{
		log: log, cpus: DefaultCPUs, memoryMiB: DefaultMemoryMiB,
		cmdline: DefaultCmdline, mmioCmdline: true, consoleOut: io.Discard,
		bootTimeout: DefaultBootTimeout,
	}
}

// SetVMConfig sets the number of vCPUs and the guest RAM in MiB.
func (c *Context) SetVMConfig(cpus int, memoryMiB uint64) error {
	if cpus < 1 || cpus > 255 {
		return fmt.Errorf("%w: %d vCPUs (1..255)", ErrConfig, cpus)
	}
	if memoryMiB < 64 || memoryMiB > MaxMemoryMiB {
		return fmt.Errorf("%w: %d MiB of memory (64..%d)", ErrConfig, memoryMiB, MaxMemoryMiB)
	}
	c.cpus, c.memoryMiB = cpus, memoryMiB
	return nil
}

// SetKernel sets the bzImage, the optional initrd ("" for none) and the
// kernel command line ("" keeps the default). Without SetKernel, Start
// boots the kernel FindKernel finds.
func (c *Context) SetKernel(kernel, initrd, cmdline string) error {
	if kernel == "" {
		return fmt.Errorf("%w: no kernel", ErrConfig)
	}
	c.kernelPath, c.initrdPath = kernel, initrd
	c.SetCmdline(cmdline)
	return nil
}

// SetCmdline sets the kernel command line ("" keeps the default).
func (c *Context) SetCmdline(cmdline string) {
	if cmdline != "" {
		c.cmdline, c.cmdlineSet = cmdline, true
	}
}

// SetMMIOCmdline chooses whether virtio_mmio.device= entries are added to
// the command line (default on). The devices are always described in the
// ACPI DSDT too, which is what kernels without
// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's) use.
func (c *Context) SetMMIOCmdline(on bool) { c.mmioCmdline = on }

// AddDisk adds a virtio-blk disk served by a plugin. The format is always
// explicit; the image's content is never used to guess it.
func (c *Context) AddDisk(path string, format devopts.Format, readOnly bool) error {
	if _, err := devopts.ParseFormat(string(format)); err != nil {
		return fmt.Errorf("%w: disk %s: %w", ErrConfig, path, err)
	}
	if path == "" {
		return fmt.Errorf("%w: disk without a path", ErrConfig)
	}
	return c.AddDevice(&devspec.DiskSpec{Path: path, Format: format, ReadOnly: readOnly})
}

// AddDiskSpec adds a disk from a --disk option string
// (path=FILE,format=raw|qcow2[,readonly=on]...).
func (c *Context) AddDiskSpec(spec string) error {
	d, err := devspec.ParseDisk(spec)
	if err != nil {
		return fmt.Errorf("--disk %s: %w", spec, err)
	}
	return c.AddDevice(d)
}

// AddDevice adds any device described by a parsed spec: a built-in plugin's
// (disk, fs, net), a third-party plugin's (*devspec.PluginSpec: any
// installed krun-plugin-KIND, whose options it checks itself), or an
// external vhost-user back-end (*devspec.VhostUserSpec, as AddVhostUser).
func (c *Context) AddDevice(s devspec.Spec) error {
	if len(c.devices) >= MaxDevices {
		return fmt.Errorf("%w: more than %d devices", ErrConfig, MaxDevices)
	}
	c.devices = append(c.devices, s)
	return nil
}

// VhostUserOptions are the optional settings of AddVhostUser; zero values
// take the defaults (see devspec.VhostUserSpec).
type VhostUserOptions struct {
	// Queues is the number of request queues: virtio-blk queues,
	// virtio-fs request queues (besides the high-priority queue), or the
	// queues of a numeric type. Default 1; net has one queue pair.
	Queues int
	// QueueSize is the largest ring the guest may set up (a power of
	// two; default 128 for blk and fs, 256 otherwise).
	QueueSize int
	// Tag is the virtio-fs mount tag, used when the back-end has no
	// config space of its own (the C virtiofsd).
	Tag string
	// Reconnect, when not 0, is the interval between attempts to connect
	// again to a back-end that disconnected while the guest ran; the
	// requests it had in flight are replayed (not for fs).
	Reconnect time.Duration
}

// AddVhostUser attaches an external vhost-user back-end that krun-core did
// not start and does not sandbox (qemu-storage-daemon, virtiofsd, a
// vhost-device-* daemon, another krun-core serve) listening on the unix
// socket socket. typ is "blk", "fs", "net" or a virtio device ID ("4").
// Start connects to it and negotiates before the guest starts; a back-end
// that is missing or refuses the protocol makes Start fail, and one that
// disconnects while the guest runs fails its device (as a plugin that
// dies does), or, with opts.Reconnect, is connected to again.
func (c *Context) AddVhostUser(typ, socket string, opts VhostUserOptions) error {
	v, err := devspec.NewVhostUser(typ, socket, opts.Queues, opts.QueueSize, opts.Tag)
	if err == nil {
		err = v.SetReconnect(opts.Reconnect)
	}
	if err != nil {
		return fmt.Errorf("%w: vhost-user back-end: %w", ErrConfig, err)
	}
	return c.AddDevice(v)
}

// SetConsoleOutput sets where the guest's serial console goes. A file is
// written with write(2) on its descriptor (rawFileWriter), so that a pipe
// whose reader went away (`run | head`) stops the console instead of
// killing the core.
func (c *Context) SetConsoleOutput(w io.Writer) {
	if w == nil {
		w = io.Discard
	}
	if f, ok := w.(*os.File); ok {
		w = rawFileWriter{f}
	}
	c.consoleOut, c.consoleSet = w, true
}

// rawFileWriter writes to a file through its descriptor, not os.File's
// Write: Go turns EPIPE from a write to descriptor 1 or 2 through an
// *os.File into the process's death by SIGPIPE, and the guest decides
// when its console writes. The write fails with EPIPE instead, which the
// UART keeps (the console stops, the VM runs on; found in review).
type rawFileWriter struct{ f *os.File }

func (w rawFileWriter) Write(p []byte) (int, error) {
	rc, err := w.f.SyscallConn()
	if err != nil {
		return 0, err
	}
	written := 0
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		for written < len(p) {
			n, err := unix.Write(int(fd), p[written:])
			if n > 0 {
				written += n
			}
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false // the poller waits until it can write
			case err != nil:
				werr = err
				return true
			case n == 0:
				werr = io.ErrShortWrite
				return true
			}
		}
		return true
	})
	if werr == nil {
		werr = err
	}
	return written, werr
}

// SetConsoleInput sets what the guest's serial console reads (nil: none).
// A reader with a descriptor (an *os.File such as os.Stdin) is read only
// while the VM runs, and only what poll says is there: nothing is read
// from it once Start has returned, unless another reader of the same
// file took what poll saw: the read then blocks, Start returns after a
// second with a warning, and the next bytes that read gets are lost (not
// given to the guest). Another reader is read as it is; its last Read
// may end after Start returned.
func (c *Context) SetConsoleInput(r io.Reader) { c.consoleIn = r }

// SetPluginDir sets the directory searched first for krun-plugin-*.
func (c *Context) SetPluginDir(dir string) { c.pluginDir = dir }

// SetSandboxOff turns the plugin sandbox off (the user's explicit choice).
func (c *Context) SetSandboxOff(off bool) { c.sandboxOff = off }

// SetSandboxDisable turns off some sandbox layers (the user's explicit
// choice, e.g. the empty root where the host's root is an initramfs, which
// cannot be pivoted away from).
func (c *Context) SetSandboxDisable(layers []sandbox.Layer) { c.sandboxDisable = layers }

// SetPluginSyscalls grants --plugin devices' plugins system calls beyond
// their launch profile, by kind (what their declared policy asks for).
// Validate refuses a grant to a kind no --plugin device has.
func (c *Context) SetPluginSyscalls(g devspec.SyscallGrants) { c.syscallGrants = g }

// SetPluginIDs sets the host uid and gid plugins run as (0: the sandbox's
// default, nobody:nogroup for a root krun-core).
func (c *Context) SetPluginIDs(uid, gid int) { c.pluginUID, c.pluginGID = uid, gid }

// SetKeepPrivileges(true) keeps this process's privileges after set-up.
// By default Start ends the set-up (VM built, plugins launched and
// attached, before the first vCPU runs) with sandbox.DropPrivileges: the
// process gets no_new_privs and keeps only the capabilities that plugins
// need from it (sandbox.LaunchConfig.KeepCapabilities), on every thread and
// for the rest of its life. A program that needs its privileges after
// Start returns (unmounting, say) keeps them.
func (c *Context) SetKeepPrivileges(keep bool) { c.keepPrivileges = keep }

// SetPluginRestarts sets how often a plugin that dies or stops answering
// is started again (block and network devices and third-party plugins;
// virtio-fs, the console and a plugin whose DeviceInfo says no_restart are
// not restarted): the zero policy allows
// pluginhost.DefaultRestartMax restarts within
// pluginhost.DefaultRestartWindow; a negative Max turns restarts off. A
// device whose plugin dies once more fails (DEVICE_NEEDS_RESET).
func (c *Context) SetPluginRestarts(p pluginhost.RestartPolicy) { c.restartPolicy = p }

// SetPluginHandshakeTimeout sets how long each plugin may take to start
// (exec to go-plugin's handshake line), at launch and at every restart
// (default 60 s): more for an emulated or heavily loaded host.
func (c *Context) SetPluginHandshakeTimeout(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("%v is not positive", d)
	}
	c.handshake = d
	return nil
}

// handshakeTimeout is SetPluginHandshakeTimeout's, or the default.
func (c *Context) handshakeTimeout() time.Duration {
	if c.handshake > 0 {
		return c.handshake
	}
	return DefaultPluginHandshakeTimeout
}

// SetBootMarker makes Start record, in Result.Timing.KernelBoot, when the
// guest first prints marker on its console (its init announcing itself).
func (c *Context) SetBootMarker(marker string) { c.bootMarker = marker }

// SetBootTimeout sets the boot watchdog: a guest that, for d after its
// first instruction, has produced no console output and touched no device
// (no port or MMIO access at all: the serial port, the virtio-mmio
// windows, the ACPI ports) is ended, and Start returns an error wrapping
// ErrBootTimeout. Such a guest is not booting: a kernel that hangs before
// its first message, or a KVM that cannot run it. Once the guest has shown
// a sign of life the watchdog is off for the rest of the run, so a quiet
// guest is never ended for being idle. 0 turns the watchdog off; the
// default is DefaultBootTimeout.
func (c *Context) SetBootTimeout(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("%w: negative boot timeout %v", ErrConfig, d)
	}
	c.bootTimeout = d
	return nil
}

// ExitReason says how the guest ended.
type ExitReason int

// Exit reasons.
const (
	ExitPowerOff ExitReason = iota + 1
	ExitReboot
)

func (r ExitReason) String() string {
	switch r {
	case ExitPowerOff:
		return "poweroff"
	case ExitReboot:
		return "reboot"
	}
	return "unknown"
}

// Timing splits the start-up time.
type Timing struct {
	// PluginStart: launching the plugins until they serve vhost-user.
	PluginStart time.Duration
	// VMSetup: KVM VM, memory, kernel load, tables, vCPUs, devices; it
	// overlaps with PluginStart (plugins start first, in the background).
	VMSetup time.Duration
	// Ready: from Start to the first guest instruction.
	Ready time.Duration
	// KernelBoot: from the first guest instruction until krun-init
	// started (with SetExec), or else until the boot marker appeared on
	// the console (0 without a marker, or if it never did).
	KernelBoot time.Duration
	// InitToExec: from krun-init's start until the program started (with
	// SetExec).
	InitToExec time.Duration
	// Command: the program's run, until its exit status was reported
	// (with SetExec).
	Command time.Duration
	// Total: from Start until the guest ended.
	Total time.Duration
}

// Result is what Start reports about a VM that ran.
type Result struct {
	Reason ExitReason
	Timing Timing
	// CoreRSS is the core's resident memory, excluding guest RAM (shared
	// memory), sampled just before tear-down, in bytes.
	CoreRSS uint64
	// DeviceErrors lists devices that failed while the guest ran.
	DeviceErrors []error
	// ExitStatus is the status the guest reported on PortExitStatus (the
	// program's, with SetExec); HasExitStatus says whether it did.
	ExitStatus    int
	HasExitStatus bool
	// ConsoleTail is the last lines (at most ConsoleTailLines, each cut
	// at 512 bytes) of the guest's serial console where the core logs it
	// itself (SetExec without SetConsoleOutput), made printable: with
	// "quiet", what the kernel and krun-init say when something went
	// wrong. After a kernel panic whose trace pushed the panic's own line
	// out, that line comes first, then "...". A caller shows them when
	// the guest ended without reporting an exit status.
	ConsoleTail []string
	// OutputError is why the command's output could not all be copied
	// into a file on stdout or stderr (a full disk; SetExec): the rest
	// of that stream was dropped. A caller says so.
	OutputError error
}

// Validate checks the configuration without starting anything: the
// kernel and initrd exist, the plugin directories named exist, every
// plugin is installed, and every external back-end's socket exists. Start
// runs it first; a caller may run it earlier to refuse bad input before
// doing anything else.
func (c *Context) Validate() error {
	if err := c.validate(); err != nil {
		return err
	}
	if err := pluginhost.CheckSearchPath(c.pluginDir); err != nil {
		return err
	}
	dirs := pluginhost.SearchPath(c.pluginDir)
	for i, s := range c.devices {
		if v, ok := s.(*devspec.VhostUserSpec); ok {
			if err := v.CheckSocket(); err != nil {
				return fmt.Errorf("device %d (%s): %w", i, s, err)
			}
			continue
		}
		if _, err := pluginhost.Find(s.Kind(), dirs); err != nil {
			return fmt.Errorf("device %d (%s): %w", i, s, err)
		}
		if ch, ok := s.(devspec.Checker); ok {
			if err := ch.Check(); err != nil {
				return fmt.Errorf("device %d (%s): %w", i, s, err)
			}
		}
	}
	if c.exec != nil {
		// The root share and the console, which Start adds, and the
		// network a port map adds when no device is one.
		kinds := []string{devopts.KindFS, devopts.KindConsole}
		if len(c.exec.portMap) > 0 && !slices.ContainsFunc(c.devices, func(s devspec.Spec) bool { _, ok := s.(*devspec.NetSpec); return ok }) {
			kinds = append(kinds, devopts.KindNetPasst)
		}
		for _, kind := range kinds {
			if _, err := pluginhost.Find(kind, dirs); err != nil {
				return err
			}
		}
	}
	// The kernel's own content last: the user's files, plugins and
	// sockets are named first.
	if err := checkBzImage(c.kernelPath); err != nil {
		return err
	}
	if c.exec != nil {
		if _, err := c.initramfsModules(); err != nil {
			return err
		}
	}
	return nil
}

// checkHostPorts refuses a host port that two --net devices forward: each
// has a passt of its own, and the second passt cannot bind the port (it
// exits, and its restarts fail alike until the device fails).
func (c *Context) checkHostPorts() error {
	owner := map[uint16]int{} // host port: the device forwarding it
	for i, d := range c.devices {
		n, ok := d.(*devspec.NetSpec)
		if !ok {
			continue
		}
		for _, p := range n.Ports {
			if j, ok := owner[p.Host]; ok && j != i {
				return fmt.Errorf("%w: host port %d is forwarded by two network devices (%d and %d): each has a passt of its own, and only one can bind it", ErrConfig, p.Host, j, i)
			}
			owner[p.Host] = i
		}
	}
	return nil
}

// checkTags refuses two shares with one tag: the guest mounts a share by
// its tag, and of two devices with the same tag it would mount the first
// one in both places.
func (c *Context) checkTags() error {
	// With SetExec the root share is one of the devices once Start has
	// added it; a share given the root's tag before is refused with the
	// mounts (initconfig), also before anything starts.
	seen := map[string]bool{}
	targets := map[string]string{} // a share's mount point: its tag
	for _, d := range c.devices {
		var tag string
		switch s := d.(type) {
		case *devspec.FSSpec:
			tag = s.Tag
			// A user's share, with --root: not the root's tag, and a
			// mount point of its own (a container's setup places them).
			if c.exec != nil && s != c.exec.rootShare {
				if tag == RootTag {
					return fmt.Errorf("%w: share tag %q is the root's own", ErrConfig, tag)
				}
				if c.exec.container == nil {
					target := "/mnt/" + tag
					if s.Mount != "" {
						target = path.Clean(s.Mount)
					}
					if other, ok := targets[target]; ok {
						return fmt.Errorf("%w: shares %q and %q are both mounted at %s", ErrConfig, other, tag, target)
					}
					targets[target] = tag
				}
			}
		case *devspec.VhostUserSpec:
			if s.Type != devspec.VirtioFS {
				continue
			}
			tag = s.Tag
		default:
			continue
		}
		if tag == "" {
			continue // an external back-end that names its own
		}
		if seen[tag] {
			return fmt.Errorf("%w: two shares with the tag %q (the guest mounts a share by its tag)", ErrConfig, tag)
		}
		seen[tag] = true
	}
	return nil
}

func (c *Context) validate() error {
	if err := c.syscallGrants.Check(c.devices); err != nil {
		return fmt.Errorf("%w: --plugin-syscalls %w", ErrConfig, err)
	}
	if err := c.findKernel(); err != nil {
		return err
	}
	if c.exec != nil && c.exec.root == "" {
		return fmt.Errorf("%w: SetExec needs SetRoot", ErrConfig)
	}
	if err := c.checkTags(); err != nil {
		return err
	}
	if err := c.checkHostPorts(); err != nil {
		return err
	}
	if runtime.GOARCH != "amd64" {
		return fmt.Errorf("%w: only x86-64 hosts are supported", ErrConfig)
	}
	if _, err := os.Stat(c.kernelPath); err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	if c.initrdPath != "" {
		if _, err := os.Stat(c.initrdPath); err != nil {
			return fmt.Errorf("initrd: %w", err)
		}
	}
	return nil
}

// initramfsModules returns the module tree the initramfs (with SetExec)
// is built from: the tree given, or the one found next to the kernel for
// its release. Validate calls it so that a wrong file is reported before
// anything starts; prepareExec uses its answer.
func (c *Context) initramfsModules() (string, error) {
	if d := c.exec.modulesDir; d != "" {
		if st, err := os.Stat(filepath.Join(d, "kernel")); err != nil || !st.IsDir() {
			return "", fmt.Errorf("%w: kernel modules %s: no kernel/ directory (want a /lib/modules/RELEASE tree)", ErrConfig, cli.Printable(d))
		}
		return d, nil
	}
	rel, err := kmod.Release(c.kernelPath)
	if err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	d, err := kmod.FindModulesDir(c.kernelPath, rel)
	if err != nil {
		return "", fmt.Errorf("%w (give --kernel-modules DIR)", err)
	}
	return d, nil
}

// checkBzImage checks that the kernel is a bzImage, the only format the
// boot code loads (an ELF vmlinux is refused there, after the KVM check).
func checkBzImage(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	head := make([]byte, 1024)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("kernel %s: %w", cli.Printable(path), err)
	}
	if _, err := boot.ParseSetupHeader(head[:n]); err != nil {
		return fmt.Errorf("kernel %s: %w (krun-core boots a bzImage: arch/x86/boot/bzImage, /boot/vmlinuz-*)", cli.Printable(path), err)
	}
	return nil
}
