// Command reviewplugin is a misbehaving SDK plugin for the tests in
// misbehaving_plugin_test.go: BAD_MODE selects what it does wrong.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

var defaultMode string

var mode = modeOf()

func modeOf() string {
	if m := os.Getenv("BAD_MODE"); m != "" {
		return m
	}
	return defaultMode
}

type bad struct{}

func (bad) Kind() string {
	if k := os.Getenv("BAD_KIND"); k != "" {
		return k
	}
	return "bad"
}

func (bad) Policy(fds map[string]int) sandbox.Policy {
	p := sandbox.Policy{Kind: "bad", Syscalls: sandbox.ProfileNet}
	switch mode {
	case "extra":
		p.ExtraSyscalls = []sandbox.Syscall{{Name: extraName(), Reason: "memory stats"}}
	case "policy-panic":
		if fds == nil {
			panic("policy asked without fds")
		}
	case "policy-widens":
		if fds != nil {
			p.Syscalls = sandbox.ProfileFS
		}
	case "policy-forbidden-late":
		if fds != nil {
			p.ExtraSyscalls = []sandbox.Syscall{{Name: "ptrace", Reason: "x"}}
		}
	}
	return p
}

type dev struct{ readPanic, queueErr bool }

func (d *dev) Info() backend.DeviceInfo {
	n := 1
	if mode == "zero-queues" {
		n = 0
	}
	return backend.DeviceInfo{Type: 4, NumQueues: n, MaxQueueSize: 256}
}
func (d *dev) ReadConfig(off uint32, p []byte) error {
	if d.readPanic {
		panic("ReadConfig exploded")
	}
	return errors.New("no config")
}
func (d *dev) WriteConfig(uint32, []byte) error { return errors.New("no config") }
func (d *dev) SetFeatures(uint64) error         { return nil }
func (d *dev) Reset()                           {}
func (d *dev) Queue(ctx context.Context, idx int) (backend.QueueConfig, error) {
	if d.queueErr {
		return backend.QueueConfig{}, errors.New("queue broke")
	}
	return backend.QueueConfig{Handler: d}, nil
}
func (d *dev) Handle(req *backend.Request) { req.Complete(0) }
func (d *dev) ConfigSize() int             { return 0 }
func (d *dev) Counters() map[string]uint64 {
	if mode == "counters-panic" {
		panic("counters exploded")
	}
	return nil
}

func (bad) Configure(ctx context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	switch mode {
	case "stdout-configure":
		fmt.Println("hello from Configure on stdout")
	case "exit-configure":
		os.Exit(0)
	case "exit7-configure":
		fmt.Fprintln(os.Stderr, "giving up")
		os.Exit(7)
	case "hang-configure":
		select {}
	case "ctrl-error":
		return nil, errors.New("bad image \x1b]0;owned\x07\x1b[31mRED\x1b[0m \x00nul")
	case "multiline-error":
		return nil, errors.New("bad image\nsecond line\nthird")
	case "extra":
		// The call its policy declares: EPERM unless the launcher granted it.
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return nil, fmt.Errorf("sysinfo: %w", err)
		}
	case "sysinfo":
		var si unix.Sysinfo_t
		err := unix.Sysinfo(&si)
		log.Info("sysinfo", "error", fmt.Sprint(err))
	case "restrict-again":
		if err := sandbox.Restrict(bad{}.Policy(nil), log); err != nil {
			return nil, err
		}
	case "ctx-late":
		go func() { time.Sleep(100 * time.Millisecond); log.Info("ctx later", "err", fmt.Sprint(ctx.Err())) }()
	case "open":
		_, err := os.Open("/etc/passwd")
		log.Info("open", "error", fmt.Sprint(err))
	}
	return &dev{readPanic: mode == "readconfig-panic", queueErr: mode == "queue-error"}, nil
}

func main() {
	switch mode {
	case "stdout-init":
		fmt.Println("hello from main")
	case "stdout-init-nonl":
		fmt.Print("hello")
	case "stdout-huge":
		os.Stdout.WriteString(strings.Repeat("x", 100<<10) + "\n")
	case "stdout-nul":
		os.Stdout.WriteString("\x00\x1b[31mred\n")
	case "hang-main":
		time.Sleep(time.Hour)
	case "exit-main":
		fmt.Fprintln(os.Stderr, "not today")
		os.Exit(0)
	}
	pluginsdk.Serve(bad{})
}

func extraName() string {
	if n := os.Getenv("BAD_EXTRA"); n != "" {
		return n
	}
	return "sysinfo"
}
