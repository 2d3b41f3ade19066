// Package netnstest gives tests a network namespace of their own, so that
// whatever passt or a guest does with the network stays on the machine: a
// veth pair whose two ends both live in the namespace, one holding the
// default route and an address (which passt copies for its guest), the
// other the gateway's address.
package netnstest

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// The namespace's addresses.
const (
	Addr    = "10.200.0.2" // on veth0, with the default route
	Gateway = "10.200.0.1" // on veth1
)

var seq atomic.Int32

// New creates a namespace for t and returns its name (for `ip netns exec`
// and Run). It skips t when not root or without iproute2.
func New(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip (iproute2) is not installed")
	}
	name := fmt.Sprintf("krun-test-%d-%d", os.Getpid(), seq.Add(1))
	run := func(args ...string) {
		if b, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run("-n", name, "link", "set", "lo", "up")
	run("-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
	run("-n", name, "addr", "add", Addr+"/24", "dev", "veth0")
	run("-n", name, "link", "set", "veth0", "up")
	run("-n", name, "link", "set", "veth1", "up")
	run("-n", name, "addr", "add", Gateway+"/24", "dev", "veth1")
	run("-n", name, "route", "add", "default", "via", Gateway, "dev", "veth0")
	return name
}

// Run runs fn on an OS thread that has entered namespace name; sockets fn
// creates belong to it. The thread goes back to its own namespace
// afterwards. It must not simply exit: a child process started from that
// thread earlier (QEMU, with a parent-death signal) would be killed.
func Run(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer home.Close()
		f, err := os.Open("/var/run/netns/" + name)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); rerr == nil {
			runtime.UnlockOSThread()
		} // else: stay locked, the runtime retires the thread
		errc <- err
	}()
	return <-errc
}

// Command is exec.Command for a program run inside namespace name.
func Command(name, prog string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", name, prog}, args...)...)
}

// StartPasst starts passt in namespace name on peer, its end of a stream
// socket pair (passt's --fd), which it closes once passt holds it. passt is
// killed when the test ends, and its output logged if the test failed.
func StartPasst(t testing.TB, name string, peer *os.File) {
	t.Helper()
	cmd := Command(name, "passt", "--foreground", "--quiet", "--fd", "3")
	cmd.ExtraFiles = []*os.File{peer}
	out := &syncbuf.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	err := cmd.Start()
	peer.Close()
	if err != nil {
		t.Fatalf("start passt: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("passt output:\n%s", out.String())
		}
	})
}
