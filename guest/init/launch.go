package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// reaper collects every child of PID 1 (the command, exec'd programs,
// orphans) and hands each started program's status to whoever started
// it.
type reaper struct {
	log     *logger
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
}

func newReaper(log *logger) *reaper {
	r := &reaper{log: log, waiters: map[int]chan unix.WaitStatus{}}
	sigch := make(chan os.Signal, 64)
	signal.Notify(sigch, unix.SIGCHLD)
	safeGo(log, "reaper", func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-sigch:
			case <-tick.C:
			}
			r.reapAll()
		}
	})
	return r
}

func (r *reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		if !ws.Exited() && !ws.Signaled() {
			continue
		}
		// start holds the lock from fork to registration: a status
		// reaped in between waits here for its waiter.
		r.mu.Lock()
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws
			delete(r.waiters, pid)
		}
		r.mu.Unlock()
	}
}

// start runs fn (which forks a child) and registers the child's pid.
func (r *reaper) start(fn func() (*os.Process, error)) (*os.Process, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, err := fn()
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[p.Pid] = ch
	return p, ch, nil
}

// launchResult is a started program.
type launchResult struct {
	pid int
	// launchMsg is empty when the program was exec'd; otherwise a
	// status byte and the launcher's message.
	launchMsg []byte
	exited    <-chan unix.WaitStatus
}

// status is the program's exit status as a shell reports it.
func (r *launchResult) status(ws unix.WaitStatus) int {
	if len(r.launchMsg) > 0 {
		return int(r.launchMsg[0])
	}
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return initconfig.StatusInitFailed
}

// launch starts spec through the launcher with cio's files; started runs
// once the child's ends are handed over, before the launch is known to
// have succeeded (so input can flow meanwhile).
func (in *initProc) launch(spec *launchSpec, cio commandIO, tty bool, started func()) (*launchResult, error) {
	specR, specW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("launcher pipe: %w", err)
	}
	statusR, statusW, err := os.Pipe()
	if err != nil {
		specR.Close()
		specW.Close()
		return nil, fmt.Errorf("launcher pipe: %w", err)
	}
	defer statusR.Close()
	dir := spec.Cwd
	if spec.Root != "" {
		dir = "/" // the launcher enters the root and its directory itself
	}
	files := cio.childFiles()
	proc, exited, err := in.reaper.start(func() (*os.Process, error) {
		return os.StartProcess("/proc/self/exe", []string{launcherArg0}, &os.ProcAttr{
			Dir:   dir,
			Env:   []string{},
			Files: []*os.File{files[0], files[1], files[2], specR, statusW},
			Sys:   &syscall.SysProcAttr{Setsid: true, Setctty: tty, Ctty: 0},
		})
	})
	specR.Close()
	statusW.Close()
	if err != nil {
		specW.Close()
		return nil, fmt.Errorf("start the launcher (/proc/self/exe): %w", err)
	}
	b, _ := json.Marshal(spec)
	if _, err := specW.Write(b); err != nil {
		in.log.Errorf("hand the spec to the launcher: %v", err)
	}
	specW.Close()
	cio.started(proc.Pid)
	if started != nil {
		started()
	}
	msg, _ := io.ReadAll(io.LimitReader(statusR, 4096))
	return &launchResult{pid: proc.Pid, launchMsg: msg, exited: exited}, nil
}
