package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/acpi"
	"github.com/krun-core/krun-core/core/boot"
	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/serial"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/sandbox"
)

// Guest resources of the plugin devices: device i has its register window
// at MMIOBase + i*MMIOStride and interrupt FirstDeviceGSI + i.
const (
	MMIOBase       = 0xd000_0000
	MMIOStride     = 0x1000
	FirstDeviceGSI = 16
)

// event is what ends a run.
type event struct {
	reason ExitReason
	err    error
}

// machine is one VM being built and run.
type machine struct {
	log hclog.Logger

	vm *kvm.VM
	// testWiring replaces vm's ioeventfds and irqfds in tests without KVM.
	testWiring mmio.Wiring
	memFile    *os.File
	mem        *guestmem.Memory
	ram        []boot.RAMRange
	vcpus      []*kvm.VCPU
	uart       *serial.UART
	power      power
	devices    []*pluginDevice

	events chan event
	stop   atomic.Bool
	// alive is set by the first port or MMIO access of the guest: the
	// boot watchdog's sign of life.
	alive   atomic.Bool
	status  statusPorts
	tids    []atomic.Int32
	running sync.WaitGroup
	// readInput replaces unix.Read for the console input's pump in
	// tests (a read that blocks although poll said the input was ready).
	readInput func(fd int, p []byte) (int, error)
}

// Start builds the VM and runs it until the guest powers off or reboots
// (both are a normal end), ctx is cancelled, or the VM fails. On a host
// whose KVM cannot boot a stock kernel (kvm.CheckHost) the error wraps
// kvm.ErrNoKVM and nothing is started.
func (c *Context) Start(ctx context.Context) (res *Result, err error) {
	if c.started {
		return nil, errors.New("vmm: a Context runs one VM")
	}
	c.started = true
	if c.exec != nil {
		defer func() {
			// A plugin left running after SIGKILL may hold the
			// output pipes' write ends for good.
			var bound time.Duration
			if c.pluginsLeft.Load() {
				bound = abandonWait
			}
			if oerr := c.exec.close(bound); oerr != nil {
				if res != nil {
					res.OutputError = oerr
				} else {
					c.log.Warn("the command's output", "error", oerr)
				}
			}
		}()
		if err := c.prepareExec(); err != nil {
			return nil, err
		}
	} else if err := c.checkNoMounts(); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := kvm.CheckHost(); err != nil {
		return nil, err
	}
	sys, err := kvm.Open()
	if err != nil {
		return nil, err
	}
	defer sys.Close()

	m := &machine{log: c.log, events: make(chan event, 1)}
	m.status.notify = &c.notify
	defer m.close()

	// Plugins start in the background while the VM is built.
	type launched struct {
		devs []*pluginDevice
		took time.Duration
		err  error
	}
	plugc := make(chan launched, 1)
	go func() {
		devs, err := c.launchPlugins(ctx)
		plugc <- launched{devs, time.Since(t0), err}
	}()
	collect := func() launched {
		l := <-plugc
		m.devices = l.devs
		return l
	}

	loaded, err := c.build(m, sys)
	if err != nil {
		if l := collect(); l.err == nil {
			m.shutdownDevices()
		}
		return nil, err
	}
	setup := time.Since(t0)
	l := collect()
	if l.err != nil {
		return nil, l.err
	}
	t1 := time.Now()
	if err := m.attachDevices(); err != nil {
		return nil, err
	}
	setup += time.Since(t1)
	if !c.keepPrivileges {
		c.dropPrivileges()
	}
	m.log.Debug("kernel loaded", "entry", fmt.Sprintf("%#x", loaded.Entry), "initrd", fmt.Sprintf("%#x", loaded.InitrdAddr))

	res = &Result{Timing: Timing{PluginStart: l.took, VMSetup: setup}}
	ready := time.Now()
	res.Timing.Ready = ready.Sub(t0)
	marker := &markerWriter{w: c.consoleOut, marker: []byte(c.bootMarker)}
	m.uart.SetOutput(marker)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if c.consoleIn != nil {
		defer m.startInputPump(runCtx, cancel, c.consoleIn)()
	}
	for _, d := range m.devices {
		d.startMonitor(runCtx)
	}
	m.tids = make([]atomic.Int32, len(m.vcpus))
	for i := range m.vcpus {
		m.running.Add(1)
		go m.runVCPU(i)
	}
	ev := m.wait(ctx, c.bootTimeout)
	end := time.Now()
	c.guestEnded()
	res.CoreRSS = coreRSS()
	m.stopVCPUs()
	cancel()
	res.Timing.Total = end.Sub(t0)
	if at := marker.seenAt(); !at.IsZero() {
		res.Timing.KernelBoot = at.Sub(ready)
	}
	initAt, execAt, exitAt := at(m.status.initAt.Load()), at(m.status.execAt.Load()), at(m.status.exitAt.Load())
	if !initAt.IsZero() {
		res.Timing.KernelBoot = since(ready, initAt)
	}
	res.Timing.InitToExec = since(initAt, execAt)
	res.Timing.Command = since(execAt, exitAt)
	res.ExitStatus, res.HasExitStatus = m.status.exitStatus()
	if c.consoleTail != nil {
		res.ConsoleTail = c.consoleTail.lines()
	}
	for _, d := range m.devices {
		if err := d.dev.Failed(); err != nil {
			res.DeviceErrors = append(res.DeviceErrors, err)
		}
	}
	if err := m.uart.OutputError(); err != nil {
		m.log.Warn("console output failed", "error", err)
	}
	if ev.err != nil {
		if errors.Is(ev.err, ErrEssentialDevice) && res.HasExitStatus {
			// The command reported its status before the failure was
			// acted on (the OnFail check above it lost the race): the
			// status stands, for run and krun-oci alike.
			m.log.Debug("device failed after the command exited", "error", ev.err)
			return res, nil
		}
		return res, ev.err
	}
	res.Reason = ev.reason
	return res, nil
}

