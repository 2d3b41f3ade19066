package oci

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/internal/stdiopump"
	"github.com/krun-core/krun-core/sandbox"
)

// Version is krun-oci's version.
const Version = "0.1.0"

// Env is what Main runs with: the VM implementation and the standard
// files (tests substitute both).
type Env struct {
	NewVM          VMFactory
	Stdin          *os.File
	Stdout, Stderr *os.File
}

// globals are the options before the command, as runc has them.
type globals struct {
	root          string
	logPath       string
	logFormat     string
	debug         bool
	systemdCgroup bool
	kernel        string
	pluginDir     string
	cgroupRoot    string
	pluginUID     int
	pluginGID     int

	log   *runtimeLog
	store *Store
}

func (g *globals) runtimeConfig() RuntimeConfig {
	return RuntimeConfig{Kernel: g.kernel, PluginDir: g.pluginDir, PluginUID: g.pluginUID, PluginGID: g.pluginGID, Verbose: g.debug}
}

// globalArgs renders the options a detached helper needs.
func (g *globals) args() []string {
	a := []string{"--root", g.root, "--log-format", g.logFormatOr()}
	if g.logPath != "" {
		a = append(a, "--log", g.logPath)
	}
	if g.debug {
		a = append(a, "--debug")
	}
	if g.systemdCgroup {
		a = append(a, "--systemd-cgroup")
	}
	if g.kernel != "" {
		a = append(a, "--kernel", g.kernel)
	}
	if g.pluginDir != "" {
		a = append(a, "--plugin-dir", g.pluginDir)
	}
	if g.cgroupRoot != "" {
		a = append(a, "--cgroup-root", g.cgroupRoot)
	}
	if g.pluginUID != 0 {
		a = append(a, "--plugin-uid", strconv.Itoa(g.pluginUID))
	}
	if g.pluginGID != 0 {
		a = append(a, "--plugin-gid", strconv.Itoa(g.pluginGID))
	}
	return a
}

func (g *globals) logFormatOr() string {
	if g.logFormat == "" {
		return "text"
	}
	return g.logFormat
}

// defaultRoot is /run/krun-oci, or $XDG_RUNTIME_DIR/krun-oci for a user.
func defaultRoot() string {
	if os.Geteuid() != 0 {
		if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
			return filepath.Join(d, "krun-oci")
		}
	}
	return "/run/krun-oci"
}

type commandFunc func(g *globals, args []string, env *Env) error

var commands = map[string]struct {
	summary string
	run     commandFunc
}{
	"create":   {"create a container from a bundle: boot its VM, the command waits for start", cmdCreate},
	"start":    {"start the command of a created container", cmdStart},
	"state":    {"print a container's state (JSON)", cmdState},
	"kill":     {"send a signal to a container's command (SIGKILL ends its VM)", cmdKill},
	"delete":   {"delete a stopped or created container (--force: any)", cmdDelete},
	"run":      {"create and start a container; without --detach wait for it and delete it", cmdRun},
	"exec":     {"run another process in a created or running container", cmdExec},
	"list":     {"list containers", cmdList},
	"ps":       {"list a container's host processes", cmdPs},
	"features": {"print the features of this runtime (JSON)", cmdFeatures},
	"pause":    {"not supported", unsupported("pause")},
	"resume":   {"not supported", unsupported("resume")},
	"update":   {"not supported", unsupported("update")},
	"events":   {"not supported", unsupported("events")},
}

func unsupported(name string) commandFunc {
	return func(*globals, []string, *Env) error {
		return fmt.Errorf("%s is not supported by krun-oci", name)
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: krun-oci [global options] COMMAND [options] ID")
	fmt.Fprintln(w, "An OCI runtime whose containers are krun-core microVMs (docs/OCI.md).")
	fmt.Fprintln(w, "global options: --root DIR --log FILE --log-format text|json --debug --systemd-cgroup --kernel FILE --plugin-dir DIR")
	fmt.Fprintln(w, "                --cgroup-root DIR --plugin-uid UID --plugin-gid GID --version (-v)")
	fmt.Fprintln(w, "                (--rootless true|false|auto and --criu PATH are accepted and ignored, as runc's)")
	fmt.Fprintln(w, "commands:")
	var names []string
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-9s %s\n", n, commands[n].summary)
	}
}

