// Package initconfig is the configuration krun-core hands to krun-init, the
// guest's PID 1, as /krun/config.json inside the initramfs it builds for
// `krun-core run --root DIR -- CMD`. The core writes it (Marshal), krun-init
// reads it (Parse); both check it with Validate. The schema is Config's
// JSON; docs/GUEST-INIT.md describes what krun-init does with it.
package initconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"path"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Version is the schema version this package writes and accepts. It
// names the stdio protocol too: 2 has STDIN_ACK, 3 OUTPUT_ACK
// (guest/stdioframe), so a krun-init and a krun-core of different versions
// refuse each other at once instead of stalling the command's input or
// output.
const Version = 3

// Path is where the config lives inside the initramfs.
const Path = "/krun/config.json"

// ModulesPath lists, one file path per line, the kernel modules krun-init
// loads in order before anything else.
const ModulesPath = "/krun/modules"

// MaxSize bounds the config file krun-init accepts.
const MaxSize = 1 << 20

// Defaults of the optional fields.
const (
	DefaultRootTag       = "krun-root"
	DefaultStdioPort     = "krun.stdio"
	DefaultHostname      = "krun"
	DefaultWorkdir       = "/"
	DefaultMilestonePort = 0x510
	DefaultExitPort      = 0x511
	DefaultPath          = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// Milestones written to the milestone port.
const (
	MilestoneInit = 1 // krun-init started
	MilestoneExec = 2 // the command was started
)

// Exit statuses krun-init reports for itself (the rest are the command's).
const (
	StatusInitFailed    = 125 // krun-init could not run the command
	StatusNotExecutable = 126
	StatusNotFound      = 127
)

// maxTagLen is the size of virtio-fs's tag field in its config space.
const maxTagLen = 36

// Config is the content of /krun/config.json.
type Config struct {
	Version int  `json:"version"`
	Root    Root `json:"root"`
	// Args is the command's argv; Args[0] is looked up in the PATH of Env
	// inside the root when it has no slash.
	Args    []string `json:"args"`
	Env     []string `json:"env"`     // "KEY=value"
	Workdir string   `json:"workdir"` // absolute, inside the root
	Rlimits []Rlimit `json:"rlimits,omitempty"`
	// Hostname of the guest (UTS name).
	Hostname string `json:"hostname"`
	// TTY gives the command a pseudo-terminal (krun-core's stdin is a
	// terminal); otherwise its stdio are pipes.
	TTY bool `json:"tty"`
	// Winsize is the terminal size at start (TTY only); WINSIZE frames
	// change it later.
	Winsize        *Winsize `json:"winsize,omitempty"`
	UID            uint32   `json:"uid"`
	GID            uint32   `json:"gid"`
	AdditionalGIDs []uint32 `json:"additional_gids"`
	// User, when set, is run's --user USER[:GROUP] (names or numbers),
	// which krun-init resolves against the root's /etc/passwd and
	// /etc/group in place of UID, GID and AdditionalGIDs (see ValidUser).
	User string `json:"user,omitempty"`
	// Network is set when the VM has a virtio-net device.
	Network *Network `json:"network"`
	Mounts  []Mount  `json:"mounts,omitempty"`
	// Stdio is the name of the virtio-console port carrying the framed
	// standard I/O (guest/stdioframe).
	Stdio string `json:"stdio"`
	// Ports are the status I/O ports; nil means the defaults (0x510,
	// 0x511). Test harnesses under QEMU, whose fw_cfg sits at 0x510-0x511,
	// move them.
	Ports *Ports `json:"ports,omitempty"`
}

// Root is the root file system: a virtio-fs share.
type Root struct {
	Tag      string `json:"tag"`
	ReadOnly bool   `json:"readonly"`
}

// Rlimit is one resource limit applied to the command. Unlimited is
// RlimInfinity.
type Rlimit struct {
	Type string `json:"type"` // canonical name, e.g. RLIMIT_NOFILE
	Soft uint64 `json:"soft"`
	Hard uint64 `json:"hard"`
}

// Winsize is a terminal size.
type Winsize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Network configures the first virtio-net interface. With DHCP the address,
// gateway and DNS servers come from the DHCP server (passt); otherwise
// Address (CIDR) and the optional Gateway and DNS are applied as given.
type Network struct {
	DHCP    bool     `json:"dhcp"`
	Address string   `json:"address,omitempty"` // "10.0.2.15/24"
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	MTU     int      `json:"mtu,omitempty"` // 0: leave the device's
}

// Mount is an extra file system mounted inside the root.
type Mount struct {
	Type     string `json:"type"`   // "virtiofs"
	Source   string `json:"source"` // virtio-fs tag
	Target   string `json:"target"` // absolute path inside the root
	ReadOnly bool   `json:"readonly"`
}

// Ports are the I/O ports krun-init writes its status bytes to.
type Ports struct {
	Milestone uint16 `json:"milestone"`
	Exit      uint16 `json:"exit"`
}

// New returns a config with the defaults filled in for argv.
func New(args ...string) *Config {
	return &Config{
		Version:  Version,
		Root:     Root{Tag: DefaultRootTag},
		Args:     args,
		Env:      []string{"PATH=" + DefaultPath, "HOME=/root"},
		Workdir:  DefaultWorkdir,
		Hostname: DefaultHostname,
		Stdio:    DefaultStdioPort,
	}
}

// StatusPorts returns the milestone and exit ports in effect.
func (c *Config) StatusPorts() (milestone, exit uint16) {
	if c.Ports == nil {
		return DefaultMilestonePort, DefaultExitPort
	}
	return c.Ports.Milestone, c.Ports.Exit
}

// Getenv returns the value of key in c.Env (the last one wins, as execve's
// users expect) and whether it is set.
func (c *Config) Getenv(key string) (string, bool) {
	val, ok := "", false
	for _, kv := range c.Env {
		if k, v, found := strings.Cut(kv, "="); found && k == key {
			val, ok = v, true
		}
	}
	return val, ok
}

// UniqueEnv returns env with one entry per name, the last one given, where
// it was given: execve passes every entry and getenv returns the first,
// while krun-init (Getenv, the PATH lookup) and docker, podman and runc
// let the last one win.
func UniqueEnv(env []string) []string {
	last := make(map[string]int, len(env))
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		last[k] = i
	}
	if len(last) == len(env) {
		return env
	}
	out := make([]string, 0, len(last))
	for i, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); last[k] == i {
			out = append(out, kv)
		}
	}
	return out
}