// dropPrivileges ends the set-up: from here on the core needs no
// privilege for KVM_RUN, eventfds, guest memory, vhost-user or gRPC (all on
// descriptors it holds), nor to signal or stop its plugins (it created their
// user namespaces, which gives it every capability in them); it keeps what
// passt and launching plugins again need (devspec.KeepCapabilities).
// A failure (a binary linked with cgo) is a warning: the VM runs as it
// would have.
func (c *Context) dropPrivileges() {
	keep := devspec.KeepCapabilities(sandbox.LaunchConfig{Disable: c.sandboxDisable}, c.devices)
	if err := sandbox.DropPrivileges(keep); err != nil {
		c.log.Warn("the core keeps its privileges after set-up", "error", err)
		return
	}
	c.log.Debug("privileges dropped after set-up", "no_new_privs", true,
		"capabilities", sandbox.CapabilityNames(sandbox.HeldCapabilities(keep)))
}

// wait returns the event that ends the run: the guest's, the context's, or
// the boot watchdog's when the guest shows no sign of life within
// bootTimeout (0: no watchdog).
func (m *machine) wait(ctx context.Context, bootTimeout time.Duration) event {
	var watchdog <-chan time.Time
	if bootTimeout > 0 {
		t := time.NewTimer(bootTimeout)
		defer t.Stop()
		watchdog = t.C
	}
	for {
		select {
		case ev := <-m.events:
			return ev
		case <-ctx.Done():
			return event{err: ctx.Err()}
		case <-watchdog:
			if m.alive.Load() {
				watchdog = nil // the guest is booting: the watchdog's job is done
				continue
			}
			return event{err: fmt.Errorf("%w: the guest showed no sign of life (no console output, no device access) within %v of starting; "+
				"check that the kernel is an x86-64 bzImage that boots on this host's KVM (--boot-timeout 0 turns this off)", ErrBootTimeout, bootTimeout)}
		}
	}
}