// Main runs krun-oci with args (without argv[0]) and returns the exit
// status: 0, 1 for a failure (one line on stderr, one in --log; 255 for
// exec's own, as runc's exec), or for run and exec the process's own
// status.
func Main(args []string, env *Env) int {
	g := &globals{}
	fs := flag.NewFlagSet("krun-oci", flag.ContinueOnError)
	fs.StringVar(&g.root, "root", defaultRoot(), "directory for the containers' state")
	fs.StringVar(&g.logPath, "log", "", "log file (appended)")
	fs.StringVar(&g.logFormat, "log-format", "text", "log format: text or json")
	fs.BoolVar(&g.debug, "debug", false, "log the VM's machinery at debug level")
	fs.BoolVar(&g.systemdCgroup, "systemd-cgroup", false, "cgroupsPath is slice:prefix:name")
	fs.StringVar(&g.kernel, "kernel", "", "guest kernel (default: $KRUN_KERNEL, then as krun-core run finds one)")
	fs.StringVar(&g.pluginDir, "plugin-dir", "", "directory of krun-plugin-* and krun-init (default: next to krun-oci)")
	fs.StringVar(&g.cgroupRoot, "cgroup-root", "", "cgroup v2 mount (default /sys/fs/cgroup)")
	// Decimal host ids, 1 to 4294967294, as krun-core's own flags
	// (sandbox.ParseHostID): flag.Int read 010 as uid 8 and took 0x3e8.
	hostID := func(dst *int) func(string) error {
		return func(s string) error {
			id, err := sandbox.ParseHostID(s)
			if err == nil && s == "" {
				err = errors.New("an empty id")
			}
			*dst = id
			return err
		}
	}
	fs.Func("plugin-uid", "host uid the device plugins run as (default: the sandbox's, nobody for root; never 0)", hostID(&g.pluginUID))
	fs.Func("plugin-gid", "host gid the device plugins run as (default: the sandbox's, nogroup for root; never 0)", hostID(&g.pluginGID))
	fs.Func("rootless", "accepted for compatibility: true, false or auto (runc's)", func(v string) error {
		switch v {
		case "true", "false", "auto":
			return nil
		}
		return fmt.Errorf("want true, false or auto")
	})
	fs.String("criu", "", "accepted for compatibility")
	version := fs.Bool("version", false, "print the version")
	fs.BoolVar(version, "v", false, "print the version")
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(env.Stdout)
			return 0
		}
		// One line, as every other error (not the flag package's line
		// and the whole usage), also in --log when that was parsed:
		// an engine reads the error from there.
		log, lerr := openRuntimeLog(g.logPath, g.logFormat, g.debug, env.Stderr)
		if lerr != nil {
			fmt.Fprintf(env.Stderr, "krun-oci: %v\n", cli.FlagError("krun-oci", err))
			return 1
		}
		log.fail(cli.FlagError("krun-oci", err))
		log.close()
		return 1
	}
	log, err := openRuntimeLog(g.logPath, g.logFormat, g.debug, env.Stderr)
	g.log = log
	defer log.close()
	if err != nil {
		log.fail(err)
		return 1
	}
	if *version {
		fmt.Fprintf(env.Stdout, "krun-oci version %s\nspec: %s\ngo: %s\n", Version, specs.Version, runtime.Version())
		return 0
	}
	rest := fs.Args()
	if len(rest) == 0 {
		log.fail(errors.New("no command given (see krun-oci --help)"))
		return 1
	}
	if g.root == "" {
		// filepath.Abs("") is the working directory, whose every
		// subdirectory would then read as a container that died in
		// create: `--root "$UNSET" delete NAME` removed ./NAME.
		log.fail(errors.New("--root is empty: want the directory of the containers' state"))
		return 1
	}
	if !filepath.IsAbs(g.root) {
		if g.root, err = filepath.Abs(g.root); err != nil {
			log.fail(err)
			return 1
		}
	}
	g.store = &Store{Root: g.root}
	name, cargs := rest[0], rest[1:]
	switch name {
	case monitorCmd:
		return runMonitor(g, cargs, env)
	case proxyCmd:
		return runProxy(g, cargs, env)
	case "help":
		usage(env.Stdout)
		return 0
	}
	c, ok := commands[name]
	if !ok {
		log.fail(fmt.Errorf("unknown command %q (krun-oci help lists them)", name))
		return 1
	}
	err = c.run(g, cargs, env)
	var st exitStatus
	if errors.As(err, &st) {
		return int(st)
	}
	var help *helpRequested
	if errors.As(err, &help) {
		commandHelp(env.Stdout, help)
		return 0
	}
	if err != nil {
		log.fail(err)
		var rf *runtimeFailure
		if errors.As(err, &rf) {
			return rf.status
		}
		return 1
	}
	return 0
}

// exitStatus is a command's result that is not an error: the status of
// run's or exec's process.
type exitStatus int

func (e exitStatus) Error() string { return "exit status " + strconv.Itoa(int(e)) }

// helpRequested is what parseFlags returns for COMMAND --help (or -h):
// Main prints the command's help on stdout and exits 0, as runc does.
type helpRequested struct {
	fs     *flag.FlagSet
	needID bool
}

func (h *helpRequested) Error() string { return h.fs.Name() + ": help requested" }

// commandHelp prints the usage of one command: its summary and its flags.
func commandHelp(w io.Writer, h *helpRequested) {
	name := h.fs.Name()
	line := "usage: krun-oci [global options] " + name + " [options]"
	if h.needID {
		line += " ID"
	}
	fmt.Fprintln(w, line)
	if c, ok := commands[name]; ok {
		fmt.Fprintln(w, c.summary)
	}
	// A short form and its long one (the same variable) make one line:
	// "-b, --bundle DIR  the bundle DIR, holding config.json".
	type entry struct {
		names []string
		f     *flag.Flag
	}
	var entries []*entry
	byTarget := map[uintptr]*entry{}
	h.fs.VisitAll(func(f *flag.Flag) {
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		v := reflect.ValueOf(f.Value)
		if v.Kind() == reflect.Pointer {
			if e := byTarget[v.Pointer()]; e != nil {
				e.names = append(e.names, dash+f.Name)
				return
			}
		}
		e := &entry{names: []string{dash + f.Name}, f: f}
		if v.Kind() == reflect.Pointer {
			byTarget[v.Pointer()] = e
		}
		entries = append(entries, e)
	})
	if len(entries) > 0 {
		fmt.Fprintln(w, "options:")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, e := range entries {
			// Short forms first: -b, --bundle.
			sort.Slice(e.names, func(i, j int) bool { return len(e.names[i]) < len(e.names[j]) })
			arg, usage := flag.UnquoteUsage(e.f)
			if bf, ok := e.f.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
				arg = ""
			} else if arg == "int" {
				arg = "N"
			} else if arg == "" || arg == "value" || arg == "string" {
				arg = "VALUE"
			}
			fmt.Fprintf(tw, "  %s\t%s\n", strings.TrimSpace(strings.Join(e.names, ", ")+" "+arg), usage)
		}
		tw.Flush()
	}
	fmt.Fprintln(w, "docs/OCI.md describes each command and flag.")
}

// parseFlags parses a command's flags and returns the container ID.
func parseFlags(fs *flag.FlagSet, args []string, needID bool) (string, []string, error) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", nil, &helpRequested{fs: fs, needID: needID}
		}
		return "", nil, fmt.Errorf("%s: %w", fs.Name(), cli.FlagError("krun-oci", err))
	}
	rest := fs.Args()
	if !needID {
		return "", rest, nil
	}
	if len(rest) == 0 || rest[0] == "" {
		return "", nil, fmt.Errorf("%s: a container ID is required", fs.Name())
	}
	return rest[0], rest[1:], ValidID(rest[0])
}