// ErrInvalid is wrapped by every Validate and Parse error about content.
var ErrInvalid = errors.New("invalid krun-init config")

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

func hasNUL(s string) bool { return strings.IndexByte(s, 0) >= 0 }

// badText reports whether s cannot travel in the config: a NUL, or bytes
// that are not UTF-8 (a JSON string is UTF-8, and encoding/json turns
// invalid bytes into U+FFFD, so the guest would get other bytes).
func badText(s string) bool { return hasNUL(s) || !utf8.ValidString(s) }

func checkTag(what, tag string) error {
	if tag == "" || len(tag) > maxTagLen || badText(tag) {
		return invalid("%s tag %q must be 1-%d bytes of UTF-8 without NUL", what, tag, maxTagLen)
	}
	return nil
}

func checkAbs(what, p string) error {
	if !strings.HasPrefix(p, "/") || badText(p) || len(p) > 4095 {
		return invalid("%s %q must be an absolute path in UTF-8", what, p)
	}
	return nil
}

// NoID is (uid_t)-1, which setresuid and setresgid take as "leave
// unchanged", and setgroups refuses: a program given it as its uid would
// keep root's.
const NoID = 1<<32 - 1

// ValidIDs refuses NoID as a uid, gid or supplementary group.
func ValidIDs(uid, gid uint32, groups []uint32) error {
	if uid == NoID {
		return fmt.Errorf("uid %d is no user's (it is (uid_t)-1)", uid)
	}
	if gid == NoID || slices.Contains(groups, NoID) {
		return fmt.Errorf("gid %d is no group's (it is (gid_t)-1)", uint32(NoID))
	}
	return nil
}