// build creates the VM, its memory and vCPUs, and loads the kernel.
func (c *Context) build(m *machine, sys *kvm.System) (*boot.Loaded, error) {
	if c.cpus > sys.MaxVCPUs() {
		return nil, fmt.Errorf("%w: %d vCPUs, this host's KVM allows %d", ErrConfig, c.cpus, sys.MaxVCPUs())
	}
	vm, err := sys.CreateVM()
	if err != nil {
		return nil, err
	}
	m.vm = vm
	if err := m.setupMemory(c.memoryMiB << 20); err != nil {
		return nil, err
	}
	m.uart = serial.New(io.Discard, func(level bool) {
		if err := vm.IRQLine(serial.COM1IRQ, level); err != nil {
			m.log.Warn("serial interrupt", "error", err)
		}
	})
	m.power.event = m.event

	devs := make([]acpi.MMIODevice, len(c.devices))
	for i := range devs {
		devs[i] = acpi.MMIODevice{Base: MMIOBase + uint64(i)*MMIOStride, Size: mmio.Size, GSI: FirstDeviceGSI + uint32(i)}
	}
	tables, _, err := acpi.Build(acpi.Config{CPUs: c.cpus, Devices: devs}, boot.ACPIAddr)
	if err != nil {
		return nil, err
	}
	if len(tables) > boot.ACPISize {
		return nil, fmt.Errorf("ACPI tables of %d bytes do not fit %d", len(tables), boot.ACPISize)
	}
	if err := m.mem.Write(boot.ACPIAddr, tables); err != nil {
		return nil, fmt.Errorf("write ACPI tables: %w", err)
	}

	cmdline := c.cmdline
	if !hasParam(cmdline, "pci") {
		// There is no PCI bus: without this Linux spends seconds probing
		// config space through port I/O (every access is a VM exit).
		cmdline += " pci=off"
	}
	if c.mmioCmdline {
		for _, d := range devs {
			cmdline += fmt.Sprintf(" virtio_mmio.device=%d@%#x:%d", d.Size, d.Base, d.GSI)
		}
	}
	kf, err := os.Open(c.kernelPath)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	defer kf.Close()
	kst, err := kf.Stat()
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	cfg := boot.Config{Kernel: kf, KernelSize: kst.Size(), Cmdline: cmdline, RAM: m.ram, RSDP: boot.ACPIAddr}
	if c.initrdData != nil {
		cfg.Initrd, cfg.InitrdSize = c.initrdData, c.initrdSize
	} else if c.initrdPath != "" {
		inf, err := os.Open(c.initrdPath)
		if err != nil {
			return nil, fmt.Errorf("initrd: %w", err)
		}
		defer inf.Close()
		ist, err := inf.Stat()
		if err != nil {
			return nil, fmt.Errorf("initrd: %w", err)
		}
		cfg.Initrd, cfg.InitrdSize = inf, ist.Size()
	}
	loaded, err := boot.Load(m.mem, cfg)
	if err != nil {
		return nil, fmt.Errorf("load kernel %s: %w", c.kernelPath, err)
	}
	if err := m.setupVCPUs(sys, c.cpus, loaded.Entry); err != nil {
		return nil, err
	}
	return loaded, nil
}

// setupMemory creates guest RAM as one memfd (so plugins can map it),
// mapped around the MMIO hole and registered with KVM.
func (m *machine) setupMemory(size uint64) error {
	f, err := guestmem.NewMemfd("krun-guest-ram", size)
	if err != nil {
		return err
	}
	m.memFile = f
	if err := guestmem.SealSize(f); err != nil {
		return err
	}
	m.ram = boot.RAMLayout(size)
	regions := make([]guestmem.Region, len(m.ram))
	var off uint64
	for i, r := range m.ram {
		regions[i] = guestmem.Region{GuestAddr: guestmem.Addr(r.Start), Size: r.Size, File: f, Offset: off}
		off += r.Size
	}
	if m.mem, err = guestmem.Map(regions); err != nil {
		return err
	}
	for i, r := range m.mem.Regions() {
		b, err := m.mem.Slice(r.GuestAddr, r.Size)
		if err != nil {
			return err
		}
		// Transparent huge pages where the host allows them for shared
		// memory (shmem_enabled = advise): KVM then maps guest RAM with
		// 2 MiB pages, far fewer faults and TLB misses.
		if err := unix.Madvise(b, unix.MADV_HUGEPAGE); err != nil {
			m.log.Debug("MADV_HUGEPAGE on guest RAM", "error", err)
		}
		if err := m.vm.SetMemory(uint32(i), uint64(r.GuestAddr), r.Size, kvm.HostAddr(b)); err != nil {
			return err
		}
	}
	return nil
}

