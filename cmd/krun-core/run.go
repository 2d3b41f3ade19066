package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
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

// runCommand boots a guest: krun-core run --kernel FILE [--initrd FILE]
// [--cmdline STR] [--cpus N] [--memory SIZE] [--disk SPEC]... It exits 0
// when the guest powers off or reboots.
func runCommand(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("krun-core run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		kernel    = fs.String("kernel", "", "Linux bzImage to boot (required)")
		initrd    = fs.String("initrd", "", "initramfs / initrd image")
		cmdline   = fs.String("cmdline", vmm.DefaultCmdline, "kernel command line")
		cpus      = fs.Int("cpus", vmm.DefaultCPUs, "number of vCPUs")
		memory    = fs.String("memory", strconv.Itoa(vmm.DefaultMemoryMiB)+"M", "guest RAM (e.g. 512M, 2G; a bare number is MiB)")
		pluginDir = fs.String("plugin-dir", "", "directory searched first for krun-plugin-* executables")
		sandboxF  = fs.String("sandbox", "on", "plugin sandbox: on, or off (explicit opt-out)")
		disableF  = fs.String("sandbox-disable", "", "turn off some sandbox layers: namespaces,root,landlock,seccomp or all")
		logLevel  = fs.String("log-level", "warn", "log level: trace, debug, info, warn, error")
		timing    = fs.Bool("timing", false, "print start-up timing and the core's memory use to stderr at exit")
		marker    = fs.String("boot-marker", "", "console text whose first appearance marks the guest's init (for --timing)")
		pluginUID = fs.String("plugin-uid", "", "host uid plugins run as (root only; default 65534, never 0)")
		pluginGID = fs.String("plugin-gid", "", "host gid plugins run as (root only; default 65534, never 0)")
		disks     multiFlag
		shares    multiFlag
		nets      multiFlag
	)
	fs.Var(&disks, "disk", "disk: path=FILE,format=raw|qcow2[,readonly=on] (repeatable)")
	fs.Var(&shares, "fs", "shared directory: tag=TAG,path=DIR (repeatable)")
	fs.Var(&nets, "net", "network: passt options (repeatable)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 1
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "krun-core run: "+format+"\n", a...)
		return 1
	}
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
	level := hclog.LevelFromString(*logLevel)
	if level == hclog.NoLevel {
		return fail("unknown --log-level %q", *logLevel)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "krun-core", Level: level, Output: stderr})

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
	}{{"disk", disks}, {"fs", shares}, {"net", nets}} {
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
	uid, err := sandbox.ParseHostID(*pluginUID)
	if err != nil {
		return fail("--plugin-uid: %v", err)
	}
	gid, err := sandbox.ParseHostID(*pluginGID)
	if err != nil {
		return fail("--plugin-gid: %v", err)
	}
	if _, _, err := (sandbox.LaunchConfig{HostUID: uid, HostGID: gid}).PluginIDs(); err != nil {
		return fail("%v", err)
	}
	c.SetPluginIDs(uid, gid)
	if sandboxOff {
		fmt.Fprintln(stderr, "krun-core run: warning: --sandbox=off: plugins parse guest- and image-controlled bytes unconfined")
	}
	c.SetBootMarker(*marker)
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
		if errors.Is(err, kvm.ErrNoKVM) {
			return fail("%s is not available: this host cannot run KVM guests", kvm.DevicePath)
		}
		return fail("%s", oneLine(err.Error()))
	}
	for _, derr := range res.DeviceErrors {
		log.Warn("device failed while the guest ran", "error", derr)
	}
	log.Debug("guest ended", "reason", res.Reason.String())
	return 0
}

func msec(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

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
