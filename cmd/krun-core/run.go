package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/stdiopump"
	"github.com/krun-core/krun-core/sandbox"
)

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// Exit statuses of `krun-core run -- CMD` besides the program's own
// (documented in the README): krun-core's own failure, and a program that
// cannot be started (the shell's and podman's conventions).
const (
	exitRunFailed     = 125
	exitNotExecutable = 126
	exitNotFound      = 127
)

const runSynopsis = `usage: krun-core run --root DIR [options] -- CMD [ARGS...]
       krun-core run [--kernel FILE] [--initrd FILE] [--disk SPEC]... [options]

Boots a Linux guest on KVM with krun-core's minimal core (vCPUs, guest RAM,
virtio-mmio). With --root DIR -- CMD it runs CMD in a microVM whose root file
system is DIR and exits with CMD's status; otherwise it boots the kernel with
a serial console on stdin/stdout and exits 0 when the guest powers off or
reboots. Every device is served over vhost-user: by a sandboxed plugin that
krun-core starts (--disk, --fs, --net, --plugin), or by an external back-end
that krun-core connects to and does not sandbox (--vhost-user).

Bad input is one line on stderr and exit status 1 before anything starts;
with -- CMD, run's own failures exit 125 (126, 127: CMD is not executable,
not found), because CMD's own status is passed through. The log level is
warn, and error with -- CMD (krun-core shares its stderr with CMD), unless
--log-level is given.

Device options (repeatable; at most 8 devices, with --root 6 besides the
root and the console; a comma inside a value is written twice,
path=a,,b.img, as in QEMU):
  --disk path=FILE,format=raw|qcow2[,readonly=on][,backing=FILE,backing-format=FMT...]
         [,max-size=64G][,data-file=FILE][,queues=N]
  --fs   path=DIR,tag=TAG[,readonly=on][,suid=on][,mount=GUESTDIR][,uidmap=...][,gidmap=...]
         [,cache=SECONDS][,xattr=on|off][,workers=N][,open-files=N]
                                     (with --root: at GUESTDIR, default /mnt/TAG;
                                     the other keys: docs/VIRTIOFS.md)
  --net  passt[,mac=52:54:00:12:34:56][,ports=8080:80,...][,mtu=N][,passt-arg=A...]
  --plugin KIND[,key=value...][,file.NAME=PATH...][,file-rw.NAME=PATH...]
                                     any installed krun-plugin-KIND; krun-core opens
                                     each PATH (read-only, or read-write) and hands it
                                     to the plugin as file NAME
  --vhost-user type=blk|fs|net|TYPE_ID,socket=PATH[,queues=N][,queue-size=N][,tag=TAG][,reconnect=SECONDS]
                                     an external back-end (qemu-storage-daemon,
                                     virtiofsd, vhost-device-*, krun-core serve);
                                     reconnect= connects again every SECONDS when it
                                     goes away while the guest runs, and replays
                                     the requests it had in flight (not for fs)`