// hostAddr translates a guest range to the core's virtual address: the
// "user address" the plugins' memory tables use.
func (m *machine) hostAddr(gpa, size uint64) (uint64, error) {
	b, err := m.mem.Slice(guestmem.Addr(gpa), size)
	if err != nil {
		return 0, err
	}
	if size == 0 {
		return 0, fmt.Errorf("empty range at %#x", gpa)
	}
	return uint64(kvm.HostAddr(b)), nil
}

func (m *machine) setupVCPUs(sys *kvm.System, n int, entry uint64) error {
	supported, err := sys.SupportedCPUID()
	if err != nil {
		return err
	}
	deadline, _ := sys.CheckExtension(kvm.CapTSCDeadline)
	for i := 0; i < n; i++ {
		v, err := m.vm.CreateVCPU(i)
		if err != nil {
			return err
		}
		m.vcpus = append(m.vcpus, v)
		if err := v.SetCPUID(kvm.CPUIDFor(supported, i, n, deadline > 0)); err != nil {
			return err
		}
		if err := v.SetMSRs(kvm.BootMSRs()); err != nil {
			// Not fatal: a nested or older KVM may refuse one of them.
			m.log.Warn("initial MSRs", "vcpu", i, "error", err)
		}
		lapic, err := v.LAPIC()
		if err != nil {
			return err
		}
		kvm.SetLINT(&lapic)
		if err := v.SetLAPIC(lapic); err != nil {
			return err
		}
		if err := v.SetFPU(kvm.BootFPU()); err != nil {
			return err
		}
		if i != 0 {
			continue // application processors wait for INIT/SIPI in KVM
		}
		sregs, err := v.Sregs()
		if err != nil {
			return err
		}
		boot.LongModeSregs(&sregs)
		if err := v.SetSregs(sregs); err != nil {
			return err
		}
		if err := v.SetRegs(boot.EntryRegs(entry)); err != nil {
			return err
		}
	}
	return nil
}

// event records the first event that ends the run.
func (m *machine) event(ev event) {
	select {
	case m.events <- ev:
	default:
	}
}

func (m *machine) runVCPU(i int) {
	defer m.running.Done()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	m.tids[i].Store(int32(unix.Gettid()))
	defer m.tids[i].Store(0) // no stray kicks once the thread is back in the pool
	v := m.vcpus[i]
	for !m.stop.Load() {
		reason, err := v.Run()
		if errors.Is(err, kvm.ErrInterrupted) {
			continue
		}
		if err != nil {
			m.event(event{err: err})
			return
		}
		if err := m.handleExit(v, reason); err != nil {
			if !errors.Is(err, errVCPUDone) {
				m.event(event{err: fmt.Errorf("vCPU %d: %w", i, err)})
			}
			return
		}
	}
}

// errVCPUDone is handleExit's word that the guest ended on this vCPU (a
// triple fault, a shutdown or reset event): its event is sent, and the
// vCPU runs the guest no more. Entered again after a triple fault, it
// would fault again at once, each exit a log line, until the machine
// stopped it (found in review).
var errVCPUDone = errors.New("the guest ended on this vCPU")

