package oci

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/internal/stdiopump"
)

// Descriptors of the exec proxy besides stdio: the process (JSON) and the
// report pipe.
const (
	proxyProcessFD = 3
	proxyReportFD  = 4
)

// statusVMEnded is an exec's status when the VM ended before the process
// reported one (it was killed with the VM).
const statusVMEnded = 137

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func cmdExec(g *globals, args []string, env *Env) (err error) {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	var (
		consoleSocket, cwd, user, processPath, pidFile string
		tty, detach, noNewPrivs                        bool
		envs, gids, caps                               listFlag
		preserveFDs                                    int
	)
	fs.StringVar(&consoleSocket, "console-socket", "", "unix `SOCKET` that gets the terminal's pty master (with --tty)")
	fs.StringVar(&cwd, "cwd", "", "working `DIR` in the guest")
	fs.StringVar(&user, "user", "", "`UID[:GID]` to run as")
	fs.StringVar(&user, "u", "", "`UID[:GID]` to run as")
	fs.StringVar(&processPath, "process", "", "`FILE` with the process as JSON (config.json's process), instead of CMD")
	fs.StringVar(&processPath, "p", "", "`FILE` with the process as JSON (config.json's process), instead of CMD")
	fs.StringVar(&pidFile, "pid-file", "", "`FILE` that gets the exec's pid (its proxy's)")
	fs.BoolVar(&tty, "tty", false, "give the process a terminal")
	fs.BoolVar(&tty, "t", false, "give the process a terminal")
	fs.BoolVar(&detach, "detach", false, "return once the process started, without waiting for it")
	fs.BoolVar(&detach, "d", false, "return once the process started, without waiting for it")
	fs.BoolVar(&noNewPrivs, "no-new-privs", false, "set no_new_privs for the process")
	fs.Var(&envs, "env", "`KEY=VALUE` in the environment (repeatable)")
	fs.Var(&envs, "e", "`KEY=VALUE` in the environment (repeatable)")
	fs.Var(&gids, "additional-gids", "supplementary `GID` (repeatable)")
	fs.Var(&gids, "g", "supplementary `GID` (repeatable)")
	fs.Var(&caps, "cap", "`CAPABILITY` to add (repeatable)")
	fs.Var(&caps, "c", "`CAPABILITY` to add (repeatable)")
	fs.IntVar(&preserveFDs, "preserve-fds", 0, "only 0: open files cannot be passed into a VM")
	fs.String("process-label", "", "accepted and ignored (runc's)")
	fs.String("apparmor", "", "accepted and ignored (runc's)")
	fs.String("cgroup", "", "accepted and ignored (runc's)")
	fs.Bool("ignore-paused", false, "accepted and ignored (runc's)")
	id, rest, err := parseFlags(fs, args, true)
	if err != nil {
		return err
	}
	// From here a failure exits 255, as runc's exec ("exec failed"), so
	// that a caller tells it from the process's own status 1: CRI-O's
	// streaming exec hands the runtime's status back as the command's
	// (found in review, helper-90).
	defer func() { err = execFailed(err) }()
	if preserveFDs > 0 {
		return errors.New("--preserve-fds: open files cannot be passed into a VM")
	}
	c, err := g.store.Read(id)
	if err != nil {
		return err
	}
	if st := c.Status(); st != specs.StateCreated && st != specs.StateRunning {
		return fmt.Errorf("cannot exec in a container that is %s", st)
	}
	plan, err := readPlan(c.Dir)
	if err != nil {
		return err
	}
	var proc *Process
	if processPath != "" {
		if proc, err = loadProcess(processPath); err != nil {
			return err
		}
		inheritCapabilities(proc, plan)
	} else {
		if len(rest) == 0 {
			return errors.New("exec: a command is required (or --process FILE)")
		}
		p := plan.Process
		p.Args = rest
		p.Terminal = tty
		p.Rows, p.Cols = 0, 0
		p.Env = mergeEnv(p.Env, envs)
		if cwd != "" {
			p.Cwd = cwd
		}
		if user != "" {
			uidS, gidS, hasGID := strings.Cut(user, ":")
			uid, err := strconv.ParseUint(uidS, 10, 32)
			if err != nil {
				return fmt.Errorf("exec: --user %q: want UID[:GID], numeric", user)
			}
			p.UID = uint32(uid)
			if hasGID {
				gid, err := strconv.ParseUint(gidS, 10, 32)
				if err != nil {
					return fmt.Errorf("exec: --user %q: want UID[:GID], numeric", user)
				}
				p.GID = uint32(gid)
			}
		}
		for _, gs := range gids {
			gid, err := strconv.ParseUint(gs, 10, 32)
			if err != nil {
				return fmt.Errorf("exec: --additional-gids %q is not a number", gs)
			}
			p.AdditionalGIDs = append(p.AdditionalGIDs, uint32(gid))
		}
		if noNewPrivs {
			p.Extras.NoNewPrivileges = true
		}
		if len(caps) > 0 {
			cp := container.Capabilities{}
			if p.Extras.Capabilities != nil {
				cp = *p.Extras.Capabilities
			}
			cp.Bounding = append(append([]string{}, cp.Bounding...), caps...)
			cp.Effective = append(append([]string{}, cp.Effective...), caps...)
			cp.Permitted = append(append([]string{}, cp.Permitted...), caps...)
			p.Extras.Capabilities = &cp
		}
		proc = &p
	}
	gp := guestProcess(proc)
	if err := gp.Validate(); err != nil {
		return fmt.Errorf("exec: %w", err)
	}
	if !gp.Terminal && consoleSocket != "" {
		// As create, and runc's exec: a caller that passes a socket
		// waits on it for a master that would never come.
		return errors.New("exec: --console-socket without a terminal (--tty, or process.terminal in --process): there is no terminal to hand over")
	}
	stdio := [3]*os.File{env.Stdin, env.Stdout, env.Stderr}
	ctty := false
	var hostTTY *os.File // the caller's terminal, in the foreground
	if gp.Terminal {
		switch {
		case consoleSocket != "":
			slave, err := newConsole(consoleSocket, gp.Rows, gp.Cols)
			if err != nil {
				return err
			}
			defer slave.Close()
			stdio = [3]*os.File{slave, slave, slave}
			ctty = true
		case !detach:
			// The guest makes the terminal; the caller's, wherever
			// runc would find it, goes raw and lends its size.
			tty, own, err := findHostTerminal(env)
			if err != nil {
				return fmt.Errorf("exec: %w", err)
			}
			if own {
				defer tty.Close()
			}
			restore, err := rawMode(tty)
			if err != nil {
				return err
			}
			defer restore()
			if gp.Rows == 0 {
				gp.Rows, gp.Cols, _ = getWinsize(tty)
			}
			hostTTY = tty
		default:
			return errors.New("exec: a detached terminal needs --console-socket")
		}
	}
	if !detach {
		if pidFile != "" {
			if err := writePidFile(pidFile, os.Getpid()); err != nil {
				return err
			}
		}
		status, err := execProcess(c.Dir, gp, stdio, hostTTY, nil)
		if err != nil {
			return err
		}
		return exitStatus(status)
	}
	procR, procW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer procW.Close()
	repR, repW, err := os.Pipe()
	if err != nil {
		procR.Close()
		return err
	}
	defer repR.Close()
	proxy, err := spawn(spawnOptions{Args: append(g.args(), proxyCmd, "--id", id), Stdio: stdio,
		Extra: []*os.File{procR, repW}, Ctty: ctty})
	procR.Close()
	repW.Close()
	if err != nil {
		return fmt.Errorf("start the exec proxy: %w", err)
	}
	b, _ := json.Marshal(gp)
	procW.Write(b)
	procW.Close()
	if err := readReport(repR); err != nil {
		proxy.Kill()
		return err
	}
	if pidFile != "" {
		if err := writePidFile(pidFile, proxy.Pid); err != nil {
			return err
		}
	}
	return nil
}

