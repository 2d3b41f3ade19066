package oci

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/stdiopump"
)

// Hidden sub-commands: the detached processes create and exec start.
const (
	monitorCmd = "__monitor"
	proxyCmd   = "__exec"
)

// The monitor's descriptors besides stdio: create's go signal (it runs
// the createRuntime hooks between the monitor's start and the boot) and
// the monitor's report.
const (
	monitorGoFD     = 3
	monitorReportFD = 4
)

// Report bytes on the report pipe: ready, or an error message follows.
const (
	reportReady = 'k'
	reportError = 'e'
)

// reporter returns the function that writes a child's one report (ready,
// or an error in one line) on the pipe its parent waits on, then closes it.
func reporter(pipe *os.File) func(error) {
	return func(err error) {
		if err == nil {
			pipe.Write([]byte{reportReady})
		} else {
			pipe.Write(append([]byte{reportError}, oneLine(err.Error())...))
		}
		pipe.Close()
	}
}

// ReadyTimeout bounds how long create waits for the guest to be set up.
const ReadyTimeout = 5 * time.Minute

// ExitGrace is how long a guest that reported its command's exit status
// has to power off before its VM is stopped.
const ExitGrace = 5 * time.Second

// monitor owns one container's VM.
type monitor struct {
	dir  string
	plan *Plan
	vm   VM
	log  *runtimeLog
	// input is the caller's terminal on stdin, which the monitor
	// pumps to the console plugin's pipe once the command starts (nil:
	// the plugin has stdin itself).
	input      *stdiopump.Input
	inputStart sync.Once

	// active counts the requests being answered: the monitor waits for
	// them before it exits (a kill of a created container ends the VM
	// while its request is still to be answered).
	active atomic.Int32

	mu        sync.Mutex
	phase     string // phaseCreating, phaseCreated, phaseStarted, or "stopped"
	endSignal unix.Signal
}

const phaseStopped = "stopped"

// runMonitor is the monitor process: it joins the cgroup, listens on the
// control socket, waits for create's go, boots the VM, reports readiness
// and then serves start, kill and exec until the command ends. It exits
// with the command's status (128+N for a signal), so that a subreaper
// collecting it sees what runc's container process would give.
func runMonitor(g *globals, args []string, env *Env) int {
	fs := flag.NewFlagSet(monitorCmd, flag.ContinueOnError)
	fs.SetOutput(devNull{})
	id := fs.String("id", "", "")
	if err := fs.Parse(args); err != nil || *id == "" {
		return 1
	}
	// The pipes came without close-on-exec, and Go passes such fds on
	// to every process it starts: passt, which lives as long as the VM,
	// would hold the report pipe open and create would never see its
	// end.
	unix.CloseOnExec(monitorGoFD)
	unix.CloseOnExec(monitorReportFD)
	closeInherited(monitorReportFD + 1)
	goPipe := os.NewFile(monitorGoFD, "go")
	reportPipe := os.NewFile(monitorReportFD, "report")
	report := reporter(reportPipe)
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, append(slices.Clone(forwardedSignals), unix.SIGWINCH)...)

	dir := filepath.Join(g.root, *id)
	plan, err := readPlan(dir)
	if err != nil {
		report(err)
		return 1
	}
	m := &monitor{dir: dir, plan: plan, log: g.log, phase: phaseCreating}
	if plan.Cgroup.Path != "" {
		if err := joinCgroup(plan.Cgroup, g.cgroupRoot); err != nil {
			report(systemdCgroupHint(err, g.systemdCgroup))
			return 1
		}
	}
	l, closeListener, err := listenMonitor(dir)
	if err != nil {
		report(err)
		return 1
	}
	defer closeListener()
	go m.serve(l)

	var b [1]byte
	if n, _ := goPipe.Read(b[:]); n != 1 {
		return 1 // create gave up
	}
	goPipe.Close()

	stdin := os.Stdin
	if !plan.Process.Terminal && stdiopump.IsTerminal(os.Stdin) {
		// A detached create at a terminal (a foreground run hands a
		// pipe of its own): the monitor reads it from the command's
		// start, and the console plugin gets a pipe, never the
		// caller's terminal. Both are out of the shell's job control:
		// give a detached container another stdin (docs/OCI.md).
		if m.input, stdin, err = stdiopump.NewInput(os.Stdin); err != nil {
			report(err)
			return 1
		}
	}
	sio := Stdio{Stdin: stdin, Stdout: os.Stdout, Stderr: os.Stderr, TTY: plan.Process.Terminal}
	vm, err := env.NewVM(plan, sio, g.runtimeConfig(), g.log.hclog("krun-oci"))
	if err != nil {
		report(err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), ReadyTimeout)
	err = vm.Boot(ctx)
	cancel()
	if err != nil {
		vm.Stop()
		vm.Wait()
		report(err)
		return 1
	}
	m.mu.Lock()
	m.vm = vm
	m.phase = phaseCreated
	m.mu.Unlock()
	report(nil)

	exited := vm.Exited()
	for done := false; !done; {
		select {
		case <-exited:
			done = true
			if m.input != nil {
				// What is typed from now on is for the shell.
				m.input.Stop()
			}
		case s := <-sigc:
			m.hostSignal(s.(syscall.Signal))
		}
	}
	m.mu.Lock()
	m.phase = phaseStopped
	m.mu.Unlock()
	if f, err := os.OpenFile(filepath.Join(dir, exitedFile), os.O_CREATE|os.O_WRONLY|unix.O_NOFOLLOW, 0o600); err == nil {
		f.Close()
	}
	// krun-init reports the exit status after syncing and then powers
	// off. A guest that goes on running (its root wrote the status port
	// itself) is stopped: a container reported stopped keeps no VM.
	stop := time.AfterFunc(ExitGrace, vm.Stop)
	status, ok, err := vm.Wait()
	stop.Stop()
	// Answer the requests under way (the kill that ended a created
	// container among them) before exiting.
	for deadline := time.Now().Add(2 * time.Second); m.active.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	m.mu.Lock()
	endSignal := m.endSignal
	m.mu.Unlock()
	switch {
	case endSignal != 0:
		return 128 + int(endSignal)
	case ok:
		return status
	}
	if err == nil {
		err = errors.New("the guest ended without reporting the command's exit status")
	}
	g.log.warn("container %s: %v", *id, err)
	return 125
}

