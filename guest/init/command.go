package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
)

// After the command has exited, its output is collected until end of file,
// but a background process it left behind may keep the pipes open: then
// reading stops after drainIdle without data, or drainMax in all. What the
// command itself wrote is never cut: it sits in the pipe (at most its
// capacity), a read of buffered data does not wait, and the time the host
// takes to accept it (flow control: a slow reader of krun-core's stdout)
// does not count against either limit. Only those bytes, the ones in the
// pipe when the command exited, are owed that time: what a leftover
// process writes after it is drained within drainMax, however slow the
// host.
const (
	drainIdle = 500 * time.Millisecond
	drainMax  = 5 * time.Second
)

// drainer arms read deadlines on an output once the command has exited.
type drainer struct {
	mu    sync.Mutex
	began time.Time // when the drain began
	until time.Time // zero while the command runs
	owed  int       // bytes still to deliver of those in f when it began
}

// start begins draining f.
func (d *drainer) start(f *os.File, now time.Time) {
	owed := buffered(f)
	d.mu.Lock()
	d.began, d.until, d.owed = now, now.Add(drainMax), owed
	d.mu.Unlock()
	d.rearm(f)
}

// buffered returns how many bytes f (a pipe or a pty master) holds unread.
func buffered(f *os.File) int {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	rc.Control(func(fd uintptr) {
		// TIOCINQ is FIONREAD, which pipes answer too.
		if v, err := unix.IoctlGetInt(int(fd), unix.TIOCINQ); err == nil && v > 0 {
			n = v
		}
	})
	return n
}

// delivered accounts for n bytes handed to the host in a call that began
// at t0 (read from f at about t0): the time the host took moves the
// overall limit when the bytes were the command's own, those in f when
// the drain began (or read before it), and not for a leftover process's
// later output.
func (d *drainer) delivered(n int, t0 time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.until.IsZero() {
		return
	}
	switch {
	case t0.Before(d.began):
		t0 = d.began // read before the drain: the command's
	case d.owed > 0:
		d.owed = max(d.owed-n, 0)
	default:
		return
	}
	if waited := time.Since(t0); waited > 0 {
		d.until = d.until.Add(waited)
	}
}

// rearm gives f another idle period, within the overall limit.
func (d *drainer) rearm(f *os.File) {
	d.mu.Lock()
	until := d.until
	d.mu.Unlock()
	if until.IsZero() {
		return
	}
	dl := time.Now().Add(drainIdle)
	if dl.After(until) {
		dl = until
	}
	f.SetReadDeadline(dl)
}

// pump copies r to out until EOF, an error or the drain deadline.
func pump(r *os.File, d *drainer, out func([]byte)) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			t0 := time.Now()
			out(buf[:n])
			d.delivered(n, t0)
			d.rearm(r)
		}
		if err != nil {
			return
		}
	}
}

// execIDs are the credentials the program is executed with, as the
// kernel's permission checks see them: ids, supplementary groups, and
// whether its effective capabilities override file permissions
// (CAP_DAC_OVERRIDE: any x bit, any directory) or directory search
// (CAP_DAC_READ_SEARCH). Root without capability sets overrides both.
type execIDs struct {
	uid, gid           uint32
	groups             []uint32
	override, readSrch bool
}

// idsOf returns the credentials of a program run as uid:gid with groups
// and, when caps is not nil, its capability sets (an OCI process's);
// without them root keeps its full set and any other user has none.
func idsOf(uid, gid uint32, groups []uint32, caps *container.Capabilities) execIDs {
	ids := execIDs{uid: uid, gid: gid, groups: groups, override: uid == 0, readSrch: uid == 0}
	if caps != nil {
		ids.override = slices.Contains(caps.Effective, "CAP_DAC_OVERRIDE")
		ids.readSrch = ids.override || slices.Contains(caps.Effective, "CAP_DAC_READ_SEARCH")
	}
	return ids
}