// createOptions are the flags of create and run.
type createOptions struct {
	bundle, consoleSocket, pidFile string
	preserveFDs                    int

	// foreground is set by a run that waits: a terminal without a
	// console socket is then a pty of krun-oci's own, relayed to the
	// caller's terminal (console is what create made of it).
	foreground bool
	console    *hostConsole
	// input is a foreground run's terminal stdin, without
	// process.terminal: run reads it and the monitor gets a pipe
	// (create made it; run pumps it).
	input *stdiopump.Input
}

func createFlags(name string, o *createOptions) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(&o.bundle, "bundle", ".", "the bundle `DIR`, holding config.json")
	fs.StringVar(&o.bundle, "b", ".", "the bundle `DIR`, holding config.json")
	fs.StringVar(&o.consoleSocket, "console-socket", "", "unix `SOCKET` that gets the terminal's pty master (process.terminal)")
	fs.StringVar(&o.pidFile, "pid-file", "", "`FILE` that gets the container's pid (its monitor's)")
	fs.IntVar(&o.preserveFDs, "preserve-fds", 0, "only 0: open files cannot be passed into a VM")
	fs.Bool("no-pivot", false, "accepted and ignored (runc's)")
	fs.Bool("no-new-keyring", false, "accepted and ignored (runc's)")
	return fs
}

func cmdCreate(g *globals, args []string, env *Env) error {
	var o createOptions
	fs := createFlags("create", &o)
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("create: unexpected arguments %q", rest)
	}
	_, err = create(g, id, &o, env)
	return err
}

