// Command krun-init is the guest's PID 1 for `krun-core run --root DIR --
// CMD`. It loads the modules listed in /krun/modules, mounts the virtio-fs
// root and the usual API file systems, switches into the root, sets the
// host name, brings up networking when configured, runs the command with
// the configured environment, working directory, limits and identity, with
// its standard I/O carried as frames (guest/stdioframe) over a
// virtio-console port, reaps every orphan, and reports the command's exit
// status on an I/O port before powering off. See notes/RUN-DESIGN.md.
//
// PID 1 must never panic or return (either is a kernel panic): every
// failure becomes status 125 and a power-off.
//
// The same binary is also the launcher of the command: PID 1 starts
// /proc/self/exe as "krun-init-exec", which applies the resource limits and
// the identity while still privileged and then execs the command (Go's
// os.StartProcess cannot set resource limits in the child).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
)

func main() {
	if len(os.Args) > 0 && os.Args[0] == launcherArg0 && os.Getpid() != 1 {
		launcherMain()
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "krun-init: must run as PID 1 (the guest's init)")
		os.Exit(2)
	}
	in := &initProc{log: newLogger()}
	defer func() {
		if r := recover(); r != nil {
			in.fatal(fmt.Errorf("internal error: %v\n%s", r, debug.Stack()))
		}
	}()
	in.run()
}

// initProc is the state of PID 1.
type initProc struct {
	log   *logger
	ports *statusPorts
	cfg   *initconfig.Config
	stdio *stdio // nil until the port is open
	// ctr is the container setup (krun-oci), nil for run --root. In
	// container mode PID 1 stays in the initramfs and the launcher
	// enters rootDir.
	ctr     *container.Setup
	rootDir string
	reaper  *reaper
	execs   *execManager
}

// run does the whole job and never returns.
func (in *initProc) run() {
	// The config (a file in the initramfs) says which ports to use, so it
	// is read before the first milestone.
	cfg, err := readConfig()
	if err != nil {
		in.fatal(err)
	}
	in.cfg = cfg
	in.ports = openStatusPorts(cfg.StatusPorts())
	in.ports.milestone(initconfig.MilestoneInit)
	ignoreInitSignals()
	in.reaper = newReaper(in.log)
	if in.ctr, err = readContainer(); err != nil {
		in.fatal(err)
	}

	if err := mountEarly(); err != nil {
		in.fatal(err)
	}
	in.log.useKmsg()
	if err := in.ports.err; err != nil {
		in.log.Errorf("status ports: %v", err)
	}
	if err := loadModules(in.log, initconfig.ModulesPath); err != nil {
		in.fatal(err)
	}
	// The stdio port is looked up before the root is switched: /sys of
	// the initramfs is mounted, and errors from here on can reach the
	// user as STDERR frames.
	st, err := openStdio(in.log, cfg.Stdio, 10*time.Second)
	if err != nil {
		in.fatal(err)
	}
	in.stdio = st
	if in.ctr != nil {
		in.execs = &execManager{in: in, procs: map[uint32]*execProc{}}
		st.setExecHandler(in.execs.frame)
	}
	if err := in.setupRoot(); err != nil {
		in.fatal(err)
	}
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		in.fatal(fmt.Errorf("set hostname: %w", err))
	}
	if cfg.Network != nil {
		if err := setupNetwork(in.log, cfg.Network, 20*time.Second); err != nil {
			in.fatal(fmt.Errorf("network: %w", err))
		}
	}
	if in.ctr != nil && in.ctr.WaitForStart {
		// The container is created: programs may be exec'd, the
		// command waits for START (krun-oci start).
		in.ports.milestone(container.MilestoneReady)
		<-st.startRequested()
	}
	status := in.runCommand()
	in.finish(status)
}

// readContainer reads the container setup when the initramfs has one.
func readContainer() (*container.Setup, error) {
	b, err := os.ReadFile(container.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read container setup: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var s container.Setup
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("container setup: %w", err)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// readConfig reads /krun/config.json from the initramfs.
func readConfig() (*initconfig.Config, error) {
	b, err := os.ReadFile(initconfig.Path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return initconfig.Parse(b)
}

// fatal reports an error of init itself and ends with status 125.
func (in *initProc) fatal(err error) {
	msg := "krun-init: " + err.Error()
	in.log.Errorf("%s", err)
	if in.stdio != nil {
		in.stdio.writeStderr([]byte(msg + "\n"))
	}
	in.finish(initconfig.StatusInitFailed)
}

// finish hands the status to the host and powers off. It never returns.
func (in *initProc) finish(status int) {
	defer func() {
		// A panic here must not reach the runtime either.
		if r := recover(); r != nil {
			in.log.Printf("panic while finishing: %v", r)
			powerOff(in.log)
		}
	}()
	if in.stdio != nil {
		// No time limit: the host acknowledges once it has written out
		// every earlier byte, which a slow reader of krun-core's
		// stdout (a slow link, a paused terminal) takes as long as it
		// takes; a limit cut the last megabyte or so still in the
		// console's buffers. A host that stops reading holds the exit
		// as it would hold any writer; a console plugin that fails
		// ends the run on the host (an essential device); a host
		// that breaks the protocol or a port that fails ends the wait
		// (readLoop).
		in.stdio.close(uint8(status))
	}
	// Data on the shares is on the host before the status is: a host
	// that stops the VM on the status (QEMU's isa-debug-exit does) loses
	// nothing.
	unix.Sync()
	if in.ports == nil {
		in.ports = openStatusPorts(initconfig.DefaultMilestonePort, initconfig.DefaultExitPort)
	}
	if err := in.ports.exit(uint8(status)); err != nil {
		in.log.Printf("report exit status %d: %v", status, err)
	}
	powerOff(in.log)
}

// powerOff turns the VM off; it never returns.
func powerOff(log *logger) {
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	log.Printf("power off: %v", err)
	for {
		// Returning from PID 1 would panic the kernel.
		time.Sleep(time.Hour)
	}
}

// errNotFound and errNotExecutable classify command lookup failures.
var (
	errNotFound      = errors.New("command not found")
	errNotExecutable = errors.New("permission denied")
)
