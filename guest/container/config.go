// Package container is the container environment krun-init builds inside
// the guest for the OCI runtime (krun-oci): the mounts, devices, masked and
// read-only paths and sysctls of an OCI config.json, and the capabilities,
// no_new_privs, OOM score and umask of a process. The host translates
// config.json into a Setup (oci package) and validates it with the same
// code the guest uses; krun-init applies it inside the root before the
// command starts (Apply) and in the launcher just before exec
// (ApplyPrivileged, ApplyIdentity, ApplyUnprivileged).
//
// Everything here describes the guest: paths are inside the container's
// root, device numbers are the guest kernel's. Nothing in a Setup names a
// host path; host directories reach the guest only as virtio-fs tags.
package container

import (
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// Limits on what a Setup may hold (it travels inside the initramfs).
const (
	MaxMounts    = 256
	MaxPaths     = 256
	MaxDevices   = 256
	MaxSysctls   = 256
	MaxFiles     = 64
	MaxFileSize  = 1 << 20 // one copied file
	MaxFilesSize = 4 << 20 // all copied files together
	MaxOptions   = 64
)

// Mount types a Setup may use. The guest creates every one itself:
// host file systems arrive as virtio-fs shares (TypeVirtiofs, Source a
// tag), host files as copies (TypeFile, Source the index in Files), and a
// bind of a path inside the root is TypeBind.
const (
	TypeTmpfs    = "tmpfs"
	TypeProc     = "proc"
	TypeSysfs    = "sysfs"
	TypeDevpts   = "devpts"
	TypeMqueue   = "mqueue"
	TypeCgroup   = "cgroup"  // the guest's cgroup2 hierarchy (cgroup v1 is not offered)
	TypeCgroup2  = "cgroup2" //
	TypeVirtiofs = "virtiofs"
	TypeFile     = "file" // a host file's content, copied at create
	TypeBind     = "bind" // Source is a path inside the root
)

var mountTypes = map[string]bool{
	TypeTmpfs: true, TypeProc: true, TypeSysfs: true, TypeDevpts: true, TypeMqueue: true,
	TypeCgroup: true, TypeCgroup2: true, TypeVirtiofs: true, TypeFile: true, TypeBind: true,
}

// Setup is the container environment inside the guest's root.
type Setup struct {
	// Mounts are made in order, each on a path inside the root (missing
	// directories, or for a file an empty file, are created).
	Mounts []Mount `json:"mounts,omitempty"`
	// Files hold the content of the host files bind-mounted into the
	// container (copied at create: later changes on the host are not
	// seen, and writes in the guest stay in the guest).
	Files []File `json:"files,omitempty"`
	// DefaultDevices makes /dev/null, zero, full, random, urandom, tty,
	// the ptmx, fd, stdin, stdout and stderr links, as runc does when
	// /dev is a tmpfs of the config.
	DefaultDevices bool     `json:"default_devices,omitempty"`
	Devices        []Device `json:"devices,omitempty"`
	// MaskedPaths are hidden (/dev/null over a file, an empty read-only
	// tmpfs over a directory); ReadonlyPaths are remounted read-only.
	MaskedPaths   []string          `json:"masked_paths,omitempty"`
	ReadonlyPaths []string          `json:"readonly_paths,omitempty"`
	Sysctl        map[string]string `json:"sysctl,omitempty"`
	// RootPropagation is the propagation of the root mount: "",
	// private, rprivate, slave, rslave, shared, rshared, unbindable,
	// runbindable.
	RootPropagation string `json:"root_propagation,omitempty"`
	// Process holds what the command runs with beyond its arguments,
	// environment, directory, identity and limits.
	Process Extras `json:"process"`
	// WaitForStart: krun-init reports MilestoneReady once everything is
	// set up and starts the command only when the host sends START
	// (the OCI create/start split).
	WaitForStart bool `json:"wait_for_start,omitempty"`
}

// Mount is one mount inside the root.
type Mount struct {
	Destination string `json:"destination"`
	Type        string `json:"type"`
	// Source is the virtio-fs tag, the file's index, the bound path
	// inside the root, or for a file system the guest makes the name the
	// mount table shows (default: the type).
	Source  string   `json:"source,omitempty"`
	Options []string `json:"options,omitempty"`
}

// File is a copied host file.
type File struct {
	Content []byte `json:"content"`
	Mode    uint32 `json:"mode"` // permission bits
	UID     uint32 `json:"uid"`
	GID     uint32 `json:"gid"`
}

// Device is a device node to create inside the root.
type Device struct {
	Path  string `json:"path"`
	Type  string `json:"type"` // c, u, b or p
	Major int64  `json:"major"`
	Minor int64  `json:"minor"`
	Mode  uint32 `json:"mode"` // permission bits; 0 means 0666
	UID   uint32 `json:"uid"`
	GID   uint32 `json:"gid"`
}

// Extras are the process attributes the launcher applies just before
// exec.
type Extras struct {
	NoNewPrivileges bool          `json:"no_new_privileges,omitempty"`
	Capabilities    *Capabilities `json:"capabilities,omitempty"` // nil: keep root's full set
	OOMScoreAdj     *int          `json:"oom_score_adj,omitempty"`
	Umask           *uint32       `json:"umask,omitempty"`
}

// Capabilities are the five capability sets, by name (CAP_CHOWN, ...).
type Capabilities struct {
	Bounding    []string `json:"bounding,omitempty"`
	Effective   []string `json:"effective,omitempty"`
	Inheritable []string `json:"inheritable,omitempty"`
	Permitted   []string `json:"permitted,omitempty"`
	Ambient     []string `json:"ambient,omitempty"`
}

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid container setup")

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

// CleanPath checks an absolute path inside the root and returns it
// cleaned.
func CleanPath(what, p string) (string, error) {
	if !strings.HasPrefix(p, "/") || strings.IndexByte(p, 0) >= 0 || len(p) > 4095 {
		return "", invalid("%s %q must be an absolute path", what, p)
	}
	return path.Clean(p), nil
}

// Validate checks every field; the error names the first bad one.
func (s *Setup) Validate() error {
	if len(s.Mounts) > MaxMounts {
		return invalid("%d mounts, at most %d", len(s.Mounts), MaxMounts)
	}
	if len(s.Files) > MaxFiles {
		return invalid("%d copied files, at most %d", len(s.Files), MaxFiles)
	}
	total := 0
	for i, f := range s.Files {
		if len(f.Content) > MaxFileSize {
			return invalid("files[%d] is %d bytes, at most %d", i, len(f.Content), MaxFileSize)
		}
		if f.Mode&^0o7777 != 0 {
			return invalid("files[%d]: mode %#o", i, f.Mode)
		}
		total += len(f.Content)
	}
	if total > MaxFilesSize {
		return invalid("copied files hold %d bytes, at most %d", total, MaxFilesSize)
	}
	used := make([]bool, len(s.Files))
	for i, m := range s.Mounts {
		if _, err := CleanPath(fmt.Sprintf("mounts[%d] destination", i), m.Destination); err != nil {
			return err
		}
		if !mountTypes[m.Type] {
			return invalid("mounts[%d] (%s): type %q is not one the guest makes", i, m.Destination, m.Type)
		}
		if len(m.Options) > MaxOptions {
			return invalid("mounts[%d] (%s): %d options, at most %d", i, m.Destination, len(m.Options), MaxOptions)
		}
		if _, err := ParseOptions(m.Options); err != nil {
			return fmt.Errorf("%w: mounts[%d] (%s): %v", ErrInvalid, i, m.Destination, err)
		}
		switch m.Type {
		case TypeVirtiofs:
			if m.Source == "" || len(m.Source) > 36 || strings.IndexByte(m.Source, 0) >= 0 {
				return invalid("mounts[%d] (%s): virtio-fs tag %q", i, m.Destination, m.Source)
			}
		case TypeFile:
			n, ok := fileIndex(m.Source, len(s.Files))
			if !ok {
				return invalid("mounts[%d] (%s): file %q is not an index into files", i, m.Destination, m.Source)
			}
			used[n] = true
		case TypeBind:
			if _, err := CleanPath(fmt.Sprintf("mounts[%d] source", i), m.Source); err != nil {
				return err
			}
		default:
			// A file system the guest makes: the source is only a name
			// shown in the mount table.
			if len(m.Source) > 255 || strings.IndexByte(m.Source, 0) >= 0 {
				return invalid("mounts[%d] (%s): source %q", i, m.Destination, m.Source)
			}
		}
	}
	for i, u := range used {
		if !u {
			return invalid("files[%d] is not mounted", i)
		}
	}
	if len(s.Devices) > MaxDevices {
		return invalid("%d devices, at most %d", len(s.Devices), MaxDevices)
	}
	for i, d := range s.Devices {
		p, err := CleanPath(fmt.Sprintf("devices[%d] path", i), d.Path)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(p, "/dev/") {
			return invalid("devices[%d]: %s is not under /dev", i, p)
		}
		switch d.Type {
		case "c", "u", "b", "p":
		default:
			return invalid("devices[%d] (%s): type %q (c, u, b or p)", i, p, d.Type)
		}
		if d.Major < 0 || d.Major > 0xfff || d.Minor < 0 || d.Minor > 0xfffff {
			return invalid("devices[%d] (%s): number %d:%d out of range", i, p, d.Major, d.Minor)
		}
		if d.Mode&^0o7777 != 0 {
			return invalid("devices[%d] (%s): mode %#o", i, p, d.Mode)
		}
	}
	for _, list := range []struct {
		name  string
		paths []string
	}{{"masked_paths", s.MaskedPaths}, {"readonly_paths", s.ReadonlyPaths}} {
		if len(list.paths) > MaxPaths {
			return invalid("%d %s, at most %d", len(list.paths), list.name, MaxPaths)
		}
		for i, p := range list.paths {
			if _, err := CleanPath(fmt.Sprintf("%s[%d]", list.name, i), p); err != nil {
				return err
			}
		}
	}
	if len(s.Sysctl) > MaxSysctls {
		return invalid("%d sysctls, at most %d", len(s.Sysctl), MaxSysctls)
	}
	for _, k := range sortedKeys(s.Sysctl) {
		if err := checkSysctl(k, s.Sysctl[k]); err != nil {
			return err
		}
	}
	switch s.RootPropagation {
	case "", "private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable", "runbindable":
	default:
		return invalid("root propagation %q", s.RootPropagation)
	}
	return s.Process.Validate()
}

// Validate checks the process extras.
func (e *Extras) Validate() error {
	if c := e.Capabilities; c != nil {
		for _, set := range [][]string{c.Bounding, c.Effective, c.Inheritable, c.Permitted, c.Ambient} {
			if len(set) > 2*len(capNumbers) {
				return invalid("a capability set of %d names", len(set))
			}
			for _, name := range set {
				if _, ok := CapabilityNumber(name); !ok {
					return invalid("unknown capability %q", name)
				}
			}
		}
	}
	if e.OOMScoreAdj != nil && (*e.OOMScoreAdj < -1000 || *e.OOMScoreAdj > 1000) {
		return invalid("oom_score_adj %d outside -1000..1000", *e.OOMScoreAdj)
	}
	if e.Umask != nil && *e.Umask > 0o777 {
		return invalid("umask %#o", *e.Umask)
	}
	return nil
}

func fileIndex(s string, n int) (int, bool) {
	if s == "" || len(s) > 4 {
		return 0, false
	}
	v := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		v = v*10 + int(s[i]-'0')
	}
	if v >= n || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	return v, true
}