// create makes a container and returns its monitor (the caller of run
// waits for it).
func create(g *globals, id string, o *createOptions, env *Env) (*os.Process, error) {
	if o.preserveFDs > 0 {
		return nil, errors.New("--preserve-fds: open files cannot be passed into a VM")
	}
	spec, err := LoadSpec(o.bundle)
	if err != nil {
		return nil, err
	}
	plan, err := Translate(id, o.bundle, spec, translateOptions{SystemdCgroup: g.systemdCgroup, CgroupRoot: g.cgroupRoot})
	if err != nil {
		return nil, err
	}
	// A taken ID is said first, as runc says it: the checks below would
	// otherwise find the other container's things in the way (its
	// cgroup, where cgroupsPath is made from the ID as podman's and
	// CRI-O's are, read "already holds processes"; found in review,
	// helper-140). Store.Create checks again, atomically.
	if err := g.store.checkFree(id); err != nil {
		return nil, err
	}
	if plan.Net.Mode == NetNew && len(sandbox.HeldCapabilities([]sandbox.Capability{unix.CAP_SYS_ADMIN})) == 0 {
		// A network namespace of the monitor's own needs CAP_SYS_ADMIN
		// (krun-oci run by a user): the container gets no network, as
		// such a config did before the monitor was given one.
		g.log.warn("the config asks for a network namespace of its own, which needs CAP_SYS_ADMIN: the container gets no network")
		plan.Net = NetPlan{Mode: NetNone}
	}
	if plan.Process.Terminal && o.consoleSocket == "" && !o.foreground {
		return nil, errors.New("process.terminal needs --console-socket (the terminal's master is handed there)")
	}
	if !plan.Process.Terminal && o.consoleSocket != "" {
		// As runc: a caller that passes a socket waits for a master that
		// would never come.
		return nil, errors.New("--console-socket without process.terminal: there is no terminal to hand over")
	}
	if plan.Cgroup.Path != "" {
		if err := cgroupInUse(plan.Cgroup.Path); err != nil {
			return nil, err
		}
	}
	// A create ended by a signal (a shim's timeout, a closed terminal)
	// undoes itself: its state would otherwise stay, "creating", and
	// list would show a container nobody made. Caught from before the
	// state directory takes its name, so that none arriving meanwhile
	// leaves it behind.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	c, err := g.store.Create(id)
	if err != nil {
		signal.Stop(sigc)
		return nil, err
	}
	// Missing mount points are made here, with the runtime's rights: the
	// guest's file server may not be allowed to.
	for _, err := range container.MakeMountPoints(plan.Root, &plan.Setup) {
		g.log.warn("%v", err)
	}
	var (
		monitor *os.Process
		// stateMu is held while create makes what undo removes (the
		// record and plan, the monitor's start), and by undo: a signal
		// never undoes half of a step, nor races a step still to come.
		stateMu sync.Mutex
		ok      = false
		// finished, under stateMu, says create has succeeded or undone
		// itself: a signal after it changes nothing.
		finished = false
		// hooks ends a prestart or createRuntime hook that runs when a
		// signal ends create.
		hooks hookKiller
	)
	// undo removes what create made: the monitor, the cgroup, the state,
	// then runs the poststop hooks. Called with stateMu held.
	undo := func() {
		if monitor != nil {
			monitor.Kill()
			waitDead(monitor.Pid, 0, 5*time.Second)
		}
		removeCgroup(c.Rec.Cgroup, true)
		c.Remove()
		// The container existed: its poststop hooks run, as runc's
		// destroy runs them for a create that failed, and as the
		// runtime-spec's lifecycle goes on after a failed prestart or
		// createRuntime hook. They undo what the earlier hooks set up
		// (a CNI hook's address, released at poststop), which no
		// delete would release once the state is gone (found in
		// review, helper-140). They run once the cgroup and the state
		// are gone and the lock released, as runc's destroy runs them
		// and as delete does: a delete or kill of the ID, a hook's own
		// included, does not wait for them (found in review,
		// helper-140/145).
		if h := plan.Hooks; h != nil && len(h.Poststop) > 0 {
			st := specs.State{Version: specs.Version, ID: id, Status: specs.StateStopped, Bundle: plan.Bundle, Annotations: spec.Annotations}
			if monitor != nil {
				st.Pid = monitor.Pid
			}
			// In the bundle, as create's other hooks (and runc's
			// destroy in its create, which changed into the bundle).
			runHooksWarn("poststop", h.Poststop, &st, plan.Bundle, func(err error) { g.log.warn("%v", err) })
		}
	}
	created := make(chan struct{})
	go func() {
		select {
		case s := <-sigc:
			// The hook that runs ends with create, before the undo
			// (its poststop hooks undo what it set up).
			hooks.stop()
			stateMu.Lock() // kept: create makes nothing more
			if finished {
				stateMu.Unlock()
				return
			}
			undo()
			os.Exit(128 + int(s.(unix.Signal)))
		case <-created:
		}
	}()
	defer func() {
		// The signals stay caught until a failed create has undone
		// itself: one meanwhile (a caller giving up on the poststop
		// hooks with SIGTERM) ended it half-way, its cgroup and state
		// left behind.
		stateMu.Lock()
		if !ok {
			undo()
		}
		finished = true
		stateMu.Unlock()
		signal.Stop(sigc)
		close(created)
		if ok {
			c.Unlock()
		}
	}()
	stateMu.Lock()
	c.Rec = Record{ID: id, Bundle: plan.Bundle, Rootfs: plan.Root, Created: time.Now().UTC(),
		Owner: ownerName(os.Geteuid()), Annotations: spec.Annotations, Phase: phaseCreating, Cgroup: plan.Cgroup.Path}
	err = c.Save()
	if err == nil {
		err = writePlan(c.Dir, plan)
	}
	stateMu.Unlock()
	if err != nil {
		return nil, err
	}
	stdio := [3]*os.File{env.Stdin, env.Stdout, env.Stderr}
	if !plan.Process.Terminal && o.foreground && env.Stdin != nil && stdiopump.IsTerminal(env.Stdin) {
		// The caller's terminal never reaches the monitor's session,
		// nor the console plugin's: out of the shell's job control,
		// `krun-oci run ID &` went on reading what the user typed to
		// the foreground job (found in review; krun-core run's own
		// was fixed before). run, the shell's job, reads it and hands
		// on a pipe; in the background its read stops it.
		var r *os.File
		if o.input, r, err = stdiopump.NewInput(env.Stdin); err != nil {
			return nil, err
		}
		defer r.Close()
		stdio[0] = r
	}
	if plan.Process.Terminal {
		var slave *os.File
		if o.consoleSocket != "" {
			slave, err = newConsole(o.consoleSocket, plan.Process.Rows, plan.Process.Cols)
		} else {
			o.console, slave, err = newHostConsole(env, plan.Process.Rows, plan.Process.Cols)
		}
		if err != nil {
			return nil, err
		}
		defer slave.Close()
		stdio = [3]*os.File{slave, slave, slave}
	}
	goR, goW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer goW.Close()
	repR, repW, err := os.Pipe()
	if err != nil {
		goR.Close()
		return nil, err
	}
	defer repR.Close()
	netns := ""
	if plan.Net.Mode == NetNS {
		netns = plan.Net.Path
	}
	newNetNS := plan.Net.Mode == NetNew
	stateMu.Lock()
	monitor, err = spawn(spawnOptions{
		Args:  append(g.args(), monitorCmd, "--id", id),
		Stdio: stdio, Extra: []*os.File{goR, repW}, NetNS: netns, NewNetNS: newNetNS, Ctty: plan.Process.Terminal,
	})
	goR.Close()
	repW.Close()
	if err != nil {
		stateMu.Unlock()
		return nil, fmt.Errorf("start the container's monitor: %w", err)
	}
	c.Rec.Pid = monitor.Pid
	// Its start time tells the monitor from a process that reuses its
	// pid later; without it (no /proc) no state could be told at all.
	if c.Rec.PidStart, _, err = procStat(monitor.Pid); err != nil {
		err = fmt.Errorf("read the start time of the container's monitor (pid %d) from /proc: %w", monitor.Pid, err)
	} else {
		err = c.Save()
	}
	stateMu.Unlock()
	if err != nil {
		return nil, err
	}
	if h := plan.Hooks; h != nil {
		// As runc: prestart, then createRuntime, both seeing the
		// container "creating" (the runtime spec's lifecycle, steps 4
		// and 5; hooks from several sources may rely on the order; found
		// in review, helper-90).
		st := c.ociState(specs.StateCreating)
		if err := runHooks("prestart", h.Prestart, &st.State, plan.Bundle, &hooks); err != nil {
			return nil, err
		}
		if err := runHooks("createRuntime", h.CreateRuntime, &st.State, plan.Bundle, &hooks); err != nil {
			return nil, err
		}
	}
	// A kill --all KILL that came before the monitor's pid was saved
	// found none to kill and left its mark instead (killCreating); one
	// after found the pid and killed the monitor.
	if killMarked(c.Dir) {
		return nil, errors.New("killed (kill --all KILL) while it was being created")
	}
	if _, err := goW.Write([]byte{1}); err != nil {
		return nil, fmt.Errorf("the container's monitor ended early")
	}
	if err := readReport(repR); err != nil {
		return nil, err
	}
	stateMu.Lock()
	c.Rec.Phase = phaseCreated
	err = c.Save()
	stateMu.Unlock()
	if err != nil {
		return nil, err
	}
	if o.pidFile != "" {
		if err := writePidFile(o.pidFile, monitor.Pid); err != nil {
			return nil, err
		}
	}
	ok = true
	return monitor, nil
}

// readReport waits for the monitor's ready byte or its error.
func readReport(r *os.File) error {
	b, err := io.ReadAll(io.LimitReader(r, 64<<10))
	if err != nil {
		return fmt.Errorf("the container's monitor: %w", err)
	}
	switch {
	case len(b) == 0:
		return errors.New("the container's monitor ended before the guest was ready (--debug --log FILE shows why)")
	case b[0] == reportReady:
		return nil
	case b[0] == reportError:
		return errors.New(string(b[1:]))
	}
	return errors.New("the container's monitor sent a malformed report")
}

// writePidFile writes pid atomically (the reader never sees a partial
// file).
func writePidFile(path string, pid int) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(abs, []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return fmt.Errorf("--pid-file %s: %w", path, unwrapPath(err))
	}
	return nil
}

