package sandbox

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// TrampolineName is argv[0] of the launcher's own binary when it runs as
// the trampoline: LaunchConfig.Apply makes the command re-execute
// /proc/self/exe under this name, with the plugin's own argv after it.
// Every binary that imports this package can act as the trampoline: the
// package's init recognizes the name (and KRUN_SANDBOX) and never returns.
const TrampolineName = "krun-sandbox-exec"

func init() {
	if len(os.Args) < 2 || os.Args[0] != TrampolineName {
		return
	}
	if len(os.Args) == 2 && os.Args[1] == userNSArg && os.Getenv(envUserNS) == "1" {
		os.Exit(holdUserNamespace()) // for LaunchConfig.IDMapShare
	}
	raw, ok := os.LookupEnv(envName)
	if !ok {
		return
	}
	os.Exit(trampoline(raw, os.Args[1:]))
}

// trampoline applies the sandbox to this process and execs the plugin, so
// that no instruction of the plugin runs outside it. It returns only on
// failure, with the exit status.
//
// Each per-thread layer (no_new_privs, capabilities, Landlock, seccomp) is
// applied to the calling thread only: execve keeps the calling thread's
// credentials, flags and filters and ends every other thread. The other
// layers (namespaces, rlimits, mounts) belong to the whole process.
func trampoline(raw string, argv []string) int {
	runtime.LockOSThread() // init runs locked to the main thread; stay on it
	e, err := decodeLaunchEnv(raw)
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandbox: launcher: %v\n", err)
		return 1
	}
	fail := func(layer Layer, err error) int {
		msg := fmt.Sprintf("sandbox: %s: %v", layer, err)
		fmt.Fprintln(os.Stderr, msg)
		_ = sendOnChan(e.ChanFD, chanFailed+msg, -1)
		return 1
	}
	// The launcher's two fds end at exec; everything else is the plugin's.
	unix.CloseOnExec(e.ExecFD)
	unix.CloseOnExec(e.ChanFD)
	if e.TrampolineFD > 0 {
		unix.CloseOnExec(e.TrampolineFD)
	}
	off := func(l Layer) bool { return slices.Contains(e.Disabled, l) }
	if !off(LayerNamespaces) {
		if err := checkNamespaces(); err != nil {
			return fail(LayerNamespaces, err)
		}
	}
	if err := applyRlimits(e.Limits, limitsTasks(e.Disabled)); err != nil {
		return fail(LayerRlimits, err)
	}
	// A write past RLIMIT_FSIZE raises SIGXFSZ, whose default action ends
	// the process. An ignored signal stays ignored across exec, so the
	// plugin's write fails with EFBIG instead, whatever language it is
	// written in (the Go runtime drops SIGXFSZ on its own too).
	signal.Ignore(syscall.SIGXFSZ)
	if !off(LayerRoot) {
		if err := enterEmptyRoot(e.Root, e.SocketDir); err != nil {
			return fail(LayerRoot, err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fail(LayerNoNewPrivs, err)
	}
	if err := dropCapabilitiesSelf(); err != nil {
		return fail(LayerCapabilities, err)
	}
	if !off(LayerLandlock) {
		rules := []landlockRule{{fd: e.ExecFD, rights: landlockExec, file: true}}
		for _, d := range e.DirFDs {
			rights := ^uint64(0) &^ landlockNever
			if e.DirsReadOnly {
				rights = landlockReadOnly
			}
			rules = append(rules, landlockRule{fd: d, rights: rights})
		}
		switch {
		case e.SocketFD > 0:
			rules = append(rules, landlockRule{fd: e.SocketFD, rights: landlockSocketDir})
		case e.SocketDir != "":
			sd, err := unix.Open(e.SocketDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fail(LayerLandlock, fmt.Errorf("socket directory %s: %w", e.SocketDir, err))
			}
			rules = append(rules, landlockRule{fd: sd, rights: landlockSocketDir})
		}
		if _, err := applyLaunchLandlock(rules); err != nil {
			return fail(LayerLandlock, err)
		}
	}
	listener := -1
	if !off(LayerSeccomp) {
		// The filter goes in with SPEC_ALLOW; this keeps what of the
		// kernel's seccomp speculation policy isolates processes (see
		// specAllow).
		if err := speculationIsolate(); err != nil {
			return fail(LayerSeccomp, err)
		}
		if listener, _, err = installLaunchFilter(e); err != nil {
			return fail(LayerSeccomp, err)
		}
	}
	// From here on only what the filter allows: sendmsg, close, execveat.
	msg := chanNone
	if listener >= 0 {
		msg = chanListener
	}
	if err := sendOnChan(e.ChanFD, msg, listener); err != nil {
		// Without the launcher holding it, the listener would make every
		// refused call hang; and the plugin must never get it.
		fmt.Fprintf(os.Stderr, "sandbox: seccomp: hand the listener to the launcher: %v\n", err)
		return 1
	}
	if listener >= 0 {
		unix.Close(listener)
	}
	err = execveatEmpty(e.ExecFD, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "sandbox: exec %s: %v\n", argv[0], err)
	return 1
}

// sendOnChan sends one message, with fd (if >= 0) as SCM_RIGHTS.
func sendOnChan(ch int, msg string, fd int) error {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	return unix.Sendmsg(ch, []byte(msg), oob, nil, 0)
}

// dropCapabilitiesSelf empties every capability set of the calling thread.
// The bounding set can only be cut with CAP_SETPCAP (root of the plugin's
// user namespace has it); without it (namespaces disabled) the permitted
// set is already that of an unprivileged user.
func dropCapabilitiesSelf() error {
	eff, _, _, err := capget()
	if err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	if eff&(1<<unix.CAP_SETPCAP) != 0 {
		for c := 0; c <= 63; c++ {
			in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0)
			if err != nil {
				break // EINVAL: past the last capability of this kernel
			}
			if in == 0 {
				continue
			}
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient set: %w", err)
	}
	if err := capsetZero(); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	eff, perm, inh, err := capget()
	if err != nil || eff|perm|inh != 0 {
		return fmt.Errorf("capabilities left after dropping: eff %#x perm %#x inh %#x (%v)", eff, perm, inh, err)
	}
	return nil
}