// inheritCapabilities gives an exec'd process without capabilities of
// its own the container's, as runc does (not root's full set).
func inheritCapabilities(proc *Process, plan *Plan) {
	if proc.Extras.Capabilities == nil {
		proc.Extras.Capabilities = plan.Process.Extras.Capabilities
	}
}

// loadProcess reads an exec --process file (an OCI process object).
func loadProcess(path string) (*Process, error) {
	b, err := readSmallFile(path, maxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("--process %s: %w", path, err)
	}
	var sp specs.Process
	if err := json.Unmarshal(b, &sp); err != nil {
		return nil, fmt.Errorf("--process %s: %w", path, err)
	}
	return translateProcess(&sp, "--process "+path)
}

// mergeEnv appends env to base, replacing base's entries of the same
// names.
func mergeEnv(base, env []string) []string {
	out := append([]string{}, base...)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		replaced := false
		for i, b := range out {
			if bk, _, _ := strings.Cut(b, "="); bk == k {
				out[i], replaced = kv, true
			}
		}
		if !replaced {
			out = append(out, kv)
		}
	}
	return out
}

// runProxy is a detached exec: it holds the process's stdio on the host,
// forwards signals and resizes, and exits with the process's status (a
// subreaper collects it as runc's exec'd process).
func runProxy(g *globals, args []string, env *Env) int {
	fs := flag.NewFlagSet(proxyCmd, flag.ContinueOnError)
	fs.SetOutput(devNull{})
	id := fs.String("id", "", "")
	if err := fs.Parse(args); err != nil || *id == "" {
		return 1
	}
	closeInherited(proxyReportFD + 1)
	reportPipe := os.NewFile(proxyReportFD, "report")
	report := reporter(reportPipe)
	procFile := os.NewFile(proxyProcessFD, "process")
	b, err := io.ReadAll(io.LimitReader(procFile, maxConfigSize))
	procFile.Close()
	var gp container.Process
	if err == nil {
		err = json.Unmarshal(b, &gp)
	}
	if err != nil {
		report(fmt.Errorf("exec proxy: read the process: %w", err))
		return 1
	}
	c, err := g.store.Read(*id)
	if err != nil {
		report(err)
		return 1
	}
	var tty *os.File
	if gp.Terminal {
		tty = env.Stdin
	}
	status, err := execProcess(c.Dir, &gp, [3]*os.File{env.Stdin, env.Stdout, env.Stderr}, tty, report)
	if err != nil {
		return 1
	}
	return status
}

