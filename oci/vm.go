package oci

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/guest/container"
)

// VM is what the monitor drives: a guest that boots, waits for Start,
// runs the command and ends. The real one is a krun-core VM (NewVM);
// tests substitute their own.
type VM interface {
	// Boot starts the VM and returns once the guest waits for Start, or
	// with the reason it never will.
	Boot(ctx context.Context) error
	// Start releases the command.
	Start() error
	// Signal sends sig to the command.
	Signal(sig unix.Signal) error
	// SignalAll sends sig to every process of the container: the
	// command, exec'd processes and what they started.
	SignalAll(sig unix.Signal) error
	// Resize sets the command's terminal size.
	Resize(rows, cols uint16) error
	// Exec starts p in the running guest; status receives its exit
	// status byte (see vmm.Context.Exec).
	Exec(p *container.Process, stdin, stdout, stderr, status *os.File) (uint32, error)
	ExecSignal(id uint32, sig unix.Signal) error
	ExecResize(id uint32, rows, cols uint16) error
	// Exited is closed once the command's exit status is known or the
	// guest has ended (its devices may still be shutting down).
	Exited() <-chan struct{}
	// Wait waits for the VM to end and returns the command's exit
	// status; ok is false when the guest reported none.
	Wait() (status int, ok bool, err error)
	// Stop ends the VM now.
	Stop()
}

// Stdio is the container's standard I/O as the monitor holds it.
type Stdio struct {
	Stdin, Stdout, Stderr *os.File
	TTY                   bool
}

// VMFactory makes the VM of a plan.
type VMFactory func(p *Plan, io Stdio, cfg RuntimeConfig, log hclog.Logger) (VM, error)

// RuntimeConfig is what the runtime's own flags and environment say
// about VMs (not the container's config).
type RuntimeConfig struct {
	Kernel    string // "" finds one (vmm.FindKernel)
	PluginDir string // "" looks next to the executable
	// BootTimeout is the boot watchdog (0: vmm's default).
	BootTimeout time.Duration
	// PluginUID, PluginGID are the host ids the plugins run as (0: the
	// sandbox's default). The root file system and the shares are used
	// with their rights.
	PluginUID, PluginGID int
	// Verbose boots the guest kernel without "quiet" (--debug): its
	// messages and krun-init's go to the debug log.
	Verbose bool
}

// NewVM makes a krun-core VM for the plan: the root and each share a
// virtio-fs plugin, the stdio console plugin, passt when the plan has a
// network, krun-init with the container setup.
func NewVM(p *Plan, sio Stdio, cfg RuntimeConfig, log hclog.Logger) (VM, error) {
	c := vmm.NewContext(log)
	if err := c.SetVMConfig(p.CPUs, p.MemoryMiB); err != nil {
		return nil, err
	}
	if cfg.Kernel != "" {
		if err := c.SetKernel(cfg.Kernel, "", ""); err != nil {
			return nil, err
		}
	}
	if cfg.PluginDir != "" {
		c.SetPluginDir(cfg.PluginDir)
	} else if exe, err := os.Executable(); err == nil {
		c.SetPluginDir(filepath.Dir(exe))
	}
	c.SetPluginIDs(cfg.PluginUID, cfg.PluginGID)
	if cfg.Verbose {
		c.SetCmdline(strings.Replace(vmm.ExecCmdline, " quiet", "", 1))
	}
	if cfg.BootTimeout > 0 {
		if err := c.SetBootTimeout(cfg.BootTimeout); err != nil {
			return nil, err
		}
	}
	if err := c.SetRoot(p.Root, p.RootReadOnly); err != nil {
		return nil, err
	}
	if err := c.SetExec(p.Process.Args[0], p.Process.Args, nil); err != nil {
		return nil, err
	}
	// The config's environment exactly, without krun-core's defaults.
	c.SetEnv(p.Process.Env)
	if err := c.SetWorkdir(p.Process.Cwd); err != nil {
		return nil, err
	}
	var limits []string
	for _, r := range p.Process.Rlimits {
		limits = append(limits, r.String())
	}
	if err := c.SetRlimits(limits); err != nil {
		return nil, err
	}
	if p.Hostname != "" {
		if err := c.SetHostname(p.Hostname); err != nil {
			return nil, err
		}
	}
	c.SetUser(p.Process.UID, p.Process.GID, p.Process.AdditionalGIDs)
	c.SetLookup(p.LookupOnHost)
	c.SetStdio(sio.Stdin, sio.Stdout, sio.Stderr, sio.TTY)
	if sio.TTY && p.Process.Rows > 0 && p.Process.Cols > 0 {
		c.SetWinsize(p.Process.Rows, p.Process.Cols)
	}
	for _, s := range p.Shares {
		// Container file systems keep their set-id bits, as they do
		// under runc: the guest is the container.
		fs := &devspec.FSSpec{Path: s.Path, Tag: s.Tag, ReadOnly: s.ReadOnly, PluginOptions: map[string]string{"suid": "on"}, OpenFiles: p.OpenFiles}
		if err := c.AddDevice(fs); err != nil {
			return nil, err
		}
	}
	c.SetRootOptions(map[string]string{"suid": "on"})
	if err := c.SetRootOpenFiles(p.OpenFiles); err != nil {
		return nil, err
	}
	switch {
	case p.Net.Mode == NetNone:
	case !hasRoutableInterface():
		// A namespace with only its loopback (podman --network none):
		// passt would have nothing to serve, and the guest gets no
		// network device.
		log.Debug("no interface with an address in the network namespace: the guest gets no network")
	case p.Net.Mode == NetNew && reservedDevices+len(p.Shares)+1 > vmm.MaxDevices:
		// Translate counted no device for a namespace that might stay
		// empty; the hooks configured it, but the bind mounts took
		// every device.
		log.Warn("the network namespace was configured, but the bind mounts take every device of the VM: the guest gets no network",
			"shares", len(p.Shares), "devices", vmm.MaxDevices)
	default:
		if (p.Net.Mode == NetNS || p.Net.Mode == NetNew) && slices.Contains(p.Net.PasstArgs, "all") {
			// passt listens on every port of the namespace: a
			// socket per port, protocol and address family, far
			// beyond a default open-file limit of 1024 or 4096.
			raiseNofile(log)
		}
		if err := c.AddDevice(&devspec.NetSpec{Backend: "passt", PasstArgs: p.Net.PasstArgs}); err != nil {
			return nil, err
		}
	}
	setup := p.Setup
	setup.WaitForStart = true
	if err := c.SetContainer(&setup); err != nil {
		return nil, err
	}
	return &krunVM{c: c, log: log, done: make(chan struct{})}, nil
}

