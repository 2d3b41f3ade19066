package oci

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
)

// fakeVM runs the container's command as a host process: it lets the
// runtime's process model (monitor, state, exec proxies, signals, exit
// statuses) be tested without KVM. The real VM is tested end to end in
// e2e/oci.
type fakeVM struct {
	plan *Plan
	sio  Stdio

	mu      sync.Mutex
	cmd     *exec.Cmd
	stopped bool
	status  int
	ok      bool
	exited  chan struct{}
	once    sync.Once
	// ended is closed when the VM is gone: with the command's end, or,
	// for a command run under "linger-after-exit" (a guest that reports
	// its exit status and goes on running), only at Stop.
	ended     chan struct{}
	endOnce   sync.Once
	lingering bool
	// execs are the exec'd processes still running, for SignalAll.
	execs map[*os.Process]bool
}

// slowBoot is how long a "slow-boot" guest takes to boot.
const slowBoot = 30 * time.Second

// launcher starts processes from one locked thread that lives as long as
// the process, so their parent-death signal fires only when the monitor
// dies (as a VM dies with it).
var launcher = func() chan func() {
	ch := make(chan func())
	go func() {
		runtime.LockOSThread()
		for f := range ch {
			f()
		}
	}()
	return ch
}()

// startDying starts cmd with SIGKILL as its parent-death signal.
func startDying(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	errc := make(chan error, 1)
	launcher <- func() { errc <- cmd.Start() }
	return <-errc
}

func newFakeVM(p *Plan, sio Stdio, cfg RuntimeConfig, log hclog.Logger) (VM, error) {
	return &fakeVM{plan: p, sio: sio, exited: make(chan struct{}), ended: make(chan struct{})}, nil
}

func (v *fakeVM) Boot(ctx context.Context) error {
	if v.plan.Process.Args[0] == "fail-boot" {
		return errors.New("the guest could not boot (fake)")
	}
	if v.plan.Process.Args[0] == "slow-boot" {
		// A guest that takes slowBoot to be ready.
		select {
		case <-time.After(slowBoot):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (v *fakeVM) env() []string { return v.plan.Process.Env }

func (v *fakeVM) Start() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.stopped {
		return errors.New("stopped")
	}
	args := v.plan.Process.Args
	if args[0] == "slow-boot" {
		args = args[1:]
	}
	if args[0] == "linger-after-exit" {
		v.lingering = true
		args = args[1:]
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = v.env()
	cmd.Dir = v.plan.Root
	cmd.Stdin, cmd.Stdout, cmd.Stderr = v.sio.Stdin, v.sio.Stdout, v.sio.Stderr
	if err := startDying(cmd); err != nil {
		return err
	}
	v.cmd = cmd
	go func() {
		cmd.Wait()
		v.finish(exitCode(cmd.ProcessState), true)
	}()
	return nil
}

func exitCode(ps *os.ProcessState) int {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

func (v *fakeVM) finish(status int, ok bool) {
	v.once.Do(func() {
		v.mu.Lock()
		v.status, v.ok = status, ok
		linger := v.lingering && ok
		v.mu.Unlock()
		close(v.exited)
		if !linger {
			v.end()
		}
	})
}

func (v *fakeVM) end() { v.endOnce.Do(func() { close(v.ended) }) }

func (v *fakeVM) Signal(sig unix.Signal) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil {
		return errors.New("not started")
	}
	return v.cmd.Process.Signal(sig)
}

// SignalAll signals the command and the exec'd processes still running,
// as kill(-1) in the guest does (their children aside).
func (v *fakeVM) SignalAll(sig unix.Signal) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil {
		return errors.New("not started")
	}
	v.cmd.Process.Signal(sig)
	for p := range v.execs {
		p.Signal(sig)
	}
	return nil
}

func (v *fakeVM) Resize(rows, cols uint16) error { return nil }

func (v *fakeVM) Exec(p *container.Process, stdin, stdout, stderr, status *os.File) (uint32, error) {
	if p.Args[0] == "vm-ends-during-exec" {
		// The console plugin closes the status without a byte when
		// the VM ends first; the monitor closes the received files.
		return 77, nil
	}
	cmd := exec.Command(p.Args[0], p.Args[1:]...)
	cmd.Env = p.Env
	cmd.Dir = v.plan.Root
	// Own copies: the monitor closes the received files after Exec.
	files := []*os.File{}
	for _, f := range []*os.File{stdin, stdout, stderr, status} {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return 0, err
		}
		files = append(files, os.NewFile(uintptr(fd), f.Name()))
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = files[0], files[1], files[2]
	if err := startDying(cmd); err != nil {
		closeFiles(files)
		return 0, err
	}
	files[0].Close()
	files[1].Close()
	files[2].Close()
	v.mu.Lock()
	if v.execs == nil {
		v.execs = map[*os.Process]bool{}
	}
	v.execs[cmd.Process] = true
	v.mu.Unlock()
	go func() {
		cmd.Wait()
		v.mu.Lock()
		delete(v.execs, cmd.Process)
		v.mu.Unlock()
		files[3].Write([]byte{byte(exitCode(cmd.ProcessState))})
		files[3].Close()
	}()
	return uint32(cmd.Process.Pid), nil
}

func (v *fakeVM) ExecSignal(id uint32, sig unix.Signal) error { return unix.Kill(int(id), sig) }

func (v *fakeVM) ExecResize(id uint32, rows, cols uint16) error { return nil }

func (v *fakeVM) Exited() <-chan struct{} { return v.exited }

func (v *fakeVM) Wait() (int, bool, error) {
	<-v.ended
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.status, v.ok, nil
}

func (v *fakeVM) Stop() {
	v.mu.Lock()
	v.stopped = true
	if v.cmd != nil {
		v.cmd.Process.Kill()
	}
	v.mu.Unlock()
	v.finish(0, false)
	v.end()
}