func (m *machine) handleExit(v *kvm.VCPU, reason uint32) error {
	if (reason == kvm.ExitIO || reason == kvm.ExitMMIO) && !m.alive.Load() {
		m.alive.Store(true)
	}
	switch reason {
	case kvm.ExitIO:
		e, err := v.IO()
		if err != nil {
			return err
		}
		size := int(e.Size)
		for off := 0; off+size <= len(e.Data); off += size {
			m.pio(e.Port, e.Out, e.Data[off:off+size])
		}
	case kvm.ExitMMIO:
		e, err := v.MMIO()
		if err != nil {
			return err
		}
		m.mmio(e.Addr, e.Write, e.Data)
	case kvm.ExitHLT, kvm.ExitIntr, kvm.ExitIRQWindowOpen:
	case kvm.ExitShutdown:
		// A triple fault. Linux's last reboot method ends up here; so
		// does a crash before the kernel has an IDT.
		// Where it happened, for whoever debugs the guest kernel: a
		// triple fault mid-boot is otherwise a silent end.
		args := []any{"vcpu", v.ID()}
		if r, err := v.Regs(); err == nil {
			args = append(args, "rip", fmt.Sprintf("%#x", r.RIP), "rsp", fmt.Sprintf("%#x", r.RSP))
		}
		if s, err := v.Sregs(); err == nil {
			args = append(args, "cr0", fmt.Sprintf("%#x", s.CR0), "cr2", fmt.Sprintf("%#x", s.CR2), "cr3", fmt.Sprintf("%#x", s.CR3))
		}
		m.log.Warn("guest triple fault: treated as reboot", args...)
		m.event(event{reason: ExitReboot})
		return errVCPUDone
	case kvm.ExitSystemEvent:
		switch t := v.SystemEvent(); t {
		case kvm.SystemEventShutdown:
			m.event(event{reason: ExitPowerOff})
			return errVCPUDone
		case kvm.SystemEventReset:
			m.event(event{reason: ExitReboot})
			return errVCPUDone
		default:
			return fmt.Errorf("guest system event %d (crash)", t)
		}
	case kvm.ExitFailEntry:
		return fmt.Errorf("KVM entry failed, hardware reason %#x", v.FailEntryReason())
	case kvm.ExitInternalError:
		return fmt.Errorf("KVM internal error, suberror %d", v.InternalError())
	default:
		return fmt.Errorf("unexpected KVM exit %d", reason)
	}
	return nil
}

// mmio dispatches an MMIO exit to the virtio-mmio window it hits; elsewhere
// reads are zero and writes are dropped.
func (m *machine) mmio(addr uint64, write bool, data []byte) {
	if addr >= MMIOBase {
		i := (addr - MMIOBase) / MMIOStride
		off := (addr - MMIOBase) % MMIOStride
		if i < uint64(len(m.devices)) && off < mmio.Size {
			d := m.devices[i].dev
			if write {
				d.Write(off, data)
			} else {
				d.Read(off, data)
			}
			return
		}
	}
	if !write {
		clear(data)
	}
}

// I/O ports the core emulates besides the UART.
const (
	portI8042Data    = 0x60
	portI8042Command = 0x64
	portCMOSIndex    = 0x70
	portCMOSData     = 0x71
	i8042Reset       = 0xfe
)

func (m *machine) pio(port uint16, out bool, data []byte) {
	if out && m.status.write(port, data) {
		return
	}
	switch {
	case port >= serial.COM1Base && port < serial.COM1Base+serial.NumPorts:
		for i := range data {
			p := uint8(int(port-serial.COM1Base) + i)
			if out {
				m.uart.Write(p, data[i])
			} else {
				data[i] = m.uart.Read(p)
			}
		}
	case port >= acpi.PM1aEventPort && port < acpi.PM1aControlPort+2:
		m.power.access(port, out, data)
	case port == acpi.ResetPort:
		if out && data[0] == acpi.ResetValue {
			m.log.Debug("ACPI reset register written")
			m.event(event{reason: ExitReboot})
		} else if !out {
			clear(data)
		}
	case port == portI8042Command:
		if out && data[0] == i8042Reset {
			m.log.Debug("i8042 reset")
			m.event(event{reason: ExitReboot})
		} else if !out {
			clear(data) // no data, input buffer empty
		}
	case port == portI8042Data, port == portCMOSData:
		if !out {
			clear(data)
		}
	default:
		if !out {
			for i := range data {
				data[i] = 0xff // nothing there
			}
		}
	}
}