// waitDead waits until pid no longer runs (or is a zombie).
func waitDead(pid int, start uint64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for processAlive(pid, start) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// Status is a container's status now: stopped once its monitor is gone
// or reports the command ended.
func (c *Container) Status() specs.ContainerState {
	if c.Rec.Pid == 0 {
		// A create in progress holds the lock; one that died left its
		// directory behind, stopped.
		if c.busy() {
			return specs.StateCreating
		}
		return specs.StateStopped
	}
	if !c.MonitorAlive() {
		return specs.StateStopped
	}
	if _, err := os.Lstat(filepath.Join(c.Dir, exitedFile)); err == nil {
		return specs.StateStopped
	}
	if rep, err := callMonitor(c.Dir, &request{Op: opState}, nil, 5*time.Second); err == nil {
		switch rep.Status {
		case "creating":
			return specs.StateCreating
		case "created":
			return specs.StateCreated
		case "running":
			return specs.StateRunning
		case "stopped":
			return specs.StateStopped
		}
	}
	switch c.Rec.Phase {
	case phaseCreated:
		return specs.StateCreated
	case phaseStarted:
		return specs.StateRunning
	}
	return specs.StateCreating
}

func (c *Container) ociState(status specs.ContainerState) ociState {
	st := ociState{
		State: specs.State{Version: specs.Version, ID: c.ID, Status: status, Bundle: c.Rec.Bundle,
			Annotations: c.Rec.Annotations},
		Rootfs: c.Rec.Rootfs, Created: c.Rec.Created, Owner: c.Rec.Owner,
	}
	if status != specs.StateStopped {
		st.Pid = c.Rec.Pid
	}
	return st
}

func cmdStart(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("start", flag.ContinueOnError)
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("start: unexpected arguments %q", rest)
	}
	return start(g, id)
}

func start(g *globals, id string) error {
	c, err := g.store.Open(id)
	if err != nil {
		return err
	}
	defer c.Unlock()
	if st := c.Status(); st != specs.StateCreated {
		return fmt.Errorf("cannot start a container that is %s", st)
	}
	if _, err := callMonitor(c.Dir, &request{Op: opStart}, nil, 30*time.Second); err != nil {
		return err
	}
	c.Rec.Phase = phaseStarted
	if err := c.Save(); err != nil {
		return err
	}
	plan, err := readPlan(c.Dir)
	if err != nil || plan.Hooks == nil || len(plan.Hooks.Poststart) == 0 {
		return nil
	}
	// The poststart hooks run with the container's lock released, as
	// runc's (whose lock is its own process's): the container runs,
	// and a kill or delete --force of it, from another caller or from
	// the hook itself, must not wait for them (a hook killing its own
	// container deadlocked with this start until the hook's timeout,
	// for ever without one; found in review, helper-140).
	st := c.ociState(specs.StateRunning)
	c.Unlock()
	runHooksWarn("poststart", plan.Hooks.Poststart, &st.State, "", func(err error) { g.log.warn("%v", err) })
	return nil
}

func cmdState(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("state", flag.ContinueOnError)
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("state: unexpected arguments %q", rest)
	}
	c, err := g.store.Read(id)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(c.ociState(c.Status()), "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(env.Stdout, "%s\n", b)
	return err
}

