package oci

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/krun-core/krun-core/guest/container"
)

// Plan is what a bundle's config.json becomes: the VM to boot, the
// command and its environment in the guest, and what happens on the host
// around it (network namespace, cgroup, hooks). create writes it into the
// state directory; the monitor reads it back.
type Plan struct {
	ID     string `json:"id"`
	Bundle string `json:"bundle"`
	// Root is the host directory served as the guest's root (virtio-fs).
	Root         string `json:"root"`
	RootReadOnly bool   `json:"root_readonly"`
	CPUs         int    `json:"cpus"`
	MemoryMiB    uint64 `json:"memory_mib"`
	// OpenFiles is the RLIMIT_NOFILE of the root's and the shares'
	// plugins (krun.open_files; 0: krun-core's default).
	OpenFiles uint64  `json:"open_files,omitempty"`
	Hostname  string  `json:"hostname,omitempty"`
	Process   Process `json:"process"`
	// Shares are the host directories bind-mounted into the container,
	// each a virtio-fs device of its own.
	Shares []Share `json:"shares,omitempty"`
	// Setup is what krun-init builds inside the root.
	Setup container.Setup `json:"setup"`
	Net   NetPlan         `json:"net"`
	// Cgroup is the cgroup the monitor joins ("" none).
	Cgroup CgroupPlan   `json:"cgroup"`
	Hooks  *specs.Hooks `json:"hooks,omitempty"`
	// Annotations are the config's, reported by state.
	Annotations map[string]string `json:"annotations,omitempty"`
	// LookupOnHost says the command can be checked in Root before the
	// VM boots (it is not under a mount the guest makes).
	LookupOnHost bool `json:"lookup_on_host"`
}

// Process is a program to run in the guest: the container's command or
// an exec'd one, in the form krun-init reads.
type Process = container.Process

// Share is a host directory served to the guest under a virtio-fs tag.
type Share struct {
	Path     string `json:"path"`
	Tag      string `json:"tag"`
	ReadOnly bool   `json:"readonly"`
}

// Network modes.
const (
	// NetNone: no network device (a pod's sandbox container).
	NetNone = "none"
	// NetNew: the config asks for a new network namespace (no path): the
	// monitor is born in one of its own, as runc's init is, so the hooks
	// that set a container's network up in /proc/PID/ns/net (Docker's
	// libnetwork-setkey, nerdctl's CNI hook) configure that namespace,
	// never the host's; once they ran, passt serves it as with NetNS, or,
	// with only its loopback, the guest gets no network device.
	NetNew = "new"
	// NetHost: passt in the runtime's own network namespace (the config
	// has no network namespace: the host's network, outbound only).
	NetHost = "host"
	// NetNS: passt in the network namespace config.json names, forwarding
	// every TCP and UDP port of that namespace to the guest (pod
	// networking set up by CNI).
	NetNS = "netns"
)

// NetPlan is the guest's network.
type NetPlan struct {
	Mode string `json:"mode"`
	// Path is the network namespace to run passt in (NetNS).
	Path string `json:"path,omitempty"`
	// PasstArgs are extra passt arguments (port forwarding).
	PasstArgs []string `json:"passt_args,omitempty"`
}

// CgroupPlan is the cgroup v2 directory the monitor joins, and the
// limits written there.
type CgroupPlan struct {
	Path string `json:"path,omitempty"` // absolute, under the cgroup2 mount
	// CPUMax is cpu.max ("QUOTA PERIOD"), "" to leave it.
	CPUMax string `json:"cpu_max,omitempty"`
}

// writePlan stores the plan in a state directory.
func writePlan(dir string, p *Plan) error {
	b, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encode plan: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, planFile), b, 0o600)
}

// readPlan loads the plan of a state directory.
func readPlan(dir string) (*Plan, error) {
	b, err := os.ReadFile(filepath.Join(dir, planFile))
	if err != nil {
		return nil, fmt.Errorf("read plan: %w", err)
	}
	var p Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("decode plan: %w", err)
	}
	return &p, nil
}

// guestProcess is the exec request krun-init reads for p: a terminal's
// size only with a terminal.
func guestProcess(p *Process) *container.Process {
	gp := *p
	if !p.Terminal || p.Rows == 0 || p.Cols == 0 {
		gp.Rows, gp.Cols = 0, 0
	}
	return &gp
}