// runCommand boots a guest. With --root DIR -- CMD it runs CMD in a microVM
// whose root file system is DIR and exits with CMD's status; otherwise it
// boots --kernel (with --initrd, --disk ...) and exits 0 when the guest
// powers off or reboots.
func runCommand(args []string, stdout, stderr io.Writer) int {
	catchSIGPIPE()
	pipes := &outputPipes{}
	defer pipes.close()
	stdout, stderr = pipes.lock(stdout), pipes.lock(stderr)
	fs := cli.NewFlags("krun-core run", runSynopsis)
	var (
		kernel    = fs.String("kernel", "", "the Linux bzImage `FILE` to boot (default: $KRUN_KERNEL, /boot/vmlinuz-$(uname -r), then the kernel make kernel fetched)")
		initrd    = fs.String("initrd", "", "initramfs or initrd `FILE` (not with --root)")
		cmdline   = fs.String("cmdline", "", "kernel command `LINE` (default \""+vmm.DefaultCmdline+"\", with --root \""+vmm.ExecCmdline+"\")")
		cpus      = cli.DecimalInt(fs.FlagSet, "cpus", vmm.DefaultCPUs, 1, 255, "`N` vCPUs (1..255)")
		memory    = fs.String("memory", strconv.Itoa(vmm.DefaultMemoryMiB)+"M", "guest RAM `SIZE` (512M, 2G; a bare number is MiB)")
		pluginDir = fs.String("plugin-dir", "", "look for krun-plugin-* (and krun-init) in `DIR` first (then in $KRUN_PLUGIN_DIR, then next to krun-core)")
		sandboxF  = fs.String("sandbox", "on", "the plugin sandbox `MODE`: on, or off (an explicit opt-out, with a warning)")
		disableF  = fs.String("sandbox-disable", "", "turn off some sandbox `LAYERS`: namespaces,root,landlock,seccomp or all")
		timing    = fs.Bool("timing", false, "print start-up timing and the core's memory use to stderr at exit")
		marker    = fs.String("boot-marker", "", "console `TEXT` whose first appearance marks the guest's init (for --timing)")
		pluginUID = fs.String("plugin-uid", "", "host `UID` plugins run as (root only; default 65534, never 0)")
		pluginGID = fs.String("plugin-gid", "", "host `GID` plugins run as (root only; default 65534, never 0)")
		root      = fs.String("root", "", "the host `DIR` to use as the guest's root file system; the command after -- runs in it")
		rootRO    = fs.Bool("root-readonly", false, "serve --root read-only")
		rootFiles = fs.String("root-open-files", "", "the open-files limit (`N`, 1024 to 1048576; default 16384) of --root's plugin, as --fs's open-files=: about a quarter of it less 600 (at most 65536) is what the guest can hold open on the root at once")
		workdir   = fs.String("workdir", "", "working directory (`DIR`) of the command inside the root (default /)")
		hostname  = fs.String("hostname", "", "the guest's host `NAME` (default krun)")
		user      = fs.String("user", "", "run the command as `USER[:GROUP]`, names (from the root's /etc/passwd and /etc/group) or numbers (default root)")
		tty       = fs.String("tty", "auto", "give the command a terminal in the guest, by `MODE`: auto (when krun-core's stdin is one), on (stdin must be one), or off (pipes, also on a terminal: stdout and stderr apart, bytes as they are)")
		noStdin   = fs.Bool("no-stdin", false, "do not read krun-core's stdin (as ssh -n): the command's input is empty, and a loop that reads a file can run krun-core; no terminal under --tty auto")
		modules   = fs.String("kernel-modules", "", "the kernel's module tree (`DIR`), for --root (default: next to the kernel, then /lib/modules/RELEASE)")
		restarts  = fs.String("plugin-restarts", pluginhost.RestartPolicy{}.String(), "restart a disk, network or --plugin device's plugin that dies at most `N/DURATION` times (e.g. 5/60s), or off; then the device fails (at once for a plugin whose device says its requests must not be replayed)")
		bootTO    = secondsFlag(vmm.DefaultBootTimeout)
		handshake = secondsFlag(vmm.DefaultPluginHandshakeTimeout)
		disks     multiFlag
		shares    multiFlag
		nets      multiFlag
		plugins   multiFlag
		externals multiFlag
		envs      multiFlag
		rlimits   multiFlag
		ports     multiFlag
		grants    = devspec.SyscallGrants{}
	)
	fs.Var(&disks, "disk", "a disk `SPEC` (above), served by krun-plugin-blk-raw or krun-plugin-blk-qcow2")
	fs.Var(&shares, "fs", "a shared directory `SPEC` (above), served by krun-plugin-fs-virtio; with --root mounted at mount=GUESTDIR (default /mnt/TAG)")
	fs.Var(&nets, "net", "a network `SPEC` (above): passt, served by krun-plugin-net-passt")
	fs.Var(&plugins, "plugin", "a third-party plugin `SPEC` (above): any installed krun-plugin-KIND, options passed as given")
	fs.Func("plugin-syscalls", "grant a --plugin device's plugin system calls beyond its launch profile: `KIND=NAME[,NAME...]`, those its declared policy asks for (never exec, mount, ptrace and the others docs/SECURITY.md lists)", grants.Add)
	fs.Var(&externals, "vhost-user", "an external vhost-user back-end `SPEC` (above), not sandboxed by krun-core")
	fs.Var(&envs, "env", "`KEY=VALUE` in the command's environment; a bare KEY takes krun-core's own value, if it has one (repeatable; with --root)")
	fs.Var(&rlimits, "rlimit", "`NAME=SOFT:HARD` resource limit of the command, e.g. nofile=1024:4096, or by number as libkrun takes them, 7=1024:4096 (repeatable; with --root)")
	fs.Var(&ports, "port", "forward TCP port `HOST:GUEST` (or N for N:N) of the host to the guest, as krunvm's --port and libkrun's krun_set_port_map; adds a --net passt when none is given, else the first one forwards it (repeatable; with --root)")
	fs.Var(&handshake, "handshake-timeout", "how long each plugin may take to start, at launch and at a restart (`DURATION`, 90s, 2m; a bare number is seconds); more for an emulated or heavily loaded host")
	fs.Var(&bootTO, "boot-timeout", "end a guest that shows no sign of life (no console output, no device access) for this `DURATION` after it starts (90s, 2m; a bare number is seconds; 0 turns the watchdog off)")
	// With a command after "--", run's own failures exit 125; that is
	// known before the flags are parsed, so a bad flag gets it too.
	failStatus := 1
	if slices.Contains(args, "--") || slices.ContainsFunc(args, isRootFlag) {
		failStatus = exitRunFailed
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.Help(stdout)
			return 0
		}
		fs.Fail(stderr, fs.FlagError(err))
		return failStatus
	}
	command := fs.Args()
	execMode := *root != "" || len(command) > 0
	if *root != "" || slices.Contains(args, "--") {
		// A stray argument without "--" (a kernel parameter meant
		// for --cmdline) is not a command given: run's own status, 1
		// (from review, helper-89).
		failStatus = exitRunFailed
	}
	fail := func(format string, a ...any) int {
		fs.Failf(stderr, format, a...)
		return failStatus
	}
	switch {
	case execMode && *root == "":
		return fail("a command needs --root DIR (the guest's root file system); without --root, give no command")
	case execMode && len(command) == 0:
		return fail("--root needs a command to run: krun-core run --root DIR [options] -- CMD [ARGS...]")
	case execMode && *initrd != "":
		return fail("--root and --initrd are alternatives")
	case !execMode && *kernel == "" && *initrd == "" && len(disks) == 0:
		return fail("nothing to run: give --root DIR -- CMD, or --kernel with --initrd or --disk")
	case !execMode && (len(envs) > 0 || len(rlimits) > 0 || len(ports) > 0 || *workdir != "" || *hostname != "" || *user != "" || *rootRO || *rootFiles != "" || *modules != "" || *tty != "auto"):
		return fail("--env, --rlimit, --port, --workdir, --hostname, --user, --root-readonly, --root-open-files, --kernel-modules and --tty need --root DIR -- CMD")
	case *tty != "auto" && *tty != "on" && *tty != "off":
		return fail("--tty %s: want auto, on or off", cli.Printable(*tty))
	case *noStdin && *tty == "on":
		// A terminal krun-core does not read would swallow ^C: raw,
		// without signals, and never read.
		return fail("--tty on needs krun-core's stdin: drop --no-stdin")
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
	if execMode && !flagSet(fs.FlagSet, "log-level") {
		// krun-core's stderr is the command's: only errors of krun-core
		// itself go there unless asked for.
		_ = fs.Set("log-level", "error")
	}
	log, err := fs.Logger(stderr)
	if err != nil {
		return fail("%v", err)
	}

	c := vmm.NewContext(log)
	openFilesGiven := *rootFiles != ""
	if err := c.SetVMConfig(*cpus, mem); err != nil {
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
			if f, ok := s.(*devspec.FSSpec); ok && f.Mount != "" && !execMode {
				return fail("--%s %s: mount= needs a root directory: --root DIR -- CMD (a guest's own init mounts what it likes)", group.flag, v)
			}
			if f, ok := s.(*devspec.FSSpec); ok && f.OpenFiles != 0 {
				openFilesGiven = true
			}
			if err := c.AddDevice(s); err != nil {
				return fail("%v", err)
			}
		}
	}
	var term *terminal
	var ttyIn *stdiopump.Input
	if execMode {
		env, err := commandEnv(envs)
		if err != nil {
			return fail("%v", err)
		}
		var openFiles uint64
		if *rootFiles != "" {
			if openFiles, err = devspec.ParseOpenFiles(*rootFiles); err != nil {
				return fail("--root-open-files %s", strings.TrimPrefix(err.Error(), "open-files="))
			}
		}
		if term, ttyIn, err = setupExec(c, execOptions{root: *root, readOnly: *rootRO, openFiles: openFiles, command: command, env: env,
			workdir: *workdir, hostname: *hostname, user: *user, rlimits: rlimits, ports: ports, tty: *tty, noStdin: *noStdin, stdout: stdout, stderr: stderr, pipes: pipes}); err != nil {
			return fail("%v", err)
		}
		if *modules != "" {
			c.SetModulesDir(*modules)
		}
		// The root and the command are checked before the kernel is
		// looked for: a wrong --root or CMD is reported as such on any
		// host, with its own status.
		if _, err := vmm.LookupInRoot(*root, *workdir, command[0], c.ExecEnv()); err != nil {
			return execFailure(stderr, err)
		}
	} else {
		c.SetConsoleOutput(stdout)
	}
	// A kernel the search found was checked there (and is not the
	// user's --kernel, so an error must not call it that).
	if *kernel == "" {
		k, err := vmm.FindKernel()
		if err != nil {
			return fail("%v", err)
		}
		*kernel = k
	} else if err := vmm.CheckKernelFile(*kernel); err != nil {
		return fail("--kernel %s: %v", cli.Printable(*kernel), err)
	}
	if *initrd != "" {
		if err := vmm.CheckKernelFile(*initrd); err != nil {
			return fail("--initrd %s: %v", cli.Printable(*initrd), err)
		}
	}
	if err := c.SetKernel(*kernel, *initrd, *cmdline); err != nil {
		return fail("%v", err)
	}
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
	if _, _, err := (sandbox.LaunchConfig{HostUID: uid, HostGID: gid}).PluginIDs(); err != nil && !sandboxOff {
		// Without the sandbox the plugins run as krun-core itself.
		return fail("%v", err)
	}
	c.SetPluginIDs(uid, gid)
	c.SetPluginSyscalls(grants)
	if sandboxOff {
		fmt.Fprintln(stderr, "krun-core run: warning: --sandbox=off: plugins parse guest- and image-controlled bytes unconfined")
		if openFilesGiven {
			fmt.Fprintln(stderr, "krun-core run: warning: open-files is the sandbox's limit: with --sandbox=off a share's plugin has krun-core's own")
		}
	}
	c.SetBootMarker(*marker)
	rp, err := pluginhost.ParseRestartPolicy(*restarts)
	if err != nil {
		return fail("--plugin-restarts: %v", err)
	}
	c.SetPluginRestarts(rp)
	if err := c.SetPluginHandshakeTimeout(time.Duration(handshake)); err != nil {
		return fail("--handshake-timeout: %v", err)
	}
	if err := c.SetBootTimeout(time.Duration(bootTO)); err != nil {
		return fail("--boot-timeout: %v", err)
	}
	// Before anything starts: the files, plugins and back-end sockets
	// named, then a host whose KVM cannot boot a stock kernel (none, or
	// kvm_pvm) gets one line now instead of a silent hang.
	if err := c.Validate(); err != nil {
		return fail("%s", cli.OneLine(err.Error()))
	}
	if err := kvm.CheckHost(); err != nil {
		return fail("%v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stoppedBy := func() syscall.Signal { return 0 }
	if execMode {
		stopSignals, caught := forwardSignals(ctx, c, term, cancel, log)
		defer stopSignals()
		stoppedBy = caught
		if term != nil {
			defer term.makeRaw()()
		}
		if ttyIn != nil {
			// After raw mode: what is typed goes as typed.
			go ttyIn.Run()
			// Once the command has ended, what is typed is for the
			// shell that comes next, not for a pipe nobody reads.
			go func() {
				select {
				case <-c.Exited():
				case <-c.Ended():
				case <-ctx.Done():
				}
				ttyIn.Stop()
			}()
		}
	} else {
		if !*noStdin {
			if restore, ok := rawTerminal(os.Stdin, true); ok {
				defer restore()
			}
			c.SetConsoleInput(os.Stdin)
		}
		sctx, stop, caught := stopOnSignal(ctx)
		defer stop()
		ctx = sctx
		stoppedBy = caught
	}
	res, err := c.Start(ctx)
	if ttyIn != nil {
		ttyIn.Stop()
	}
	printOutputFailure(stderr, res)
	if *timing && res != nil {
		t := res.Timing
		if execMode {
			fmt.Fprintf(stderr, "krun-core timing: plugins %.1f ms, vm-setup %.1f ms, ready %.1f ms, kernel-boot %.1f ms, init-to-exec %.1f ms, command %.1f ms, total %.1f ms, core-rss %d KiB\n",
				msec(t.PluginStart), msec(t.VMSetup), msec(t.Ready), msec(t.KernelBoot), msec(t.InitToExec), msec(t.Command), msec(t.Total), res.CoreRSS>>10)
		} else {
			fmt.Fprintf(stderr, "krun-core timing: plugins %.1f ms, vm-setup %.1f ms, ready %.1f ms, kernel-boot %.1f ms, total %.1f ms, core-rss %d KiB\n",
				msec(t.PluginStart), msec(t.VMSetup), msec(t.Ready), msec(t.KernelBoot), msec(t.Total), res.CoreRSS>>10)
		}
	}
	if sig := stoppedBy(); sig != 0 {
		// The user stopped the VM: the shell's status for a signal, and
		// no error line for the cancellation itself.
		if err != nil && !errors.Is(err, context.Canceled) {
			fmt.Fprintf(stderr, "krun-core run: %s\n", cli.OneLine(err.Error()))
		}
		return 128 + int(sig)
	}
	if err != nil {
		if execMode {
			return execFailure(stderr, err)
		}
		return fail("%s", cli.OneLine(err.Error()))
	}
	for _, derr := range res.DeviceErrors {
		log.Warn("device failed while the guest ran", "error", derr)
	}
	log.Debug("guest ended", "reason", res.Reason.String())
	if execMode {
		if !res.HasExitStatus {
			printConsoleTail(stderr, res)
			return fail("the guest ended (%s) without reporting the command's exit status; --log-level debug shows all of its console", res.Reason)
		}
		return res.ExitStatus
	}
	return 0
}

// catchSIGPIPE makes krun-core's writes to a stdout or stderr whose
// reader went away (`krun-core run -- CMD 2>&1 | head -1`) fail with EPIPE
// instead of killing it: Go's runtime turns EPIPE on descriptor 1 or 2
// into death by SIGPIPE unless the program handles the signal, and
// krun-core's own lines (its error, --timing, the guest console's tail,
// an error logged while the guest runs) share stderr with the command; it
// died without its tear-down, with 141 for status and the terminal left
// raw (found in review). Caught, not ignored: an ignored signal would stay
// ignored in the plugins and passt that krun-core starts.
func catchSIGPIPE() {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
}

// stopOnSignal returns a context cancelled by SIGINT, SIGTERM or SIGHUP,
// what stops watching, and which of them arrived (0 while none has).
func stopOnSignal(parent context.Context) (context.Context, func(), func() syscall.Signal) {
	ctx, cancel := context.WithCancel(parent)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	var got atomic.Int32
	go func() {
		select {
		case s := <-sigc:
			if n, ok := s.(syscall.Signal); ok {
				got.Store(int32(n))
			}
			cancel()
		case <-ctx.Done():
		}
	}()
	stop := func() {
		signal.Stop(sigc)
		cancel()
	}
	return ctx, stop, func() syscall.Signal { return syscall.Signal(got.Load()) }
}

// flagSet reports whether the flag was given on the command line.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

// execFailure reports why a command could not run, with the status the
// shell would give.
func execFailure(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "krun-core run: %s\n", cli.OneLine(err.Error()))
	switch {
	case errors.Is(err, vmm.ErrCommandNotFound):
		return exitNotFound
	case errors.Is(err, vmm.ErrCommandNotExecutable):
		return exitNotExecutable
	}
	return exitRunFailed
}