// closeInherited closes the descriptors from first on that this process
// inherited: those without close-on-exec, which every descriptor Go
// opens has. They are the caller's of create (or exec), passed on by
// spawn with the ones meant for the helper: the monitor held them as long
// as the container ran (a pipe whose reader waited for its end never saw
// it), where runc's container process closes them (found in review,
// helper-140).
func closeInherited(first int) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < first {
			continue
		}
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
		}
	}
}

// hostSignal handles a signal sent to the monitor itself: a terminal
// resize, or a signal for the command.
func (m *monitor) hostSignal(sig syscall.Signal) {
	switch sig {
	case unix.SIGWINCH:
		if m.plan.Process.Terminal {
			if rows, cols, err := getWinsize(os.Stdin); err == nil {
				m.vm.Resize(rows, cols)
			}
		}
	case unix.SIGPIPE:
	default:
		m.signal(unix.Signal(sig), false)
	}
}

// signal sends sig to the command, or with all to every process of the
// container; before start there is no command yet, and the container ends
// as if it had been killed by sig.
func (m *monitor) signal(sig unix.Signal, all bool) error {
	m.mu.Lock()
	phase, vm := m.phase, m.vm
	ends := phase == phaseCreated && !ignoredByDefault(sig) && !stopsByDefault(sig)
	if ends {
		m.endSignal = sig
	}
	m.mu.Unlock()
	switch phase {
	case phaseCreated:
		// Under runc a created container's process (runc init) lets
		// a signal whose default action is to be ignored pass, and
		// the container stays created; one that stops it leaves it
		// created too (a stopped runc init; here there is no process
		// yet to stop, and it ended the container; from review,
		// helper-90).
		if ends {
			vm.Stop()
		}
		return nil
	case phaseStarted:
		if all {
			return vm.SignalAll(sig)
		}
		return vm.Signal(sig)
	}
	return fmt.Errorf("container not running (%s)", statusOfPhase(phase))
}

// stopsByDefault says whether a signal's default action is to stop the
// process.
func stopsByDefault(sig unix.Signal) bool {
	switch sig {
	case unix.SIGSTOP, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU:
		return true
	}
	return false
}

// ignoredByDefault says whether a signal's default action is to be
// ignored: it does nothing to a process that has not changed it.
func ignoredByDefault(sig unix.Signal) bool {
	switch sig {
	case unix.SIGCHLD, unix.SIGCONT, unix.SIGURG, unix.SIGWINCH:
		return true
	}
	return false
}