// execProcess starts gp through the container's monitor and waits for its
// status, forwarding signals (and, with a terminal, its size changes).
// ready, when not nil, learns whether the process started.
func execProcess(dir string, gp *container.Process, stdio [3]*os.File, tty *os.File, ready func(error)) (int, error) {
	if ready == nil {
		ready = func(error) {}
	}
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, slices.Concat(signalsToForward(stdio[0]), []os.Signal{unix.SIGWINCH})...)
	defer signal.Stop(sigc)
	statusR, statusW, err := os.Pipe()
	if err != nil {
		ready(err)
		return 0, err
	}
	defer statusR.Close()
	// The console plugin gets a pipe of ours for stdin, never the
	// caller's own: reading it may block in the plugin past the exec's
	// end, and the next line the user types into the shell this process
	// returns to must not go to the guest (found in review). This
	// process reads the caller's stdin until it ends, right after the
	// status.
	// A terminal so read is this process's: in the background the
	// read stops it (SIGTTIN, which it then does not catch:
	// signalsToForward), as any program's.
	input, stdinR, err := stdiopump.NewInput(stdio[0])
	if err != nil {
		statusW.Close()
		ready(err)
		return 0, err
	}
	defer stdinR.Close()
	go input.Run()
	// Once the status is in (or the process failed to start), what is
	// typed is the shell's.
	defer input.Stop()
	// A regular file on stdout or stderr (`>>log`) the plugin gets as a
	// pipe that this process copies into the file: sharing the file's
	// description, a compromised plugin could clear O_APPEND and write
	// over the log, or truncate it (found in review). All of it is in
	// the file before the status is returned.
	stdout, stderr, output, err := stdiopump.Outputs(stdio[1], stdio[2])
	if err != nil {
		statusW.Close()
		ready(err)
		return 0, err
	}
	defer output.Wait()
	defer output.CloseWriters()
	// The program lives as long as this process: the monitor ends it
	// when the write end, which only this process holds, closes (this
	// process's pid is the one exec's --pid-file names, which a caller
	// may kill -9 as it would runc's exec'd process).
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		statusW.Close()
		ready(err)
		return 0, err
	}
	defer lifeW.Close()
	rep, err := callMonitor(dir, &request{Op: opExec, Exec: gp}, []*os.File{stdinR, stdout, stderr, statusW, lifeR}, 30*time.Second)
	lifeR.Close()
	statusW.Close()
	stdinR.Close()
	output.CloseWriters() // the plugin has its own
	if err != nil {
		ready(err)
		return 0, err
	}
	ready(nil)
	id := rep.ExecID
	go func() {
		for s := range sigc {
			sig := s.(syscall.Signal)
			req := &request{Op: opExecSignal, ExecID: id, Signal: int(sig)}
			if sig == unix.SIGWINCH {
				if tty == nil {
					continue
				}
				rows, cols, err := getWinsize(tty)
				if err != nil {
					continue
				}
				req = &request{Op: opExecResize, ExecID: id, Rows: rows, Cols: cols}
			}
			callMonitor(dir, req, nil, 5*time.Second)
		}
	}()
	if tty != nil {
		if rows, cols, err := getWinsize(tty); err == nil && rows > 0 && (gp.Rows != rows || gp.Cols != cols) {
			callMonitor(dir, &request{Op: opExecResize, ExecID: id, Rows: rows, Cols: cols}, nil, 5*time.Second)
		}
	}
	var b [1]byte
	for {
		n, err := statusR.Read(b[:])
		if n == 1 {
			input.Stop()
			// The plugin wrote the output before the status and
			// closes its files after it.
			outputFailed(output, stdio[2])
			return int(b[0]), nil
		}
		if err != nil {
			input.Stop()
			outputFailed(output, stdio[2])
			// The status pipe closed without a byte: 137 alone would
			// read as the process's own SIGKILL.
			fmt.Fprintln(stdio[2], "krun-oci exec: the container's VM ended before the process reported its exit status")
			return statusVMEnded, nil
		}
	}
}

