package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/sandbox"
)

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

const runSynopsis = `usage: krun-core run --kernel FILE [options]

Boots a Linux guest on KVM with krun-core's minimal core (vCPUs, guest RAM,
a serial console on stdin/stdout, virtio-mmio). Every device is served
over vhost-user: by a sandboxed plugin that krun-core starts (--disk, --fs,
--net, --plugin), or by an external back-end that krun-core connects to and
does not sandbox (--vhost-user). Exits 0 when the guest powers off or
reboots; bad input is one line and exit status 1 before anything starts.

Device options (repeatable; at most 8 devices):
  --disk path=FILE,format=raw|qcow2[,readonly=on][,backing=FILE,backing-format=FMT...]
  --fs   path=DIR,tag=TAG[,readonly=on][,suid=on]
  --net  passt[,mac=52:54:00:12:34:56][,ports=8080:80,...][,mtu=N]
  --plugin KIND[,key=value...]       any installed krun-plugin-KIND
  --vhost-user type=blk|fs|net|TYPE_ID,socket=PATH[,queues=N][,queue-size=N][,tag=TAG]
                                     an external back-end (qemu-storage-daemon,
                                     virtiofsd, vhost-device-*, krun-core serve)`

// runCommand boots a guest: krun-core run --kernel FILE [--initrd FILE]
// [--cmdline STR] [--cpus N] [--memory SIZE] [--disk SPEC]... It exits 0
// when the guest powers off or reboots.
func runCommand(args []string, stdout, stderr io.Writer) int {
	fs := newCmdFlags("krun-core run", runSynopsis)
	var (
		kernel    = fs.String("kernel", "", "the Linux bzImage `FILE` to boot (required)")
		initrd    = fs.String("initrd", "", "initramfs or initrd `FILE`")
		cmdline   = fs.String("cmdline", vmm.DefaultCmdline, "kernel command `LINE`")
		cpus      = fs.Int("cpus", vmm.DefaultCPUs, "`N` vCPUs")
		memory    = fs.String("memory", strconv.Itoa(vmm.DefaultMemoryMiB)+"M", "guest RAM `SIZE` (512M, 2G; a bare number is MiB)")
		pluginDir = fs.String("plugin-dir", "", "look for krun-plugin-* in `DIR` first (then in $KRUN_PLUGIN_DIR, then next to krun-core)")
		sandboxF  = fs.String("sandbox", "on", "the plugin sandbox `MODE`: on, or off (an explicit opt-out, with a warning)")
		disableF  = fs.String("sandbox-disable", "", "turn off some sandbox `LAYERS`: namespaces,root,landlock,seccomp or all")
		timing    = fs.Bool("timing", false, "print start-up timing and the core's memory use to stderr at exit")
		marker    = fs.String("boot-marker", "", "console `TEXT` whose first appearance marks the guest's init (for --timing)")
		bootTO    = secondsFlag(vmm.DefaultBootTimeout)
		disks     multiFlag
		shares    multiFlag
		nets      multiFlag
		plugins   multiFlag
		externals multiFlag
	)
	fs.Var(&disks, "disk", "a disk `SPEC` (above), served by krun-plugin-blk-raw or krun-plugin-blk-qcow2")
	fs.Var(&shares, "fs", "a shared directory `SPEC` (above), served by krun-plugin-fs-virtio")
	fs.Var(&nets, "net", "a network `SPEC` (above): passt, served by krun-plugin-net-passt")
	fs.Var(&plugins, "plugin", "a third-party plugin `SPEC` (above): any installed krun-plugin-KIND, options passed as given")
	fs.Var(&externals, "vhost-user", "an external vhost-user back-end `SPEC` (above), not sandboxed by krun-core")
	fs.Var(&bootTO, "boot-timeout", "end a guest that shows no sign of life (no console output, no device access) for this `DURATION` after it starts (90s, 2m; a bare number is seconds; 0 turns the watchdog off)")
	if rc, done := fs.parse(args, stdout, stderr); done {
		return rc
	}
	fail := func(format string, a ...any) int { return fs.failf(stderr, format, a...) }
	if fs.NArg() > 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *kernel == "" {
		return fail("--kernel is required")
	}
	mem, err := parseMemory(*memory)
	if err != nil {
		return fail("--memory: %v", err)
	}
	var sandboxOff bool
	switch *sandboxF {
	case "on":
	case "off":
		sandboxOff = true
	default:
		return fail("--sandbox must be on or off, not %q", *sandboxF)
	}
	disabled, err := sandbox.ParseLayers(*disableF)
	if err != nil {
		return fail("--sandbox-disable: %v", err)
	}
	if sandboxOff && len(disabled) > 0 {
		return fail("--sandbox=off already turns every layer off; drop --sandbox-disable")
	}
	log, err := fs.logger(stderr)
	if err != nil {
		return fail("%v", err)
	}

	c := vmm.NewContext(log)
	if err := c.SetVMConfig(*cpus, mem); err != nil {
		return fail("%v", err)
	}
	if err := c.SetKernel(*kernel, *initrd, *cmdline); err != nil {
		return fail("%v", err)
	}
	for _, group := range []struct {
		flag   string
		values []string
	}{{"disk", disks}, {"fs", shares}, {"net", nets}, {"plugin", plugins}, {"vhost-user", externals}} {
		for _, v := range group.values {
			s, err := devspec.Parse(group.flag, v)
			if err != nil {
				return fail("--%s %s: %v", group.flag, v, err)
			}
			if err := c.AddDevice(s); err != nil {
				return fail("%v", err)
			}
		}
	}
	c.SetConsoleOutput(stdout)
	c.SetPluginDir(*pluginDir)
	c.SetSandboxOff(sandboxOff)
	c.SetSandboxDisable(disabled)
	if sandboxOff {
		fmt.Fprintln(stderr, "krun-core run: warning: --sandbox=off: plugins parse guest- and image-controlled bytes unconfined")
	}
	c.SetBootMarker(*marker)
	if err := c.SetBootTimeout(time.Duration(bootTO)); err != nil {
		return fail("--boot-timeout: %v", err)
	}
	// Before anything starts: the files, plugins and back-end sockets
	// named, then a host whose KVM cannot boot a stock kernel (none, or
	// kvm_pvm) gets one line now instead of a silent hang.
	if err := c.Validate(); err != nil {
		return fail("%s", oneLine(err.Error()))
	}
	if err := kvm.CheckHost(); err != nil {
		return fail("%v", err)
	}
	if restore, ok := rawTerminal(os.Stdin); ok {
		defer restore()
	}
	c.SetConsoleInput(os.Stdin)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := c.Start(ctx)
	if *timing && res != nil {
		t := res.Timing
		fmt.Fprintf(stderr, "krun-core timing: plugins %.1f ms, vm-setup %.1f ms, ready %.1f ms, kernel-boot %.1f ms, total %.1f ms, core-rss %d KiB\n",
			msec(t.PluginStart), msec(t.VMSetup), msec(t.Ready), msec(t.KernelBoot), msec(t.Total), res.CoreRSS>>10)
	}
	if err != nil {
		return fail("%s", oneLine(err.Error()))
	}
	for _, derr := range res.DeviceErrors {
		log.Warn("device failed while the guest ran", "error", derr)
	}
	log.Debug("guest ended", "reason", res.Reason.String())
	return 0
}

func msec(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// secondsFlag is a duration flag that also takes a bare number of seconds.
type secondsFlag time.Duration

func (d *secondsFlag) String() string { return time.Duration(*d).String() }
func (d *secondsFlag) Set(s string) error {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		*d = secondsFlag(time.Duration(n) * time.Second)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration (90s, 2m, or a number of seconds)", s)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative", s)
	}
	*d = secondsFlag(v)
	return nil
}

// parseMemory reads --memory: a size with a suffix, or a bare number of
// MiB. The result is in MiB.
func parseMemory(s string) (uint64, error) {
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		return n, nil
	}
	b, err := devspec.ParseSize(s)
	if err != nil {
		return 0, err
	}
	if b%(1<<20) != 0 {
		return 0, fmt.Errorf("%s is not a whole number of MiB", s)
	}
	return uint64(b >> 20), nil
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// rawTerminal puts a terminal on stdin into raw mode (keeping signals, so
// ^C still stops krun-core) and returns how to restore it.
func rawTerminal(f *os.File) (func(), bool) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, false
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.IEXTEN
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, false
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, true
}