// Validate checks every field; the error names the first bad one.
func (c *Config) Validate() error {
	if c.Version != Version {
		return invalid("version %d, want %d", c.Version, Version)
	}
	if err := checkTag("root", c.Root.Tag); err != nil {
		return err
	}
	if len(c.Args) == 0 || c.Args[0] == "" {
		return invalid("args: a command is required")
	}
	for i, a := range c.Args {
		if badText(a) {
			return invalid("args[%d] %q contains NUL or is not UTF-8", i, a)
		}
	}
	for i, kv := range c.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || badText(kv) {
			return invalid("env[%d] %q is not KEY=value in UTF-8", i, kv)
		}
	}
	if err := checkAbs("workdir", c.Workdir); err != nil {
		return err
	}
	if err := ValidIDs(c.UID, c.GID, c.AdditionalGIDs); err != nil {
		return invalid("%v", err)
	}
	seen := map[string]bool{}
	for i, rl := range c.Rlimits {
		name, err := CanonicalRlimit(rl.Type)
		if err != nil {
			return invalid("rlimits[%d]: %v", i, err)
		}
		if name != rl.Type {
			return invalid("rlimits[%d]: type %q is not canonical (%s)", i, rl.Type, name)
		}
		if seen[name] {
			return invalid("rlimits[%d]: %s given twice", i, name)
		}
		seen[name] = true
		if rl.Soft > rl.Hard {
			return invalid("rlimits[%d]: %s soft limit %d above hard limit %d", i, name, rl.Soft, rl.Hard)
		}
	}
	if err := ValidHostname(c.Hostname); err != nil {
		return err
	}
	if c.User != "" {
		if err := ValidUser(c.User); err != nil {
			return err
		}
	}
	if c.Winsize != nil && !c.TTY {
		return invalid("winsize without tty")
	}
	if n := c.Network; n != nil {
		if n.DHCP {
			if n.Address != "" || n.Gateway != "" {
				return invalid("network: dhcp with a static address or gateway")
			}
		} else {
			pfx, err := netip.ParsePrefix(n.Address)
			if err != nil || !pfx.Addr().Is4() {
				return invalid("network: address %q is not an IPv4 CIDR (a.b.c.d/n)", n.Address)
			}
			if n.Gateway != "" {
				gw, err := netip.ParseAddr(n.Gateway)
				if err != nil || !gw.Is4() {
					return invalid("network: gateway %q is not an IPv4 address", n.Gateway)
				}
			}
		}
		for _, d := range n.DNS {
			if a, err := netip.ParseAddr(d); err != nil || a.Zone() != "" {
				return invalid("network: dns server %q is not an IP address", d)
			}
		}
		if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
			return invalid("network: mtu %d outside 68-65535", n.MTU)
		}
	}
	targets := map[string]bool{}
	for i, m := range c.Mounts {
		if m.Type != "virtiofs" {
			return invalid("mounts[%d]: type %q (only virtiofs)", i, m.Type)
		}
		if err := checkTag(fmt.Sprintf("mounts[%d]", i), m.Source); err != nil {
			return err
		}
		if m.Source == c.Root.Tag {
			return invalid("mounts[%d]: tag %q is the root's", i, m.Source)
		}
		if err := checkAbs(fmt.Sprintf("mounts[%d] target", i), m.Target); err != nil {
			return err
		}
		t := path.Clean(m.Target)
		if t == "/" {
			return invalid("mounts[%d]: target is the root", i)
		}
		if APIMountPoint(t) {
			return invalid("mounts[%d]: target %s: /proc, /sys and /dev are krun-init's own mounts of the kernel's interfaces", i, t)
		}
		if targets[t] {
			return invalid("mounts[%d]: target %s used twice", i, t)
		}
		targets[t] = true
	}
	if c.Stdio == "" || len(c.Stdio) > 255 || strings.ContainsAny(c.Stdio, "/\x00\n") {
		return invalid("stdio port name %q", c.Stdio)
	}
	if p := c.Ports; p != nil {
		if p.Milestone == 0 || p.Exit == 0 || p.Milestone == p.Exit {
			return invalid("ports: milestone %#x and exit %#x must be distinct and non-zero", p.Milestone, p.Exit)
		}
	}
	return nil
}