// lookPath resolves the command like a shell inside the (already switched)
// root: a name with a slash is taken relative to workdir, anything else is
// searched in pathEnv. errNotFound and errNotExecutable give 127 and 126.
func lookPath(file, pathEnv, workdir string, ids execIDs) (string, error) {
	check := func(p string) error {
		st, err := os.Stat(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
				return errNotFound
			}
			return err
		}
		if st.IsDir() || !executable(st, ids) {
			return errNotExecutable
		}
		// The kernel also wants every directory on the way searchable
		// by the user (execvp then goes on to the next PATH entry).
		for d := filepath.Dir(p); !ids.readSrch; d = filepath.Dir(d) {
			if st, err := os.Stat(d); err != nil || permBits(st, ids)&0o1 == 0 {
				return errNotExecutable
			}
			if d == "/" || d == "." {
				break
			}
		}
		return nil
	}
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(workdir, p)
		}
		return p, check(p)
	}
	firstErr := errNotFound
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(workdir, dir)
		}
		p := filepath.Join(dir, file)
		err := check(p)
		if err == nil {
			return p, nil
		}
		if firstErr == errNotFound && err != errNotFound {
			firstErr = err
		}
	}
	return "", firstErr
}

// executable reports whether st may be executed with ids (overriding
// file permissions: when any execute bit is set).
func executable(st os.FileInfo, ids execIDs) bool {
	mode := st.Mode()
	if !mode.IsRegular() {
		return false
	}
	if ids.override {
		return mode.Perm()&0o111 != 0
	}
	return permBits(st, ids)&0o1 != 0
}

// permBits returns the permission bits (rwx, 0 to 7) of st's class that
// applies to ids: owner, group or other.
func permBits(st os.FileInfo, ids execIDs) uint32 {
	perm := uint32(st.Mode().Perm())
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return perm & 0o7
	}
	if sys.Uid == ids.uid {
		return perm >> 6 & 0o7
	}
	inGroup := sys.Gid == ids.gid
	for _, g := range ids.groups {
		inGroup = inGroup || sys.Gid == g
	}
	if inGroup {
		return perm >> 3 & 0o7
	}
	return perm & 0o7
}

// launchSpec is what PID 1 hands the launcher on fd 3.
type launchSpec struct {
	// Path is the program; "" makes the launcher look Args[0] up (after
	// entering Root).
	Path    string              `json:"path"`
	Args    []string            `json:"args"`
	Env     []string            `json:"env"`
	Rlimits []initconfig.Rlimit `json:"rlimits"`
	UID     uint32              `json:"uid"`
	GID     uint32              `json:"gid"`
	Groups  []uint32            `json:"groups"`
	// Root, when set, is entered (chroot) and Cwd made and entered in
	// it; otherwise the launcher starts in Cwd.
	Root   string            `json:"root,omitempty"`
	Cwd    string            `json:"cwd,omitempty"`
	Extras *container.Extras `json:"extras,omitempty"`
}

// launcherArg0 marks the launcher process (argv[0]).
const launcherArg0 = "krun-init-exec"

// The launcher's extra descriptors.
const (
	launchSpecFD   = 3
	launchStatusFD = 4
)