// printConsoleTail shows the last lines of the guest's console when the
// guest ended on its own without reporting the command's status: with
// "quiet" they are what the kernel or krun-init said before it ended (a
// panic). They are printable already (vmm.Result.ConsoleTail). A run that
// failed otherwise (a device, the boot watchdog) says so in its one line.
func printConsoleTail(w io.Writer, res *vmm.Result) {
	if res == nil || res.HasExitStatus || len(res.ConsoleTail) == 0 {
		return
	}
	fmt.Fprintf(w, "krun-core run: the last lines of the guest's console:\n")
	for _, l := range res.ConsoleTail {
		fmt.Fprintf(w, "  guest| %s\n", l)
	}
}

// printOutputFailure says in one line that the command's output could
// not all be copied into a file on stdout or stderr (a full disk): the
// rest of it was dropped, and the command's status alone would not tell.
func printOutputFailure(w io.Writer, res *vmm.Result) {
	if res == nil || res.OutputError == nil {
		return
	}
	fmt.Fprintf(w, "krun-core run: %s\n", stdiopump.Dropped(res.OutputError))
}

func msec(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// secondsFlag is a duration flag that also takes a bare number of seconds.
type secondsFlag time.Duration

func (d *secondsFlag) String() string { return time.Duration(*d).String() }
func (d *secondsFlag) Set(s string) error {
	// A bare number of seconds ("90", "+5"), or one out of range.
	if n, err := strconv.ParseInt(s, 10, 64); err == nil || isDigits(strings.TrimLeft(s, "+-")) {
		switch {
		case strings.HasPrefix(s, "-"):
			return fmt.Errorf("%q is negative", s)
		case err == nil && n <= math.MaxUint32:
			*d = secondsFlag(time.Duration(n) * time.Second)
			return nil
		}
		return fmt.Errorf("%q is too large (at most %d seconds)", s, uint64(math.MaxUint32))
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

// commandEnv checks --env's values: KEY=VALUE, or a bare KEY that takes
// krun-core's own value (dropped when krun-core has none), as with
// `podman run --env KEY`.
func commandEnv(envs []string) ([]string, error) {
	out := make([]string, 0, len(envs))
	for _, kv := range envs {
		k, _, ok := strings.Cut(kv, "=")
		if k == "" || strings.ContainsRune(kv, 0) {
			return nil, fmt.Errorf("--env %s: want KEY=VALUE", cli.Printable(kv))
		}
		if !ok {
			if v, set := os.LookupEnv(k); set {
				out = append(out, k+"="+v)
			}
			continue
		}
		out = append(out, kv)
	}
	return out, nil
}

// isRootFlag says whether a is --root (or -root, or with =VALUE): run
// then runs a command, and a bad flag exits with its 125 as well.
func isRootFlag(a string) bool {
	name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
	return strings.HasPrefix(a, "-") && name == "root"
}

// isDigits says whether s is a non-empty run of decimal digits.
func isDigits(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
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

// rawTerminal puts a terminal on stdin into raw mode and returns how to
// restore it. With keepSignals ^C still stops krun-core; without, every key
// goes to the guest (its own terminal makes ^C a signal there).
func rawTerminal(f *os.File, keepSignals bool) (func(), bool) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, false
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.IEXTEN
	if !keepSignals {
		raw.Lflag &^= unix.ISIG
		raw.Oflag &^= unix.OPOST
	}
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, false
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, true
}