// checkSysctl accepts a name of dot- or slash-separated components (no
// "..", nothing that leaves /proc/sys) and a value without NUL.
func checkSysctl(k, v string) error {
	if k == "" || len(k) > 255 || strings.IndexByte(v, 0) >= 0 || len(v) > 4096 {
		return invalid("sysctl %q", k)
	}
	for _, comp := range strings.FieldsFunc(k, func(r rune) bool { return r == '.' || r == '/' }) {
		if comp == "" || comp == ".." {
			return invalid("sysctl %q", k)
		}
	}
	if strings.HasPrefix(k, ".") || strings.HasPrefix(k, "/") || strings.Contains(k, "..") {
		return invalid("sysctl %q", k)
	}
	return nil
}

// SysctlPath is the path of a sysctl under /proc/sys: dots separate
// components, as sysctl(8) has it, unless the name uses slashes.
func SysctlPath(k string) string {
	if strings.Contains(k, "/") {
		return "/proc/sys/" + k
	}
	return "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Path is where the Setup lives in the initramfs (next to krun-init's
// config, initconfig.Path); krun-init reads it when it exists.
const Path = "/krun/container.json"

// Process is a program to start in a running container (an exec): the
// payload of the EXEC stdio frame (guest/stdioframe), JSON.
type Process struct {
	Args           []string            `json:"args"`
	Env            []string            `json:"env"`
	Cwd            string              `json:"cwd"`
	UID            uint32              `json:"uid"`
	GID            uint32              `json:"gid"`
	AdditionalGIDs []uint32            `json:"additional_gids,omitempty"`
	Terminal       bool                `json:"terminal,omitempty"`
	Rows           uint16              `json:"rows,omitempty"`
	Cols           uint16              `json:"cols,omitempty"`
	Rlimits        []initconfig.Rlimit `json:"rlimits,omitempty"`
	Extras         Extras              `json:"extras"`
}

// MaxArgs bounds an exec request's argument and environment counts.
const MaxArgs = 4096

// Validate checks an exec request.
func (p *Process) Validate() error {
	if len(p.Args) == 0 || p.Args[0] == "" {
		return invalid("exec: no command")
	}
	if len(p.Args) > MaxArgs || len(p.Env) > MaxArgs || len(p.AdditionalGIDs) > 256 {
		return invalid("exec: too many arguments, variables or groups")
	}
	for i, a := range p.Args {
		if strings.IndexByte(a, 0) >= 0 {
			return invalid("exec: args[%d] contains NUL", i)
		}
	}
	for i, kv := range p.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.IndexByte(kv, 0) >= 0 {
			return invalid("exec: env[%d] %q is not KEY=value", i, kv)
		}
	}
	if _, err := CleanPath("exec: cwd", p.Cwd); err != nil {
		return err
	}
	if err := initconfig.ValidIDs(p.UID, p.GID, p.AdditionalGIDs); err != nil {
		return invalid("exec: %v", err)
	}
	seen := map[string]bool{}
	for i, rl := range p.Rlimits {
		name, err := initconfig.CanonicalRlimit(rl.Type)
		if err != nil || name != rl.Type || seen[name] || rl.Soft > rl.Hard {
			return invalid("exec: rlimits[%d] %s %d:%d", i, rl.Type, rl.Soft, rl.Hard)
		}
		seen[name] = true
	}
	return p.Extras.Validate()
}

// MilestoneReady is what krun-init writes to the milestone port when the
// container is set up and the command waits for START (WaitForStart).
const MilestoneReady = 3