// launcherMain runs in the command's process, between fork and exec:
// limits, identity, exec. A failure is reported on the status pipe (one
// status byte and a message); a successful exec closes it (close-on-exec).
func launcherMain() {
	// Capabilities, no_new_privs and the bounding set are per thread:
	// everything up to exec happens on this one.
	runtime.LockOSThread()
	status := os.NewFile(launchStatusFD, "status")
	fail := func(code int, format string, a ...any) {
		msg := fmt.Sprintf(format, a...)
		status.Write(append([]byte{byte(code)}, msg...))
		os.Exit(code)
	}
	if _, err := unix.FcntlInt(launchStatusFD, unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		fail(initconfig.StatusInitFailed, "launcher: status pipe: %v", err)
	}
	if len(os.Args) != 1 {
		fail(initconfig.StatusInitFailed, "launcher: unexpected arguments %q", os.Args[1:])
	}
	specFile := os.NewFile(launchSpecFD, "spec")
	b, err := io.ReadAll(io.LimitReader(specFile, initconfig.MaxSize+1))
	specFile.Close()
	if err != nil {
		fail(initconfig.StatusInitFailed, "launcher: read spec: %v", err)
	}
	var spec launchSpec
	if err := json.Unmarshal(b, &spec); err != nil || len(spec.Args) == 0 {
		fail(initconfig.StatusInitFailed, "launcher: bad spec (%d bytes): %v", len(b), err)
	}
	// A name given twice (an OCI config's env, an exec's) is the last
	// value to the program too, as to the PATH lookup below.
	spec.Env = initconfig.UniqueEnv(spec.Env)
	if spec.Root != "" {
		if err := container.EnterRoot(spec.Root, spec.Cwd); err != nil {
			fail(initconfig.StatusInitFailed, "%v", err)
		}
		// A container's process without HOME gets its user's, as
		// under runc (docker and containerd leave it to the runtime).
		spec.Env = withHome(spec.Env, spec.UID, openFile("/etc/passwd"))
	}
	if spec.Path == "" {
		pathEnv := initconfig.DefaultPath
		for _, kv := range spec.Env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				pathEnv = v
			}
		}
		var caps *container.Capabilities
		if spec.Extras != nil {
			caps = spec.Extras.Capabilities
		}
		p, err := lookPath(spec.Args[0], pathEnv, spec.Cwd, idsOf(spec.UID, spec.GID, spec.Groups, caps))
		if err != nil {
			code := initconfig.StatusNotExecutable
			if err == errNotFound {
				code = initconfig.StatusNotFound
			}
			fail(code, "%s: %v", spec.Args[0], err)
		}
		spec.Path = p
	}
	for _, rl := range spec.Rlimits {
		num, ok := initconfig.RlimitNumber(rl.Type)
		if !ok {
			fail(initconfig.StatusInitFailed, "unknown resource limit %s", rl.Type)
		}
		// syscall.Setrlimit, not a raw prlimit: it tells the Go runtime
		// that RLIMIT_NOFILE was set on purpose, so exec keeps it.
		if err := syscall.Setrlimit(num, &syscall.Rlimit{Cur: rl.Soft, Max: rl.Hard}); err != nil {
			fail(initconfig.StatusInitFailed, "set %s to %s: %v", rl.Type, rl.String(), err)
		}
	}
	if spec.Extras != nil {
		if err := spec.Extras.ApplyPrivileged(); err != nil {
			fail(initconfig.StatusInitFailed, "%v", err)
		}
	}
	// (uid_t)-1 would leave the ids unchanged (root's): never run so.
	if err := initconfig.ValidIDs(spec.UID, spec.GID, spec.Groups); err != nil {
		fail(initconfig.StatusInitFailed, "%v", err)
	}
	// Hand the standard I/O to the user, as runc does
	// (fixStdioPermissions): pipes are made 0600 and the pty 0620 by
	// root, and a program opening /dev/stdout again would get EACCES.
	giveStdio(spec.UID)
	groups := make([]int, len(spec.Groups))
	for i, g := range spec.Groups {
		groups[i] = int(g)
	}
	if err := syscall.Setgroups(groups); err != nil {
		fail(initconfig.StatusInitFailed, "setgroups %v: %v", spec.Groups, err)
	}
	if err := syscall.Setresgid(int(spec.GID), int(spec.GID), int(spec.GID)); err != nil {
		fail(initconfig.StatusInitFailed, "setgid %d: %v", spec.GID, err)
	}
	if err := syscall.Setresuid(int(spec.UID), int(spec.UID), int(spec.UID)); err != nil {
		fail(initconfig.StatusInitFailed, "setuid %d: %v", spec.UID, err)
	}
	if spec.Extras != nil {
		if err := spec.Extras.ApplyUnprivileged(); err != nil {
			fail(initconfig.StatusInitFailed, "%v", err)
		}
	}
	signal.Reset()
	err = syscall.Exec(spec.Path, spec.Args, spec.Env)
	code := initconfig.StatusNotExecutable
	if errors.Is(err, syscall.ENOENT) {
		code = initconfig.StatusNotFound
	}
	fail(code, "%s: %v", spec.Args[0], err)
}