func (m *machine) stopVCPUs() (stopped bool) {
	m.stop.Store(true)
	pid := unix.Getpid()
	kickAll := func() {
		for i, v := range m.vcpus {
			v.SetImmediateExit(true)
			if i < len(m.tids) {
				if tid := m.tids[i].Load(); tid != 0 {
					unix.Tgkill(pid, int(tid), unix.SIGURG)
				}
			}
		}
	}
	done := make(chan struct{})
	go func() { m.running.Wait(); close(done) }()
	kickAll()
	for tries := 0; ; tries++ {
		select {
		case <-done:
			return true
		case <-time.After(100 * time.Millisecond):
		}
		if tries == 10 {
			// A vCPU is stuck in a device call: cut the plugins off.
			for _, d := range m.devices {
				d.cutOff()
			}
		}
		if tries == 50 {
			m.log.Warn("vCPU threads did not stop; leaving them")
			return false
		}
		kickAll()
	}
}

// The serial console's input: a reader with a descriptor (an *os.File:
// the terminal, a pipe) is read only when poll says it has data, and its
// pump ends with the run at once (pumpFD); any other reader is read as it
// is, and its pump ends at its next read after the run ended
// (pumpReader).

// inputFD returns r's descriptor, if it has one (its mode is not changed:
// os.File.Fd would make it blocking).
func inputFD(r io.Reader) (int, bool) {
	sc, ok := r.(syscall.Conn)
	if !ok {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	fd := -1
	if rc.Control(func(f uintptr) { fd = int(f) }) != nil || fd < 0 {
		return 0, false
	}
	return fd, true
}

// inputPumpGrace bounds how long the run's end waits for a descriptor's
// input pump: it ends at once unless it is in read(2) on input that
// another reader of the same file took between its poll and its read.
const inputPumpGrace = time.Second

// startInputPump starts the console input's pump on r and returns what
// Start calls at its end: that cancels the run (cancel) and, for a
// descriptor, waits for the pump to end, so that no byte of the caller's
// input is read for a machine that is gone and the caller may close the
// file once Start returns. A pump that blocked in read (see
// inputPumpGrace) is left behind with a warning: Start must not hang
// until the user types.
func (m *machine) startInputPump(ctx context.Context, cancel context.CancelFunc, r io.Reader) (stop func()) {
	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		m.pumpInput(ctx, r)
	}()
	if _, ok := inputFD(r); !ok {
		return cancel
	}
	return func() {
		cancel()
		t := time.NewTimer(inputPumpGrace)
		defer t.Stop()
		select {
		case <-pumped:
		case <-t.C:
			m.log.Warn("console input: its pump waits in a read of the caller's input (another reader took what poll saw); the next bytes read there are lost to the caller")
		}
	}
}

// pumpInput feeds the guest's serial console from r until ctx ends.
func (m *machine) pumpInput(ctx context.Context, r io.Reader) {
	if fd, ok := inputFD(r); ok {
		m.pumpFD(ctx, fd)
		return
	}
	m.pumpReader(ctx, r)
}

// pumpFD feeds the console from descriptor fd: it waits in poll(2) for
// the input and for an eventfd that ctx's end signals, never in read(2),
// so nothing the caller types after the run is taken; the descriptor's
// flags are not changed (it may be the caller's terminal).
func (m *machine) pumpFD(ctx context.Context, fd int) {
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		m.log.Warn("console input off: no eventfd to end its pump with", "error", err)
		return
	}
	ended, signalled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(signalled)
		select {
		case <-ctx.Done():
			unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		case <-ended:
		}
	}()
	// The eventfd is closed only once nothing can write it any more: its
	// number may be another file's right after (found in review,
	// helper-105).
	defer func() {
		close(ended)
		<-signalled
		unix.Close(stop)
	}()
	read := unix.Read
	if m.readInput != nil {
		read = m.readInput
	}
	buf := make([]byte, 256)
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(stop), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			return
		}
		if fds[1].Revents != 0 || ctx.Err() != nil {
			return
		}
		if fds[0].Revents&unix.POLLNVAL != 0 {
			return
		}
		if fds[0].Revents == 0 {
			continue
		}
		n, err := read(fd, buf)
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if n <= 0 {
			return // end of input, or an error
		}
		if ctx.Err() != nil {
			// The run ended while the read waited (a pump left behind
			// after inputPumpGrace): the machine may be released, its
			// VM closed; the bytes go nowhere.
			return
		}
		if !m.receive(ctx, buf[:n]) {
			return
		}
	}
}

