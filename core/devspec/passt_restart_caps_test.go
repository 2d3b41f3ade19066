package devspec

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/sandbox"
)

func TestKeepCapabilities(t *testing.T) {
	base := sandbox.LaunchConfig{}.KeepCapabilities()
	for _, tt := range []struct {
		name  string
		specs []Spec
		bind  bool // CAP_NET_BIND_SERVICE kept
	}{
		{name: "no devices"},
		{name: "a disk", specs: []Spec{&DiskSpec{Path: "d.img", Format: "raw"}}},
		{name: "passt without forwards", specs: []Spec{&NetSpec{Backend: "passt"}}, bind: true},
		{name: "passt with a forward", specs: []Spec{&DiskSpec{Path: "d.img", Format: "raw"}, &NetSpec{Backend: "passt", Ports: []PortForward{{80, 80}}}}, bind: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := KeepCapabilities(sandbox.LaunchConfig{}, tt.specs)
			for _, c := range base {
				if !slices.Contains(got, c) {
					t.Errorf("%s, which the sandbox keeps, is missing from %s", sandbox.CapabilityNames([]sandbox.Capability{c}), sandbox.CapabilityNames(got))
				}
			}
			if has := slices.Contains(got, unix.CAP_NET_BIND_SERVICE); has != tt.bind {
				t.Errorf("CAP_NET_BIND_SERVICE kept: %v, want %v (%s)", has, tt.bind, sandbox.CapabilityNames(got))
			}
		})
	}
}

const passtAfterDropEnv = "KRUN_TEST_PASST_AFTER_DROP"

// TestPasstAfterDropHelperProcess is TestPasstRestartBindsPrivilegedPort's
// child: it drops its privileges as krun-core does once set up
// (KeepCapabilities, sandbox.DropPrivileges), then starts passt as a
// restart does (NetSpec.Open) forwarding a privileged host port, and says
// whether passt is still running a moment later.
func TestPasstAfterDropHelperProcess(t *testing.T) {
	v := os.Getenv(passtAfterDropEnv)
	if v == "" {
		return // an ordinary run: nothing to do
	}
	port, err := strconv.Atoi(v)
	if err != nil {
		fmt.Printf("bad port %q\n", v)
		os.Exit(2)
	}
	spec := &NetSpec{Backend: "passt", Ports: []PortForward{{uint16(port), 80}}}
	if err := sandbox.DropPrivileges(KeepCapabilities(sandbox.LaunchConfig{}, []Spec{spec})); err != nil {
		if strings.Contains(err.Error(), "cgo") {
			fmt.Printf("skip: %v\n", err) // a test binary built with cgo (make builds without)
			os.Exit(0)
		}
		fmt.Printf("drop: %v\n", err)
		os.Exit(2)
	}
	var log bytes.Buffer
	o, err := spec.Open(OpenOptions{HelperStderr: &log})
	if err != nil {
		fmt.Printf("open: %v\n", err)
		os.Exit(2)
	}
	select {
	case <-o.HelperExited():
		fmt.Printf("passt exited: %s\n", strings.TrimSpace(log.String()))
	case <-time.After(1500 * time.Millisecond):
		fmt.Println("passt running")
	}
	o.Close()
	os.Exit(0)
}

// TestPasstRestartBindsPrivilegedPort: a root krun-core drops its
// capabilities once set up, and a passt it starts afterwards (after passt
// or the plugin died) has only those left in its bounding set. With
// ports=80:80, that passt must still bind port 80: without
// CAP_NET_BIND_SERVICE it exits at once ("Failed to bind any port"), and
// every restart fails the same way until the device fails.
func TestPasstRestartBindsPrivilegedPort(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the drop concerns a root krun-core")
	}
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt not installed")
	}
	// A privileged port free on this host.
	port := 0
	for p := 1000; p > 900 && port == 0; p-- {
		l, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err == nil {
			l.Close()
			port = p
		}
	}
	if port == 0 {
		t.Skip("no free port between 901 and 1000")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPasstAfterDropHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), passtAfterDropEnv+"="+strconv.Itoa(port))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if skip, ok := strings.CutPrefix(string(out), "skip: "); ok {
		t.Skip(strings.TrimSpace(skip))
	}
	if !strings.Contains(string(out), "passt running") {
		t.Fatalf("a passt started after krun-core's privilege drop, forwarding host port %d, did not run:\n%s", port, out)
	}
}