// giveStdio makes uid the owner of descriptors 0, 1 and 2 (the group
// stays), as runc does before it switches to the user: the command can
// then open them again through /dev/stdout or /proc/self/fd. /dev/null
// and what uid owns already are left alone, and so is a descriptor the
// kernel will not change (runc's choice too).
func giveStdio(uid uint32) {
	var null unix.Stat_t
	nullErr := unix.Stat("/dev/null", &null)
	for fd := 0; fd <= 2; fd++ {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil || st.Uid == uid {
			continue
		}
		if nullErr == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == null.Rdev {
			continue
		}
		_ = unix.Fchown(fd, int(uid), int(st.Gid))
	}
}

// commandIO is the command's standard I/O as PID 1 sees it.
type commandIO interface {
	sink
	childFiles() [3]*os.File // the command's stdin, stdout, stderr
	started(pid int)         // close the child's ends, start pumping
	finish()                 // drain the output (see drainIdle)
}

// runCommand starts the command and returns its exit status once it has
// exited and its output is drained; failures to start it become 125, 126
// or 127 with a message on the STDERR frame.
func (in *initProc) runCommand() int {
	cfg := in.cfg
	if cfg.User != "" {
		// run's --user, resolved in the root init has entered. A
		// container's root is only prepared here, and krun-core never
		// sends a user spec with one (the OCI runtime gives ids).
		var id *identity
		err := errors.New("a user spec needs a root krun-init has entered, not a container's")
		if in.rootDir == "" {
			id, err = resolveUser(cfg.User, openFile("/etc/passwd"), openFile("/etc/group"))
		}
		if err != nil {
			in.stdio.writeStderr([]byte(fmt.Sprintf("krun-init: --user %s: %v\n", cfg.User, err)))
			return initconfig.StatusInitFailed
		}
		c := *cfg
		c.UID, c.GID, c.AdditionalGIDs = id.uid, id.gid, id.groups
		if _, ok := c.Getenv("HOME"); !ok {
			c.Env = append(slices.Clone(c.Env), "HOME="+id.home)
		}
		cfg = &c
	}
	spec := launchSpec{Args: cfg.Args, Env: cfg.Env, Rlimits: cfg.Rlimits, UID: cfg.UID, GID: cfg.GID, Groups: cfg.AdditionalGIDs}
	if in.rootDir != "" {
		// Container mode: the launcher enters the root, makes the
		// working directory and looks the command up there.
		spec.Root, spec.Cwd = in.rootDir, cfg.Workdir
		extras := in.ctr.Process
		spec.Extras = &extras
	} else {
		pathEnv, ok := cfg.Getenv("PATH")
		if !ok {
			pathEnv = initconfig.DefaultPath
		}
		if st, err := os.Stat(cfg.Workdir); err != nil || !st.IsDir() {
			msg := "not a directory"
			if err != nil {
				msg = err.Error()
			}
			in.stdio.writeStderr([]byte(fmt.Sprintf("krun-init: working directory %s: %s\n", cfg.Workdir, msg)))
			return initconfig.StatusInitFailed
		}
		path, err := lookPath(cfg.Args[0], pathEnv, cfg.Workdir, idsOf(cfg.UID, cfg.GID, cfg.AdditionalGIDs, nil))
		if err != nil {
			code := initconfig.StatusNotExecutable
			if err == errNotFound {
				code = initconfig.StatusNotFound
			}
			in.stdio.writeStderr([]byte(fmt.Sprintf("krun-init: %s: %v\n", cfg.Args[0], err)))
			return code
		}
		spec.Path, spec.Cwd = path, cfg.Workdir
	}

	var cio commandIO
	if cfg.TTY {
		p, err := newPtyIO(in, cfg.Winsize, in.stdio.writeStdout)
		if err != nil {
			in.fatal(err)
		}
		cio = p
	} else {
		p, err := newPipeIO(in, in.stdio.writeStdout, in.stdio.writeStderr)
		if err != nil {
			in.fatal(err)
		}
		cio = p
	}
	res, err := in.launch(&spec, cio, cfg.TTY, func() { in.stdio.setSink(cio) })
	if err != nil {
		in.fatal(err)
	}
	if len(res.launchMsg) == 0 {
		in.ports.milestone(initconfig.MilestoneExec)
		// Signals that came before the exec go to the command now
		// that it runs (not to the launcher, which a SIGQUIT would
		// make print Go's goroutine dump and the others kill), as
		// runc forwards what it caught while starting the container.
		for _, sig := range in.stdio.keptSignals() {
			cio.signal(sig)
		}
	} else {
		in.stdio.writeStderr([]byte("krun-init: " + string(res.launchMsg[1:]) + "\n"))
	}
	ws := <-res.exited
	cio.finish()
	return res.status(ws)
}