// pumpReader is pumpInput for a reader without a descriptor.
func (m *machine) pumpReader(ctx context.Context, r io.Reader) {
	buf := make([]byte, 256)
	for {
		n, err := r.Read(buf)
		if n > 0 && !m.receive(ctx, buf[:n]) {
			return
		}
		if err != nil || ctx.Err() != nil {
			return
		}
	}
}

// receive hands p to the UART, waiting for room while the guest reads;
// false once ctx ended.
func (m *machine) receive(ctx context.Context, p []byte) bool {
	for len(p) > 0 {
		k := m.uart.Receive(p)
		p = p[k:]
		if len(p) == 0 {
			break
		}
		select {
		case <-m.uart.Drained():
		case <-ctx.Done():
			return false
		}
	}
	return true
}

func (m *machine) close() {
	stopped := m.stopVCPUs()
	m.shutdownDevices()
	if !stopped {
		// A vCPU thread is stuck outside KVM_RUN (a host write that
		// blocks: a console whose reader stopped reading). Unmapping
		// its kvm_run page and guest memory under it would crash the
		// process when it comes back (it reads the exit's data there),
		// and its fd's number could be another file's by then: they
		// stay until the last thread is out (found in review,
		// helper-97).
		m.log.Warn("vCPU memory and descriptors stay until the stuck vCPU threads return")
		go func() {
			m.running.Wait()
			m.release()
		}()
		return
	}
	m.release()
}

// release closes the vCPUs, the VM and guest memory: once no vCPU thread
// runs.
func (m *machine) release() {
	for _, v := range m.vcpus {
		v.Close()
	}
	if m.vm != nil {
		m.vm.Close()
	}
	if m.mem != nil {
		m.mem.Close()
	}
	if m.memFile != nil {
		m.memFile.Close()
	}
}

// hasParam reports whether the command line sets parameter name.
func hasParam(cmdline, name string) bool {
	for _, f := range strings.Fields(cmdline) {
		if f == name || strings.HasPrefix(f, name+"=") {
			return true
		}
	}
	return false
}

// markerWriter passes console output through and notes when marker first
// went by.
type markerWriter struct {
	w      io.Writer
	marker []byte
	mu     sync.Mutex
	match  int
	at     time.Time
}

func (w *markerWriter) Write(p []byte) (int, error) {
	if len(w.marker) > 0 {
		w.mu.Lock()
		if w.at.IsZero() {
			for _, b := range p {
				for w.match > 0 && w.marker[w.match] != b {
					// Fall back: restart the match (the markers used
					// here have no self-overlap worth tracking).
					w.match = 0
				}
				if w.marker[w.match] == b {
					w.match++
				}
				if w.match == len(w.marker) {
					w.at = time.Now()
					break
				}
			}
		}
		w.mu.Unlock()
	}
	return w.w.Write(p)
}

func (w *markerWriter) seenAt() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.at
}

// coreRSS is the process's resident memory without shared memory (guest
// RAM is a memfd, counted as RssShmem), from /proc/self/status.
func coreRSS() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	var total uint64
	for _, line := range strings.Split(string(b), "\n") {
		for _, key := range []string{"RssAnon:", "RssFile:"} {
			if rest, ok := strings.CutPrefix(line, key); ok {
				var kb uint64
				fmt.Sscanf(strings.TrimSpace(rest), "%d", &kb)
				total += kb << 10
			}
		}
	}
	return total
}