// passtNofile is the open-file limit passt is given when it forwards every
// port of a namespace (TCP and UDP, IPv4 and IPv6, plus its own files).
const passtNofile = 1 << 18

// raiseNofile raises this process's open-file limit, which passt
// inherits, to passtNofile where it is lower: the hard limit too where the
// process may (root), up to fs.nr_open. It always sets the limit through
// package syscall, which keeps Go from giving the processes it starts the
// soft limit this process was born with.
func raiseNofile(log hclog.Logger) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return
	}
	want := uint64(passtNofile)
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < want {
			want = n
		}
	}
	if r.Max < want {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}); err == nil {
			return
		}
		want = r.Max // not allowed to raise the hard limit
	}
	if r.Cur < want {
		r.Cur = want
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		log.Warn("cannot raise the open-file limit for passt", "error", err)
	}
}

// hasRoutableInterface reports whether the current network namespace has
// an interface that is up, not the loopback, with an address.
func hasRoutableInterface() bool {
	ifs, err := net.Interfaces()
	if err != nil {
		return false
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		if addrs, err := ifc.Addrs(); err == nil && len(addrs) > 0 {
			return true
		}
	}
	return false
}

// krunVM drives a vmm.Context.
type krunVM struct {
	c    *vmm.Context
	log  hclog.Logger
	done chan struct{} // closed when Start returned

	mu     sync.Mutex
	res    *vmm.Result
	err    error
	cancel context.CancelFunc
}

func (v *krunVM) Boot(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(context.Background())
	v.cancel = cancel
	go func() {
		res, err := v.c.Start(runCtx)
		logConsoleTail(v.log, res, err)
		if res != nil && res.OutputError != nil {
			// The runtime's log, as vmm logged it before it
			// became the result's.
			v.log.Warn("the command's output", "error", res.OutputError)
		}
		v.mu.Lock()
		v.res, v.err = res, err
		v.mu.Unlock()
		close(v.done)
	}()
	select {
	case <-v.c.Ready():
		return nil
	case <-v.done:
		_, _, err := v.Wait()
		if err == nil {
			err = errors.New("the guest ended before the container was ready (--log keeps its console's last lines; --debug all of it)")
		}
		return err
	case <-ctx.Done():
		v.Stop()
		return fmt.Errorf("the guest did not get ready: %w", ctx.Err())
	}
}

// logConsoleTail logs, as warnings, the last lines of the guest's console
// when the guest ended on its own without reporting the command's status:
// with "quiet" they are what the kernel or krun-init said before it ended
// (a panic), which the log otherwise has only with --debug. A VM that
// krun-oci stopped (kill of a created container, delete) or that failed
// otherwise (a device, the boot watchdog: the error says so) logs
// nothing here.
func logConsoleTail(log hclog.Logger, res *vmm.Result, err error) {
	if res == nil || res.HasExitStatus || err != nil {
		return
	}
	if len(res.ConsoleTail) == 0 {
		log.Warn("the guest ended without reporting the command's exit status; its console was empty", "reason", res.Reason.String())
		return
	}
	log.Warn("the guest ended without reporting the command's exit status; the last lines of its console follow", "reason", res.Reason.String())
	for _, l := range res.ConsoleTail {
		log.Warn("guest console| " + l)
	}
}

func (v *krunVM) Start() error                                { return v.c.StartCommand() }
func (v *krunVM) Signal(sig unix.Signal) error                { return v.c.Signal(sig) }
func (v *krunVM) SignalAll(sig unix.Signal) error             { return v.c.SignalAll(sig) }
func (v *krunVM) Resize(rows, cols uint16) error              { return v.c.Resize(rows, cols) }
func (v *krunVM) ExecSignal(id uint32, sig unix.Signal) error { return v.c.ExecSignal(id, sig) }
func (v *krunVM) ExecResize(id uint32, rows, cols uint16) error {
	return v.c.ExecResize(id, rows, cols)
}

func (v *krunVM) Exec(p *container.Process, stdin, stdout, stderr, status *os.File) (uint32, error) {
	return v.c.Exec(p, stdin, stdout, stderr, status)
}

// Exited merges the status report, the end of the guest (a crash: its
// devices then still shut down, and the container is stopped meanwhile)
// and the end of the VM.
func (v *krunVM) Exited() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		select {
		case <-v.c.Exited():
		case <-v.c.Ended():
		case <-v.done:
		}
		close(ch)
	}()
	return ch
}

func (v *krunVM) Wait() (int, bool, error) {
	<-v.done
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.res == nil {
		return 0, false, v.err
	}
	return v.res.ExitStatus, v.res.HasExitStatus, v.err
}

func (v *krunVM) Stop() {
	if v.cancel != nil {
		v.cancel()
	}
}