// ignoreInitSignals catches the signals the kernel or a user may send to
// PID 1 (SIGINT on ctrl-alt-del, SIGTERM, SIGHUP, SIGPIPE): Go's default
// for some of them is to exit, and PID 1 must not. Catching instead of
// ignoring matters: an ignored signal stays ignored across exec, a caught
// one does not. The synchronous ones (SIGSEGV, SIGBUS, SIGFPE, SIGILL,
// SIGTRAP, and SIGABRT, SIGSTKFLT, SIGSYS) crash a Go program with a
// stack dump when another process sends them (kill -ABRT 1); caught, only
// the sent ones are: a fault of init's own still panics.
func ignoreInitSignals() {
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGPIPE, unix.SIGUSR1, unix.SIGUSR2, unix.SIGQUIT,
		unix.SIGABRT, unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE, unix.SIGILL, unix.SIGTRAP, unix.SIGSTKFLT, unix.SIGSYS)
	go func() {
		for range ch {
		}
	}()
}

// pipeIO gives the command pipes.
type pipeIO struct {
	in                 *initProc
	out, errOut        func([]byte)
	childIn, childOut  *os.File
	childErr           *os.File
	stdinW             *os.File
	stdoutR, stderrR   *os.File
	pid                int
	mu                 sync.Mutex
	stdinClosed        bool
	wg                 sync.WaitGroup
	outDrain, errDrain drainer
}

func newPipeIO(in *initProc, out, errOut func([]byte)) (*pipeIO, error) {
	p := &pipeIO{in: in, out: out, errOut: errOut}
	var err error
	if p.childIn, p.stdinW, err = os.Pipe(); err != nil {
		return nil, fmt.Errorf("stdin pipe: %w", err)
	}
	if p.stdoutR, p.childOut, err = os.Pipe(); err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	if p.stderrR, p.childErr, err = os.Pipe(); err != nil {
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	return p, nil
}

func (p *pipeIO) childFiles() [3]*os.File { return [3]*os.File{p.childIn, p.childOut, p.childErr} }

func (p *pipeIO) started(pid int) {
	p.pid = pid
	p.childIn.Close()
	p.childOut.Close()
	p.childErr.Close()
	p.wg.Add(2)
	safeGo(p.in.log, "stdout pump", func() { defer p.wg.Done(); pump(p.stdoutR, &p.outDrain, p.out) })
	safeGo(p.in.log, "stderr pump", func() { defer p.wg.Done(); pump(p.stderrR, &p.errDrain, p.errOut) })
}

func (p *pipeIO) stdin(b []byte) error {
	_, err := p.stdinW.Write(b)
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, os.ErrClosed) {
		return nil // the command does not read its input (any more)
	}
	return err
}

func (p *pipeIO) stdinEOF() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.stdinClosed {
		p.stdinClosed = true
		p.stdinW.Close()
	}
}

func (p *pipeIO) winsize(rows, cols uint16) {}

func (p *pipeIO) signal(sig int) { forwardSignal(p.in.log, p.pid, sig) }

func (p *pipeIO) finish() {
	p.stdinEOF() // also unblocks a stdin write stuck on a full pipe
	now := time.Now()
	p.outDrain.start(p.stdoutR, now)
	p.errDrain.start(p.stderrR, now)
	p.wg.Wait()
}

func forwardSignal(log *logger, pid, sig int) {
	if pid <= 0 {
		return
	}
	if err := unix.Kill(pid, unix.Signal(sig)); err != nil && err != unix.ESRCH {
		log.Printf("forward signal %d to %d: %v", sig, pid, err)
	}
}