// outputFailed waits for the copies of the command's output into files
// and says in one line on stderr where one failed (a full disk): the
// rest of that stream was dropped, and the command's status alone would
// not tell.
func outputFailed(o *stdiopump.Output, stderr *os.File) {
	if err := o.Wait(); err != nil && stderr != nil {
		fmt.Fprintf(stderr, "krun-oci exec: %s\n", stdiopump.Dropped(err))
	}
}

// rawMode puts a terminal in raw mode and returns how to restore it.
func rawMode(f *os.File) (func(), error) {
	old, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err != nil {
		return nil, err
	}
	if err := makeRaw(f); err != nil {
		return nil, err
	}
	return func() { unix.IoctlSetTermios(int(f.Fd()), unix.TCSETS, old) }, nil
}

// execFailedStatus is exec's status for its own failures, runc's.
const execFailedStatus = 255

// execFailed marks err, a failure of exec itself, for Main's 255.
func execFailed(err error) error {
	var st exitStatus
	if err == nil || errors.As(err, &st) {
		return err
	}
	return &runtimeFailure{err: err, status: execFailedStatus}
}

// runtimeFailure is a command's own failure with a status other than 1.
type runtimeFailure struct {
	err    error
	status int
}

func (r *runtimeFailure) Error() string { return r.err.Error() }
func (r *runtimeFailure) Unwrap() error { return r.err }