// ParseSignal reads a signal as a number, a name (TERM, SIGTERM, any
// case) or RTMIN+N.
func ParseSignal(s string) (unix.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 64 {
			return 0, fmt.Errorf("invalid signal %q", s)
		}
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if rest, ok := strings.CutPrefix(name, "SIGRTMIN+"); ok {
		if n, err := strconv.Atoi(rest); err == nil && n >= 0 && 34+n <= 64 {
			return unix.Signal(34 + n), nil
		}
	}
	if rest, ok := strings.CutPrefix(name, "SIGRTMAX-"); ok {
		if n, err := strconv.Atoi(rest); err == nil && n >= 0 && 64-n >= 34 {
			return unix.Signal(64 - n), nil
		}
	}
	switch name {
	case "SIGRTMIN":
		return 34, nil
	case "SIGRTMAX":
		return 64, nil
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

func cmdKill(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("kill", flag.ContinueOnError)
	all := fs.Bool("all", false, "every process of the guest but krun-init")
	fs.BoolVar(all, "a", false, "every process of the guest but krun-init")
	sigFlag := fs.String("signal", "", "the `SIGNAL` (the SIGNAL argument's other spelling)")
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	sigName := "SIGTERM"
	switch {
	case len(rest) > 1:
		return fmt.Errorf("kill: unexpected arguments %q", rest[1:])
	case len(rest) == 1:
		sigName = rest[0]
	case *sigFlag != "":
		sigName = *sigFlag
	}
	// Signal 0, as kill(2)'s and runc's: only the check that the
	// container is there to signal.
	var sig unix.Signal
	if sigName != "0" {
		if sig, err = ParseSignal(sigName); err != nil {
			return err
		}
	}
	// A create in progress holds the lock until its guest is ready, its
	// hooks run meanwhile: a kill then, from such a hook above all,
	// would wait for the create that waits for the hook. The container
	// is not running yet, as runc would say (found in review, helper-100).
	if r, err := g.store.Read(id); err == nil && r.Rec.Phase == phaseCreating && r.busy() {
		if *all {
			// As runc's, which signals the container's processes
			// whatever its state: SIGKILL ends the monitor and with it
			// the VM (the create then fails and undoes itself); the
			// guest's processes have not started, so any other signal
			// has nobody to reach (found in review, helper-105).
			if sig == unix.SIGKILL {
				killCreating(g.store, r)
			}
			return nil
		}
		return fmt.Errorf("cannot signal container %s: container not running (%s)", id, specs.StateCreating)
	}
	c, err := g.store.Open(id)
	if err != nil {
		return err
	}
	defer c.Unlock()
	st := c.Status()
	if st != specs.StateCreated && st != specs.StateRunning {
		if *all && st == specs.StateStopped {
			return nil // as runc: engines kill --all a container that has ended
		}
		// runc's words, which containerd's shim looks for to tell a
		// container that has ended from a failed kill.
		return fmt.Errorf("cannot signal container %s: container not running (%s)", id, st)
	}
	if sig == 0 {
		return nil
	}
	if sig == unix.SIGKILL {
		// The VM goes with its monitor; plugins and passt follow it
		// (parent-death signal).
		if err := unix.Kill(c.Rec.Pid, unix.SIGKILL); err != nil && err != unix.ESRCH {
			return fmt.Errorf("kill: %w", err)
		}
		return nil
	}
	_, err = callMonitor(c.Dir, &request{Op: opSignal, Signal: int(sig), All: *all}, nil, 10*time.Second)
	return err
}

// killMarkName, in a container's directory, is a kill --all KILL that
// reached the container while its create had not yet saved its monitor's
// pid.
const killMarkName = "killed"

// killCreating is kill --all KILL of a container whose create runs: its
// monitor dies, and with it the VM (the create then fails and undoes
// itself). Before create has saved the monitor's pid there is none to
// kill: the mark is left first, then the state read again, so that
// either this finds the pid or create, which looks for the mark after
// saving it, finds the mark.
//
// The mark goes into the directory Read found, not into one a later
// create of the same ID made (this kill stalled while that create failed,
// undid itself and a new one began; found in review, helper-109).
func killCreating(st *Store, r *Container) {
	if r.Rec.Pid == 0 {
		fd, err := unix.Open(r.Dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return // the directory is gone: so is the create
		}
		// The same directory, and the same create's record (an inode
		// number is reused at once on some file systems).
		var now unix.Stat_t
		if unix.Fstat(fd, &now) != nil || now.Dev != r.dirDev || now.Ino != r.dirIno || !sameCreate(fd, r) {
			unix.Close(fd)
			return // another create's: this one has ended
		}
		mark, err := unix.Openat(fd, killMarkName, unix.O_WRONLY|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		unix.Close(fd)
		if err != nil {
			return
		}
		unix.Close(mark)
		again, err := st.Read(r.ID)
		if err != nil || again.dirDev != r.dirDev || again.dirIno != r.dirIno {
			return
		}
		r = again
	}
	if r.Rec.Pid != 0 && r.MonitorAlive() {
		unix.Kill(r.Rec.Pid, unix.SIGKILL)
	}
}

// sameCreate tells whether the record in the directory open as dirfd is
// from the create that made r's (its creation time, to the nanosecond;
// both without a record yet count as the same).
func sameCreate(dirfd int, r *Container) bool {
	fd, err := unix.Openat(dirfd, recordFile, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Is(err, unix.ENOENT) && r.Rec.Created.IsZero()
	}
	f := os.NewFile(uintptr(fd), recordFile)
	defer f.Close()
	var rec Record
	if err := json.NewDecoder(io.LimitReader(f, 1<<20)).Decode(&rec); err != nil {
		return false
	}
	return rec.Created.Equal(r.Rec.Created)
}

// killMarked tells whether killCreating left its mark in dir.
func killMarked(dir string) bool {
	_, err := os.Lstat(filepath.Join(dir, killMarkName))
	return err == nil
}

func cmdDelete(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("delete", flag.ContinueOnError)
	force := fs.Bool("force", false, "end a running container (or one still being created) first")
	fs.BoolVar(force, "f", false, "end a running container (or one still being created) first")
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("delete: unexpected arguments %q", rest)
	}
	return deleteContainer(g, id, *force)
}

func deleteContainer(g *globals, id string, force bool) error {
	if force {
		// A create holds the lock until its guest is ready (up to
		// ReadyTimeout): a forced delete (a shim or podman rm -f giving
		// up on it) ends its monitor first, the create then undoes
		// itself, and the delete finds nothing left, as runc's does at
		// once (found in review). Any other holder of the lock is a
		// command on a container the delete ends anyway.
		if r, err := g.store.Read(id); err == nil && r.Rec.Pid != 0 && r.busy() && r.MonitorAlive() {
			unix.Kill(r.Rec.Pid, unix.SIGKILL)
			if r.Rec.Phase == phaseCreating && !waitCreateUndone(g.store, id) {
				// The create waits for something else than its
				// monitor: its own hook, running this delete. It
				// undoes itself once that returns.
				return nil
			}
		}
	}
	var c *Container
	var err error
	if force {
		var unreadable error
		c, unreadable, err = g.store.openUnreadable(id)
		if err == nil && unreadable != nil {
			defer c.Unlock()
			return deleteUnreadable(g, c, unreadable)
		}
	} else {
		c, err = g.store.Open(id)
	}
	if force && errors.Is(err, ErrNotExist) {
		return nil // as runc: engines clean up with it after a create that failed half-way
	}
	if err != nil {
		return err
	}
	defer c.Unlock()
	st := c.Status()
	switch st {
	case specs.StateStopped:
	case specs.StateCreated:
		// As runc, which engines rely on (containerd deletes a task that
		// never started without --force): its VM is ended below.
	default:
		if !force {
			return fmt.Errorf("cannot delete container %s that is not stopped: %s", id, st)
		}
	}
	monitorAlive := c.MonitorAlive()
	if monitorAlive && st == specs.StateStopped {
		// The command exited (the monitor wrote its status) and the
		// monitor is ending the VM, within ExitGrace: its pid is the
		// container's, and whoever reaps it (conmon, the shim, run)
		// must get the command's status, not the 137 of a kill, as
		// with runc once state says stopped (found in review).
		waitDead(c.Rec.Pid, c.Rec.PidStart, ExitGrace+5*time.Second)
	}
	if c.MonitorAlive() {
		unix.Kill(c.Rec.Pid, unix.SIGKILL)
		if !waitDead(c.Rec.Pid, c.Rec.PidStart, 10*time.Second) {
			return fmt.Errorf("the monitor of %s (pid %d) did not end", id, c.Rec.Pid)
		}
	}
	var poststop []specs.Hook
	if plan, err := readPlan(c.Dir); err == nil && plan.Hooks != nil {
		poststop = plan.Hooks.Poststop
	}
	state := c.ociState(specs.StateStopped)
	state.Pid = c.Rec.Pid // hooks learn which process the container was
	// What is left in the cgroup (plugins or passt whose monitor died)
	// is killed, unless the container was stopped and another container
	// of this store has taken the cgroup over since: a stopped one's
	// cgroup, left empty, may be given to a new container, which the
	// kill would end (found in review).
	kill := monitorAlive || !cgroupTakenOver(g.store, id, c.Rec.Cgroup)
	if err := removeCgroup(c.Rec.Cgroup, kill); err != nil {
		g.log.warn("%v", err)
	}
	// The poststop hooks run once the container is gone and its lock
	// released, as runc's destroy runs them after removing the cgroup
	// and the state: a slow or hanging hook held the lock, and a kill,
	// a second delete (the hook's own included, which deadlocked until
	// the hook's timeout) or a create of the same ID waited for it
	// (found in review, helper-140/145). A delete meanwhile finds no
	// container, so the hooks run once.
	rmErr := c.Remove()
	if rmErr != nil && c.holdsPlan() {
		return rmErr // still there: a later delete runs the hooks
	}
	runHooksWarn("poststop", poststop, &state.State, "", func(err error) { g.log.warn("%v", err) })
	return rmErr
}

// createUndoWait is how long a forced delete waits for a create whose
// monitor it killed to undo itself.
const createUndoWait = 5 * time.Second

// waitCreateUndone waits up to createUndoWait for the create of id, whose
// monitor was killed, to let go of the container's lock (it undoes itself
// then); false if it still holds it: a createRuntime or prestart hook of
// the create's own is what runs the delete, and waiting longer would wait
// for the create that waits for the hook (found in review, helper-100).
func waitCreateUndone(store *Store, id string) bool {
	deadline := time.Now().Add(createUndoWait)
	for {
		r, err := store.Read(id)
		if err != nil || !r.busy() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// deleteUnreadable removes the container c, locked, whose state file
// cannot be read (why): delete --force, as an engine cleaning up after a
// host crash runs it, must not fail for good on it. The record is gone,
// so the monitor is found as the process listening on the container's
// control socket (its peer credentials) and killed, and the cgroup is the
// one in the plan create wrote. Poststop hooks need the container's
// state and are not run; a warning says what was removed and why.
func deleteUnreadable(g *globals, c *Container, why error) error {
	killed := false
	if pid := monitorPeer(c.Dir); pid > 0 {
		start, _, err := procStat(pid)
		if err == nil {
			unix.Kill(pid, unix.SIGKILL)
			if !waitDead(pid, start, 10*time.Second) {
				return fmt.Errorf("the monitor of %s (pid %d) did not end", c.ID, pid)
			}
			killed = true
		}
	}
	if plan, err := readPlan(c.Dir); err == nil && plan.Cgroup.Path != "" {
		kill := killed || !cgroupTakenOver(g.store, c.ID, plan.Cgroup.Path)
		if err := removeCgroup(plan.Cgroup.Path, kill); err != nil {
			g.log.warn("%v", err)
		}
	}
	g.log.warn("%v; removed the container without running its poststop hooks", why)
	return c.Remove()
}

// cgroupTakenOver reports whether a container of store other than id,
// being created or with its monitor alive, names cgroup as its own.
func cgroupTakenOver(store *Store, id, cgroup string) bool {
	if cgroup == "" {
		return false
	}
	ids, err := store.List()
	if err != nil {
		return true // cannot tell: kill nothing
	}
	for _, other := range ids {
		if other == id {
			continue
		}
		o, err := store.Read(other)
		if err != nil || filepath.Clean(o.Rec.Cgroup) != filepath.Clean(cgroup) {
			continue
		}
		if o.Rec.Pid == 0 || o.MonitorAlive() {
			return true
		}
	}
	return false
}

func cmdRun(g *globals, args []string, env *Env) error {
	var o createOptions
	fs := createFlags("run", &o)
	detach := fs.Bool("detach", false, "return once the command started, without waiting for it")
	fs.BoolVar(detach, "d", false, "return once the command started, without waiting for it")
	keep := fs.Bool("keep", false, "do not delete the container when it ends")
	fs.Bool("no-subreaper", false, "accepted and ignored (runc's)")
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("run: unexpected arguments %q", rest)
	}
	// In the foreground the signals run gets go to the command, as with
	// runc run: the monitor is in a session of its own, so ^C at a
	// terminal or a caller's SIGTERM reaches only this process. Caught
	// from before create, so that none arriving meanwhile kills run and
	// leaves the container behind.
	var sigc chan os.Signal
	if !*detach {
		sigc = make(chan os.Signal, 16)
		signal.Notify(sigc, signalsToForward(env.Stdin)...)
		defer signal.Stop(sigc)
	}
	o.foreground = !*detach
	monitor, err := create(g, id, &o, env)
	if o.input != nil {
		if err != nil {
			o.input.Close()
		} else {
			// From before start, as the command would have read it.
			go o.input.Run()
		}
	}
	if o.console != nil {
		// Relayed from before start, so that nothing the command
		// writes waits; the caller's terminal is restored at the end.
		defer o.console.close(g.log)
		if err == nil {
			o.console.relay(g.log, env)
		}
	}
	if err != nil {
		return err
	}
	if err := start(g, id); err != nil {
		deleteContainer(g, id, true)
		return err
	}
	if *detach {
		return nil
	}
	done := make(chan struct{})
	defer close(done)
	go forwardSignals(g, id, sigc, done)
	// The monitor is our child: its exit status is the command's.
	ps, err := monitor.Wait()
	if o.input != nil {
		o.input.Stop() // what is typed now is the shell's
	}
	if !*keep {
		if derr := deleteContainer(g, id, true); derr != nil {
			g.log.warn("%v", derr)
		}
	}
	if err != nil {
		return err
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitStatus(128 + int(ws.Signal()))
	}
	return exitStatus(ps.ExitCode())
}

// forwardedSignals are the signals run (in the foreground), exec and the
// container's monitor pass on to the process in the guest, as runc's
// signal handler does: every signal but KILL and STOP (which cannot be
// caught), CHLD, URG (the Go runtime's own) and WINCH (a terminal's size,
// handled apart), real-time ones included. Six were, and the pid an exec's
// --pid-file names (its proxy) died of SIGALRM while the process went on
// (found in review, helper-90).
var forwardedSignals = func() []os.Signal {
	var out []os.Signal
	for s := unix.Signal(1); s <= 64; s++ {
		switch s {
		case unix.SIGKILL, unix.SIGSTOP, unix.SIGCHLD, unix.SIGURG, unix.SIGWINCH, 32, 33:
			continue // 32 and 33: the C library's, not in Go's signal table
		}
		out = append(out, s)
	}
	return out
}()

// signalsToForward are the forwardedSignals a process that reads the
// caller's terminal (stdin) catches: not SIGTTIN and SIGTTOU. The kernel's
// job control sends those to a background job that reads the terminal
// (or sets its mode) and they must stop it, as any program's, until `fg`:
// caught, they stopped nothing, the read was tried again at once and sent
// another (a spin, each one forwarded to the guest), and krun-oci run or
// exec, the shell's job, went on without its input where any other
// program would have stopped.
func signalsToForward(stdin *os.File) []os.Signal {
	if stdin == nil || !stdiopump.IsTerminal(stdin) {
		return forwardedSignals
	}
	return slices.DeleteFunc(slices.Clone(forwardedSignals), func(s os.Signal) bool {
		return s == unix.SIGTTIN || s == unix.SIGTTOU
	})
}

// forwardSignals sends each signal from sigc to container id's command
// through its monitor until done is closed.
func forwardSignals(g *globals, id string, sigc <-chan os.Signal, done <-chan struct{}) {
	dir := filepath.Join(g.store.Root, id)
	for {
		select {
		case <-done:
			return
		case sig := <-sigc:
			s, ok := sig.(unix.Signal)
			if !ok {
				continue
			}
			if _, err := callMonitor(dir, &request{Op: opSignal, Signal: int(s)}, nil, 10*time.Second); err != nil {
				g.log.warn("forward %v to container %s: %v", s, id, err)
			}
		}
	}
}

func cmdList(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	format := fs.String("format", "table", "output `FORMAT`: table or json")
	fs.StringVar(format, "f", "table", "output `FORMAT`: table or json")
	quiet := fs.Bool("quiet", false, "only the IDs")
	fs.BoolVar(quiet, "q", false, "only the IDs")
	_, rest, err := parseFlags(fs, args, false)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("list: unexpected arguments %q", rest)
	}
	ids, err := g.store.List()
	if err != nil {
		return err
	}
	var states []ociState
	for _, id := range ids {
		c, err := g.store.Read(id)
		if err != nil {
			continue
		}
		states = append(states, c.ociState(c.Status()))
	}
	switch {
	case *quiet:
		for _, s := range states {
			fmt.Fprintln(env.Stdout, s.ID)
		}
	case *format == "json":
		if states == nil {
			states = []ociState{}
		}
		b, _ := json.Marshal(states)
		fmt.Fprintf(env.Stdout, "%s\n", b)
	case *format == "table":
		w := tabwriter.NewWriter(env.Stdout, 12, 1, 3, ' ', 0)
		fmt.Fprintln(w, "ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER")
		for _, s := range states {
			fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\n", s.ID, s.Pid, s.Status, s.Bundle, s.Created.Format(time.RFC3339Nano), s.Owner)
		}
		return w.Flush()
	default:
		return fmt.Errorf("list: --format %q (table or json)", *format)
	}
	return nil
}

// ownerName is list's OWNER of a container created by uid, as runc shows
// it: the user's name, or "#UID" when it has none.
func ownerName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return u.Username
	}
	return "#" + strconv.Itoa(uid)
}