// APIMountPoint reports whether the absolute path target is, or lies
// under, a file system krun-init mounts for the kernel's interfaces
// (/proc, /sys, /dev): a share there would replace what PID 1 and the
// command rely on (/proc/self/exe, /proc/self/fd, device nodes).
func APIMountPoint(target string) bool {
	t := path.Clean(target)
	for _, p := range []string{"/proc", "/sys", "/dev"} {
		if t == p || strings.HasPrefix(t, p+"/") {
			return true
		}
	}
	return false
}

// GuestTmpfs reports whether the absolute path target lies under a tmpfs
// krun-init mounts in the root (/tmp, /run), where it may create a missing
// mount point even in a read-only root.
func GuestTmpfs(target string) bool {
	t := path.Clean(target)
	return strings.HasPrefix(t, "/tmp/") || strings.HasPrefix(t, "/run/")
}

// ValidHostname checks a UTS host name: 1-64 bytes of letters, digits, '-',
// '.' and '_', not starting with '-', '.' or '_'. The underscore is not
// a DNS name's, but Docker and podman set such host names (compose's
// `hostname: my_db`) and runc takes them.
func ValidHostname(h string) error {
	if h == "" || len(h) > 64 {
		return invalid("hostname %q must be 1-64 bytes", h)
	}
	for i := 0; i < len(h); i++ {
		ch := h[i]
		ok := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' ||
			(i > 0 && (ch == '-' || ch == '.' || ch == '_'))
		if !ok {
			return invalid("hostname %q: character %q not allowed", h, ch)
		}
	}
	return nil
}

// ValidUser checks a user spec USER[:GROUP]: each part a name or a
// decimal id, a name being 1-32 bytes of letters, digits, '_', '-', '.'
// and '@' (and a final '$'), not starting with '-'; ids below 2^32-1.
func ValidUser(spec string) error {
	user, group, hasGroup := strings.Cut(spec, ":")
	if err := validUserPart("user", user); err != nil {
		return invalid("user %q: %v", spec, err)
	}
	if hasGroup {
		if err := validUserPart("group", group); err != nil {
			return invalid("user %q: %v", spec, err)
		}
	}
	return nil
}

func validUserPart(what, s string) error {
	if s == "" {
		return fmt.Errorf("empty %s", what)
	}
	if _, numeric, err := ParseID(s); numeric {
		if err != nil {
			return fmt.Errorf("%s id %s: %v", what, s, err)
		}
		return nil
	}
	if len(s) > 32 {
		return fmt.Errorf("%s name longer than 32 bytes", what)
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		ok := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' ||
			ch == '_' || ch == '.' || ch == '@' || (i > 0 && ch == '-') || (i > 0 && i == len(s)-1 && ch == '$')
		if !ok && ch >= 0x80 {
			return fmt.Errorf("%s name: non-ASCII characters not allowed", what)
		}
		if !ok {
			return fmt.Errorf("%s name: character %q not allowed", what, rune(ch))
		}
	}
	return nil
}

// ParseID parses a decimal user or group id. numeric reports whether s is
// all digits; err is set when it is but does not fit below 2^32-1 (-1 is
// "no change" to the kernel).
func ParseID(s string) (id uint32, numeric bool, err error) {
	if s == "" {
		return 0, false, nil
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false, nil
		}
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, true, errors.New("out of range")
	}
	return uint32(n), true, nil
}

// Marshal validates c and returns its JSON encoding.
func (c *Config) Marshal() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode krun-init config: %w", err)
	}
	return append(b, '\n'), nil
}

// Parse decodes and validates a config. Unknown fields are an error, so a
// core and an init of different versions fail loudly instead of silently
// dropping a setting.
func Parse(b []byte) (*Config, error) {
	if len(b) > MaxSize {
		return nil, invalid("config is %d bytes, limit %d", len(b), MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%w: decode: %v", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, invalid("trailing data after the JSON object")
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}