func statusOfPhase(p string) string {
	switch p {
	case phaseStarted:
		return "running"
	case phaseStopped:
		return "stopped"
	}
	return p
}

// serve answers requests on the control socket until it is closed.
func (m *monitor) serve(l *net.UnixListener) {
	for {
		conn, err := l.AcceptUnix()
		if err != nil {
			return
		}
		m.active.Add(1)
		go func() {
			defer m.active.Add(-1)
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			var req request
			files, err := recvMsg(conn, &req)
			if err != nil {
				// The caller gets EOF; the log says why.
				m.log.warn("container control request: %v", err)
				return
			}
			rep := m.handle(&req, files)
			closeFiles(files)
			sendMsg(conn, rep, nil)
		}()
	}
}

func (m *monitor) handle(req *request, files []*os.File) *reply {
	m.mu.Lock()
	phase, vm := m.phase, m.vm
	m.mu.Unlock()
	fail := func(err error) *reply { return &reply{Error: oneLine(err.Error())} }
	switch req.Op {
	case opState:
		return &reply{Status: statusOfPhase(phase)}
	case opStart:
		if phase != phaseCreated {
			return fail(fmt.Errorf("cannot start a container that is %s", statusOfPhase(phase)))
		}
		m.mu.Lock()
		m.phase = phaseStarted
		m.mu.Unlock()
		if err := vm.Start(); err != nil {
			return fail(fmt.Errorf("start the command: %w", err))
		}
		if m.input != nil {
			m.inputStart.Do(func() { go m.input.Run() })
		}
		return &reply{Status: "running"}
	case opSignal:
		if req.Signal <= 0 || req.Signal > 64 {
			return fail(fmt.Errorf("invalid signal %d", req.Signal))
		}
		if err := m.signal(unix.Signal(req.Signal), req.All); err != nil {
			return fail(err)
		}
		return &reply{}
	case opResize:
		if phase != phaseCreated && phase != phaseStarted {
			return fail(fmt.Errorf("container is %s", statusOfPhase(phase)))
		}
		if err := vm.Resize(req.Rows, req.Cols); err != nil {
			return fail(err)
		}
		return &reply{}
	case opExec:
		if phase != phaseCreated && phase != phaseStarted {
			return fail(fmt.Errorf("cannot exec in a container that is %s", statusOfPhase(phase)))
		}
		if req.Exec == nil || len(files) < 4 || len(files) > 5 {
			return fail(errors.New("exec needs a process and four files (and maybe the requester's life pipe)"))
		}
		if err := req.Exec.Validate(); err != nil {
			return fail(err)
		}
		id, err := vm.Exec(req.Exec, files[0], files[1], files[2], files[3])
		if err != nil {
			return fail(fmt.Errorf("exec: %w", err))
		}
		if len(files) == 5 {
			// The requester's end of a pipe: its hang-up says the
			// process that asked (exec's proxy, whose pid a caller
			// may kill -9 as runc's exec'd process) is gone, and the
			// program goes with it (found in review, helper-90).
			life := files[4]
			files[4] = nil // kept past the request
			go m.endExecWith(id, life)
		}
		return &reply{ExecID: id}
	case opExecSignal:
		if vm == nil || req.Signal <= 0 || req.Signal > 64 {
			return fail(errors.New("invalid exec signal"))
		}
		if err := vm.ExecSignal(req.ExecID, unix.Signal(req.Signal)); err != nil {
			return fail(err)
		}
		return &reply{}
	case opExecResize:
		if vm == nil {
			return fail(errors.New("no VM"))
		}
		if err := vm.ExecResize(req.ExecID, req.Rows, req.Cols); err != nil {
			return fail(err)
		}
		return &reply{}
	}
	return fail(fmt.Errorf("unknown request %q", req.Op))
}

type devNull struct{}

func (devNull) Write(p []byte) (int, error) { return len(p), nil }

// endExecWith kills exec'd program id once the process that asked for it
// is gone: life is the read end of a pipe only that process holds the
// write end of, so a read returns when it exits, whatever killed it. A
// program that ended first makes the signal a no-op (ids are not reused).
func (m *monitor) endExecWith(id uint32, life *os.File) {
	defer life.Close()
	var b [1]byte
	for {
		if _, err := life.Read(b[:]); err != nil {
			break
		}
	}
	m.mu.Lock()
	vm := m.vm
	m.mu.Unlock()
	if vm != nil {
		vm.ExecSignal(id, unix.SIGKILL)
	}
}