func cmdPs(g *globals, args []string, env *Env) error {
	fs := flag.NewFlagSet("ps", flag.ContinueOnError)
	format := fs.String("format", "table", "output `FORMAT`: table or json")
	fs.StringVar(format, "f", "table", "output `FORMAT`: table or json")
	id, _, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	c, err := g.store.Read(id)
	if err != nil {
		return err
	}
	pids := []int{}
	// A create that has not started its monitor yet has no process:
	// pid 0 is none (it was listed, and a caller's kill of it signals
	// its own process group).
	if st := c.Status(); st != specs.StateStopped && c.Rec.Pid > 0 {
		pids = append(pids, c.Rec.Pid)
	}
	switch *format {
	case "json":
		b, _ := json.Marshal(pids)
		fmt.Fprintf(env.Stdout, "%s\n", b)
	case "table":
		fmt.Fprintln(env.Stdout, "PID")
		for _, p := range pids {
			fmt.Fprintln(env.Stdout, p)
		}
	default:
		return fmt.Errorf("ps: --format %q (table or json)", *format)
	}
	return nil
}

func cmdFeatures(g *globals, args []string, env *Env) error {
	_, rest, err := parseFlags(flag.NewFlagSet("features", flag.ContinueOnError), args, false)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("features: unexpected arguments %q", rest)
	}
	yes, no := true, false
	f := features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		Hooks:         []string{"prestart", "createRuntime", "poststart", "poststop"},
		MountOptions:  container.KnownOptions(),
		Linux: &features.Linux{
			// Those a config may ask for: the network namespace is
			// the monitor's (docs/OCI.md), the others are the VM's
			// own (a path to join is taken as asking for one, except
			// mount and time); user namespaces are refused.
			Namespaces:   []string{"cgroup", "ipc", "mount", "network", "pid", "time", "uts"},
			Capabilities: container.CapabilityNames(),
			Cgroup:       &features.Cgroup{V1: &no, V2: &yes, Systemd: &no, SystemdUser: &no},
			Seccomp:      &features.Seccomp{Enabled: &no},
			Apparmor:     &features.Apparmor{Enabled: &no},
			Selinux:      &features.Selinux{Enabled: &no},
		},
		Annotations: map[string]string{
			"io.github.krun-core.oci.version": Version,
			AnnotationCPUs:                    "vCPUs of the container's VM",
			AnnotationRAMMiB:                  "guest RAM of the container's VM in MiB",
		},
	}
	sort.Strings(f.MountOptions)
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(env.Stdout, "%s\n", b)
	return err
}
