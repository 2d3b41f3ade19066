package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// spawnOptions describe a detached helper process (the monitor or an
// exec proxy): krun-oci itself with a hidden sub-command.
type spawnOptions struct {
	Args  []string // after argv[0]
	Stdio [3]*os.File
	Extra []*os.File // fds 3, 4, ...
	// NetNS is a network namespace the process is born in ("" keeps
	// ours).
	NetNS string
	// NewNetNS: the process is born in a new network namespace.
	NewNetNS bool
	// Ctty makes Stdio[0], a terminal, the new session's controlling
	// terminal.
	Ctty bool
}

// spawn starts a detached helper in a session of its own. It is not
// waited for: it outlives this process, and its parent becomes the
// caller's subreaper (conmon, containerd's shim), which collects its exit
// status.
func spawn(o spawnOptions) (*os.Process, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find krun-oci's executable: %w", err)
	}
	cmd := exec.Command(exe, o.Args...)
	cmd.Args[0] = "krun-oci"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdio[0], o.Stdio[1], o.Stdio[2]
	cmd.ExtraFiles = o.Extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if o.Ctty {
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
	}
	if o.NewNetNS {
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWNET
	}
	if o.NetNS == "" {
		if err := cmd.Start(); err != nil {
			if o.NewNetNS {
				return nil, fmt.Errorf("a new network namespace (the config asks for one): %w", err)
			}
			return nil, err
		}
		return cmd.Process, nil
	}
	// The child inherits the network namespace of the thread that forks
	// it: join the namespace on a locked thread that is thrown away
	// afterwards (returning from a locked goroutine ends its thread).
	type result struct {
		p   *os.Process
		err error
	}
	rc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// Translate checked the path; the open neither blocks nor takes
		// a terminal, and the file is checked again once open.
		fd, err := unix.Open(o.NetNS, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		if err != nil {
			rc <- result{err: fmt.Errorf("network namespace %s: %w", o.NetNS, err)}
			return
		}
		defer unix.Close(fd)
		var sfs unix.Statfs_t
		if err := unix.Fstatfs(fd, &sfs); err != nil || sfs.Type != unix.NSFS_MAGIC {
			rc <- result{err: fmt.Errorf("network namespace %s: not a namespace file (nsfs)", o.NetNS)}
			return
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			rc <- result{err: fmt.Errorf("join network namespace %s: %w", o.NetNS, err)}
			return
		}
		if err := cmd.Start(); err != nil {
			rc <- result{err: err}
			return
		}
		rc <- result{p: cmd.Process}
	}()
	r := <-rc
	return r.p, r.err
}

// runHooks runs hooks in order with the container's state on their
// stdin, in the directory dir; the first failure is returned. create runs
// its hooks in the bundle, as runc does (its create changes into the
// bundle first; its start and delete do not).
// A signal that ends create ends the hook that runs (k: nil for none).
func runHooks(kind string, hooks []specs.Hook, st *specs.State, dir string, k *hookKiller) error {
	if len(hooks) == 0 {
		return nil
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	for _, h := range hooks {
		if err := runHook(h, b, dir, k); err != nil {
			return fmt.Errorf("%s hook %s: %w", kind, h.Path, err)
		}
	}
	return nil
}

// runHooksWarn runs every hook in order, in the directory dir ("": the
// runtime's), as poststart and poststop hooks are run: a failed one is
// passed to warn and the rest still run.
func runHooksWarn(kind string, hooks []specs.Hook, st *specs.State, dir string, warn func(error)) {
	if len(hooks) == 0 {
		return
	}
	b, err := json.Marshal(st)
	if err != nil {
		warn(err)
		return
	}
	for _, h := range hooks {
		if err := runHook(h, b, dir, nil); err != nil {
			warn(fmt.Errorf("%s hook %s: %w", kind, h.Path, err))
		}
	}
}

// hookIODelay is how long a hook's output is read after the hook ended
// (or was killed at its timeout) while other processes hold it open.
const hookIODelay = 2 * time.Second

// hookKiller ends the hook create runs when a signal ends create: the
// runtime exits then, and the hook (a prestart hook setting up a network,
// say) was left running, unwaited for. Its zero value is ready.
type hookKiller struct {
	mu      sync.Mutex
	running *os.Process
	stopped bool
}

// started records p as the hook that runs, or kills it if the killer was
// stopped already; it reports whether p may run.
func (k *hookKiller) started(p *os.Process) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopped {
		p.Kill()
		return false
	}
	k.running = p
	return true
}

// ended records that the hook that ran ended.
func (k *hookKiller) ended() {
	k.mu.Lock()
	k.running = nil
	k.mu.Unlock()
}

// stop kills the hook that runs, if one does, and every hook started
// later, at its start.
func (k *hookKiller) stop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.stopped = true
	if k.running != nil {
		k.running.Kill()
	}
}

// runHook runs one hook in dir ("": the runtime's working directory); k
// (nil: none) may end it.
func runHook(h specs.Hook, state []byte, dir string, k *hookKiller) error {
	ctx := context.Background()
	if h.Timeout != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(*h.Timeout)*time.Second)
		defer cancel()
	}
	args := h.Args
	if len(args) == 0 {
		args = []string{h.Path}
	}
	cmd := exec.CommandContext(ctx, h.Path)
	cmd.Args = args
	cmd.Dir = dir
	// A hook without env gets the runtime's environment, as runc's
	// (exec.Cmd's nil Env): it ran with none, so a hook that
	// finds its tools through PATH (a Go or Python one; a shell has a
	// default PATH of its own) or reads XDG_RUNTIME_DIR worked under runc
	// and failed here (found in review, helper-140).
	cmd.Env = h.Env
	cmd.Stdin = bytes.NewReader(state)
	// The hook's output is read through a pipe, which a process the hook
	// left behind (`daemon &` in a shell script) may hold open: Wait then
	// waited for that process to end too, past the hook's own exit and
	// past its timeout (a hook of timeout 2 that had started a `sleep
	// 100` held create for 100 s; found in review, helper-140). The
	// pipes are closed hookIODelay after the hook ends or is killed.
	cmd.WaitDelay = hookIODelay
	// Timed out is the hook's own process killed at its timeout, not the
	// context's end: a hook that exited at once and left its output held
	// is read for hookIODelay more, past a shorter timeout, and was
	// reported as timed out (found in review).
	var killed atomic.Bool
	cmd.Cancel = func() error {
		err := cmd.Process.Kill()
		if err == nil {
			killed.Store(true)
		}
		return err
	}
	var outBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outBuf, &outBuf
	err := cmd.Start()
	if err == nil {
		if k != nil && !k.started(cmd.Process) {
			cmd.Wait()
			return errors.New("ended by a signal to the runtime")
		}
		err = cmd.Wait()
		if k != nil {
			k.ended()
		}
	}
	out := outBuf.Bytes()
	if killed.Load() {
		return fmt.Errorf("timed out after %ds", *h.Timeout)
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		err = nil // the hook succeeded; what it left holds its output
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && len(out) > 0 {
			return fmt.Errorf("%v: %s", err, oneLine(string(out)))
		}
		return err
	}
	return nil
}
