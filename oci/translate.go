package oci

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
)

// maxConfigSize bounds config.json.
const maxConfigSize = 4 << 20

// Annotations that size the VM, as crun's krun handler names them; they
// override linux.resources.
const (
	AnnotationCPUs   = "krun.cpus"
	AnnotationRAMMiB = "krun.ram_mib"
)

// AnnotationOpenFiles sets the open-files limit of the plugins that serve
// the container's root and its bind-mounted directories (krun-core's
// --fs open-files=): about a quarter of it is what the container can hold
// open on each at once.
const AnnotationOpenFiles = "krun.open_files"

// Annotations that choose the ports of a network namespace passt forwards
// to the guest (passt's -t and -u: "all", the default, "none", or ports
// and ranges such as "80,443,8000-8100").
const (
	AnnotationTCPPorts = "krun.tcp_ports"
	AnnotationUDPPorts = "krun.udp_ports"
)

// MinMemoryMiB is the smallest VM krun-oci boots.
const MinMemoryMiB = 64

// shareTagPrefix names the virtio-fs tags of bind-mounted directories.
const shareTagPrefix = "krun-vol-"

// reservedDevices are the virtio-mmio slots the root and the console
// take; a network takes one more.
const reservedDevices = 2

// LoadSpec reads a bundle's config.json. Unknown fields are ignored, as
// the spec requires.
func LoadSpec(bundle string) (*specs.Spec, error) {
	// O_NONBLOCK and a regular file only: a FIFO named config.json
	// blocked create in open(2) for ever.
	f, err := os.OpenFile(filepath.Join(bundle, "config.json"), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("bundle %s: config.json: %w", bundle, unwrapPath(err))
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("bundle %s: config.json: %w", bundle, unwrapPath(err))
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("bundle %s: config.json is not a regular file", bundle)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read config.json: %w", err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("config.json is larger than %d bytes", maxConfigSize)
	}
	var s specs.Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&s); err != nil {
		// The decoder's io.EOF and io.ErrUnexpectedEOF read "EOF" and
		// "unexpected EOF", which say nothing of the file.
		switch {
		case errors.Is(err, io.EOF):
			return nil, errors.New("config.json is empty")
		case errors.Is(err, io.ErrUnexpectedEOF):
			return nil, errors.New("config.json is cut short: its JSON ends before the object does")
		}
		return nil, fmt.Errorf("config.json: %w", err)
	}
	return &s, nil
}

// unwrapPath drops the *PathError wrapper (its message repeats the path).
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// translateOptions are the runtime's own settings that shape a plan.
type translateOptions struct {
	// SystemdCgroup: cgroupsPath is "slice:prefix:name" (--systemd-cgroup).
	SystemdCgroup bool
	// CgroupRoot is the cgroup2 mount ("" for /sys/fs/cgroup).
	CgroupRoot string
	// OwnCgroup is the runtime's own cgroup (for relative paths); ""
	// reads /proc/self/cgroup.
	OwnCgroup string
}

// configJSON is where specError's fields are.
const configJSON = "config.json"

// specError is a config.json field the runtime refuses.
func specError(field, format string, a ...any) error {
	return fmt.Errorf("%s: %s: %s", configJSON, field, fmt.Sprintf(format, a...))
}

// Translate checks spec and turns it into a plan. Everything a VM cannot
// honour is refused here, with one line naming the field; what it ignores
// is listed in docs/OCI.md.
func Translate(id, bundle string, spec *specs.Spec, opt translateOptions) (*Plan, error) {
	if err := checkVersion(spec.Version); err != nil {
		return nil, err
	}
	bundle, err := filepath.Abs(bundle)
	if err != nil {
		return nil, err
	}
	p := &Plan{ID: id, Bundle: bundle, CPUs: vmm.DefaultCPUs, MemoryMiB: vmm.DefaultMemoryMiB,
		Annotations: spec.Annotations, Net: NetPlan{Mode: NetHost}}
	if spec.Root == nil || spec.Root.Path == "" {
		return nil, specError("root.path", "required")
	}
	root := spec.Root.Path
	if !filepath.IsAbs(root) {
		root = filepath.Join(bundle, root)
	}
	st, err := os.Stat(root)
	if err != nil {
		return nil, specError("root.path", "%s: %v", root, unwrapPath(err))
	}
	if !st.IsDir() {
		return nil, specError("root.path", "%s is not a directory", root)
	}
	p.Root, p.RootReadOnly = filepath.Clean(root), spec.Root.Readonly

	if spec.Process == nil {
		return nil, specError("process", "required to create a container")
	}
	proc, err := translateProcess(spec.Process, configJSON)
	if err != nil {
		return nil, err
	}
	if proc.Extras.Capabilities == nil {
		proc.Extras.Capabilities = &container.Capabilities{} // none, as runc
	}
	p.Process = *proc
	p.Setup.Process = proc.Extras

	if spec.Hostname != "" {
		if err := initconfig.ValidHostname(spec.Hostname); err != nil {
			return nil, specError("hostname", "%v", err)
		}
		p.Hostname = spec.Hostname
	}
	if spec.Domainname != "" {
		return nil, specError("domainname", "not supported")
	}
	if err := translateMounts(p, spec.Mounts); err != nil {
		return nil, err
	}
	if err := translateLinux(p, id, spec.Linux, opt); err != nil {
		return nil, err
	}
	if err := translateHooks(p, spec.Hooks); err != nil {
		return nil, err
	}
	if err := applyAnnotations(p, spec.Annotations); err != nil {
		return nil, err
	}
	if p.Net.Mode == NetNS || p.Net.Mode == NetNew {
		tcp, udp := "all", "all"
		for _, a := range []struct {
			key string
			val *string
		}{{AnnotationTCPPorts, &tcp}, {AnnotationUDPPorts, &udp}} {
			if v, ok := spec.Annotations[a.key]; ok {
				if err := checkPortSpec(v); err != nil {
					return nil, specError("annotations."+a.key, "%v", err)
				}
				*a.val = v
			}
		}
		p.Net.PasstArgs = []string{"--tcp-ports", tcp, "--udp-ports", udp}
	}
	if isPodSandbox(spec.Annotations) {
		// A pod's sandbox ("pause") container only holds the pod's
		// namespaces: its VM gets no network, so the pod's ports stay
		// free for the passt of the container that serves them.
		p.Net = NetPlan{Mode: NetNone}
	}
	devs := reservedDevices + len(p.Shares)
	if p.Net.Mode != NetNone && p.Net.Mode != NetNew {
		// A new namespace may stay empty (no device): NewVM makes room
		// for it if it can, as the config used to translate without one.
		devs++
	}
	if devs > vmm.MaxDevices {
		return nil, specError("mounts", "%d directory bind mounts from outside the root; a VM has room for %d with this network", len(p.Shares), len(p.Shares)-(devs-vmm.MaxDevices))
	}
	p.Setup.DefaultDevices = true
	if err := p.Setup.Validate(); err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	p.LookupOnHost = lookupOnHost(p)
	return p, nil
}

// checkVersion accepts 1.x.y versions (with a pre-release suffix).
func checkVersion(v string) error {
	major, rest, ok := strings.Cut(v, ".")
	if !ok || major != "1" {
		return specError("ociVersion", "%q is not a 1.x version this runtime reads", v)
	}
	minor, patch, ok := strings.Cut(rest, ".")
	if !ok {
		return specError("ociVersion", "%q is not MAJOR.MINOR.PATCH", v)
	}
	patch, _, _ = strings.Cut(patch, "-")
	patch, _, _ = strings.Cut(patch, "+")
	for _, n := range []string{minor, patch} {
		if _, err := strconv.ParseUint(n, 10, 16); err != nil {
			return specError("ociVersion", "%q is not MAJOR.MINOR.PATCH", v)
		}
	}
	return nil
}

// translateProcess checks process and turns it into what the guest runs.
func translateProcess(sp *specs.Process, in string) (*Process, error) {
	// Its fields are named where they are: config.json's under
	// "process.", an exec --process file's at its top (named
	// "config.json: process.user.username", a refused field of an exec's
	// process file sent the caller to the bundle's config).
	refuse := func(field, format string, a ...any) error {
		if in == configJSON {
			return specError(field, format, a...)
		}
		return fmt.Errorf("%s: %s: %s", in, strings.TrimPrefix(field, "process."), fmt.Sprintf(format, a...))
	}
	if len(sp.Args) == 0 || sp.Args[0] == "" {
		return nil, refuse("process.args", "required")
	}
	cwd := sp.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if !path.IsAbs(cwd) {
		return nil, refuse("process.cwd", "%q is not an absolute path", cwd)
	}
	for i, kv := range sp.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return nil, refuse("process.env", "entry %d %q is not KEY=value", i, kv)
		}
	}
	p := &Process{
		Args: sp.Args, Env: sp.Env, Cwd: path.Clean(cwd),
		UID: sp.User.UID, GID: sp.User.GID, AdditionalGIDs: sp.User.AdditionalGids,
		Terminal: sp.Terminal,
	}
	if p.Env == nil {
		p.Env = []string{}
	}
	if sp.User.Username != "" {
		return nil, refuse("process.user.username", "only numeric uid and gid are supported on Linux")
	}
	if sp.Terminal && sp.ConsoleSize != nil {
		p.Rows, p.Cols = clampBox(sp.ConsoleSize.Height), clampBox(sp.ConsoleSize.Width)
	}
	seen := map[string]bool{}
	for _, r := range sp.Rlimits {
		canon, err := initconfig.CanonicalRlimit(r.Type)
		if err != nil || canon != r.Type {
			return nil, refuse("process.rlimits", "unknown type %q", r.Type)
		}
		if seen[canon] {
			return nil, refuse("process.rlimits", "%s given twice", canon)
		}
		seen[canon] = true
		if r.Soft > r.Hard {
			return nil, refuse("process.rlimits", "%s: soft limit %d above hard limit %d", canon, r.Soft, r.Hard)
		}
		p.Rlimits = append(p.Rlimits, initconfig.Rlimit{Type: canon, Soft: r.Soft, Hard: r.Hard})
	}
	p.Extras = container.Extras{NoNewPrivileges: sp.NoNewPrivileges, OOMScoreAdj: sp.OOMScoreAdj, Umask: sp.User.Umask}
	// No capabilities object: none at all for the container's command
	// (Translate), the container's for an exec'd process (cmdExec), as
	// with runc. Left nil here, krun-init would keep root's full set.
	if c := sp.Capabilities; c != nil {
		p.Extras.Capabilities = &container.Capabilities{Bounding: c.Bounding, Effective: c.Effective,
			Inheritable: c.Inheritable, Permitted: c.Permitted, Ambient: c.Ambient}
	}
	if err := p.Extras.Validate(); err != nil {
		if in == configJSON {
			return nil, fmt.Errorf("config.json: process: %w", err)
		}
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	switch {
	case sp.Scheduler != nil:
		return nil, refuse("process.scheduler", "not supported")
	case sp.IOPriority != nil:
		return nil, refuse("process.ioPriority", "not supported")
	case sp.ExecCPUAffinity != nil:
		return nil, refuse("process.execCPUAffinity", "not supported")
	}
	return p, nil
}

func clampBox(v uint) uint16 {
	if v > 0xffff {
		return 0xffff
	}
	return uint16(v)
}

// pseudoFS names file systems whose bind mount would show the host's own
// state, not files: refused as bind sources. They are krun-core's
// (devspec.KernelStateFS), and the host's terminals (devpts).
func pseudoFS(fsType int64) (string, bool) {
	if fsType == unix.DEVPTS_SUPER_MAGIC {
		return "devpts", true
	}
	return devspec.KernelStateFS(fsType)
}

// guestTypes are the mount types the guest makes itself.
var guestTypes = map[string]bool{
	"tmpfs": true, "proc": true, "sysfs": true, "devpts": true, "mqueue": true, "cgroup": true, "cgroup2": true,
}

// translateMounts turns config.json's mounts into guest mounts, shares
// and copied files.
func translateMounts(p *Plan, mounts []specs.Mount) error {
	rootReal, err := filepath.EvalSymlinks(p.Root)
	if err != nil {
		return specError("root.path", "%v", err)
	}
	shareOf := map[string]int{} // host path -> index in p.Shares
	filesSize := 0
	for i, m := range mounts {
		field := fmt.Sprintf("mounts[%d] (%s)", i, m.Destination)
		if m.Destination == "" {
			return specError(field, "destination is required")
		}
		dest := m.Destination
		if !path.IsAbs(dest) {
			dest = "/" + dest
		}
		dest = path.Clean(dest)
		if len(m.UIDMappings) > 0 || len(m.GIDMappings) > 0 {
			return specError(field, "ID-mapped mounts are not supported")
		}
		opts, err := container.ParseOptions(m.Options)
		if err != nil {
			return specError(field, "%v", err)
		}
		if m.Type == "bind" || opts.Bind {
			if err := translateBind(p, field, dest, m, rootReal, shareOf, &filesSize); err != nil {
				return err
			}
			continue
		}
		if !guestTypes[m.Type] {
			return specError(field, "mount type %q: a VM mounts only tmpfs, proc, sysfs, devpts, mqueue and cgroup itself; host file systems reach it as bind mounts of directories", m.Type)
		}
		p.Setup.Mounts = append(p.Setup.Mounts, container.Mount{Destination: dest, Type: m.Type, Source: m.Source, Options: m.Options})
	}
	return nil
}

func translateBind(p *Plan, field, dest string, m specs.Mount, rootReal string, shareOf map[string]int, filesSize *int) error {
	// /dev/shm is always the guest's own tmpfs: shared memory cannot
	// cross a VM boundary.
	if dest == "/dev/shm" {
		p.Setup.Mounts = append(p.Setup.Mounts, container.Mount{Destination: dest, Type: container.TypeTmpfs,
			Options: []string{"nosuid", "nodev", "noexec", "mode=1777"}})
		return nil
	}
	src := m.Source
	if src == "" {
		return specError(field, "a bind mount needs a source")
	}
	if !filepath.IsAbs(src) {
		src = filepath.Join(p.Bundle, src)
	}
	src = filepath.Clean(src)
	opts := guestBindOptions(m.Options)
	if rel, ok := underRoot(src, p.Root, rootReal); ok {
		// Inside the root: the guest binds it itself, resolving it in
		// the root. The host never follows it: its symbolic links are
		// the image's, and could name any host file.
		p.Setup.Mounts = append(p.Setup.Mounts, container.Mount{Destination: dest, Type: container.TypeBind,
			Source: "/" + rel, Options: opts})
		return nil
	}
	real, err := resolveOutsideRoot(src, rootReal)
	if err != nil {
		return specError(field, "source %s: %v", src, err)
	}
	st, err := os.Stat(real)
	if err != nil {
		return specError(field, "source %s: %v", src, unwrapPath(err))
	}
	switch {
	case st.IsDir():
		var sfs unix.Statfs_t
		if err := unix.Statfs(real, &sfs); err == nil {
			if name, bad := pseudoFS(int64(sfs.Type)); bad {
				return specError(field, "source %s is on %s, the host kernel's own state, which a VM cannot share", src, name)
			}
			if real == "/dev" || strings.HasPrefix(real, "/dev/") {
				return specError(field, "source %s: host devices cannot reach a VM", src)
			}
		}
		ro := hasOption(m.Options, "ro")
		n, ok := shareOf[real]
		if !ok {
			n = len(p.Shares)
			shareOf[real] = n
			p.Shares = append(p.Shares, Share{Path: real, Tag: shareTagPrefix + strconv.Itoa(n), ReadOnly: ro})
		} else if !ro {
			p.Shares[n].ReadOnly = false
		}
		p.Setup.Mounts = append(p.Setup.Mounts, container.Mount{Destination: dest, Type: container.TypeVirtiofs,
			Source: p.Shares[n].Tag, Options: opts})
		return nil
	case st.Mode().IsRegular():
		if st.Size() > container.MaxFileSize {
			return specError(field, "source %s is a file of %d bytes; files bind-mounted into a VM are copied, at most %d bytes each", src, st.Size(), container.MaxFileSize)
		}
		b, err := readHostFile(real, container.MaxFileSize)
		if err != nil {
			return specError(field, "source %s: %v", src, err)
		}
		*filesSize += len(b)
		if *filesSize > container.MaxFilesSize {
			return specError(field, "files bind-mounted into a VM are copied, at most %d bytes in all", container.MaxFilesSize)
		}
		uid, gid := ownerOf(st)
		p.Setup.Files = append(p.Setup.Files, container.File{Content: b, Mode: uint32(st.Mode().Perm()), UID: uid, GID: gid})
		p.Setup.Mounts = append(p.Setup.Mounts, container.Mount{Destination: dest, Type: container.TypeFile,
			Source: strconv.Itoa(len(p.Setup.Files) - 1), Options: opts})
		return nil
	}
	return specError(field, "source %s is a %s; only directories and regular files can be bind-mounted into a VM", src, fileKind(st.Mode()))
}

// guestBindOptions keeps the options of a bind mount the guest applies
// (everything but bind and rbind, which the mount type says).
func guestBindOptions(opts []string) []string {
	var out []string
	for _, o := range opts {
		if o != "bind" && o != "rbind" {
			out = append(out, o)
		}
	}
	return out
}

func hasOption(opts []string, name string) bool {
	ro := false
	for _, o := range opts {
		switch o {
		case name:
			ro = true
		case "rw":
			if name == "ro" {
				ro = false
			}
		}
	}
	return ro
}

// checkNetNS checks, without opening it, that path is a namespace file
// (nsfs: /proc/PID/ns/net, or a bind mount of one such as
// /run/netns/NAME); a FIFO or a device there would block create or act
// on the device when spawn opens it.
func checkNetNS(path string) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(path, &sfs); err != nil {
		return unwrapPath(err)
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file (nsfs)")
	}
	return nil
}

// underRoot reports whether the clean absolute path src names something
// in the container's root, as written: below the root's path from
// config.json (root) or its resolved form (rootReal). It returns the path
// inside the root. No symbolic link is followed.
func underRoot(src, root, rootReal string) (string, bool) {
	for _, r := range []string{root, rootReal} {
		if src == r {
			return "", true
		}
		if rel, ok := strings.CutPrefix(src, r+"/"); ok {
			return rel, true
		}
	}
	return "", false
}

// resolveOutsideRoot resolves the symbolic links of src, a clean absolute
// path outside the container's root, on the host. A path whose walk
// enters the root (a host symbolic link into it) is refused: from there
// on the image's links would be followed on the host. Each prefix of src
// is resolved in turn, so the walk stops at the first that reaches the
// root, before any link inside it is read.
func resolveOutsideRoot(src, rootReal string) (string, error) {
	prefix := "/"
	for _, c := range strings.Split(strings.TrimPrefix(src, "/"), "/") {
		prefix = filepath.Join(prefix, c)
		real, err := filepath.EvalSymlinks(prefix)
		if err != nil {
			return "", unwrapPath(err)
		}
		if _, in := underRoot(real, rootReal, rootReal); in {
			return "", fmt.Errorf("%s leads into the container's root through a host symbolic link; name a path inside the root as it is written (below root.path)", prefix)
		}
	}
	return filepath.EvalSymlinks(src)
}

// readHostFile reads a host file that a bind mount copies into the guest,
// of at most max bytes: it must be a regular file, and not one of the
// kernel's own state (procfs, sysfs and the like, whose files can leak the
// host's secrets or never end). p is the path Translate resolved, which
// holds no symbolic link: none is followed now (a component replaced by a
// link since, in a directory someone else writes, would lead anywhere),
// and the file is first opened O_PATH and checked, and only a regular file
// is opened for reading: the open of a FIFO releases its writer, and a
// device's runs its driver (/dev/watchdog arms the host's watchdog) before
// any check could refuse it (found in review).
func readHostFile(p string, max int64) ([]byte, error) {
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS}
	pfd, err := container.Openat2(unix.AT_FDCWD, p, how)
	if errors.Is(err, unix.ELOOP) {
		return nil, errors.New("a symbolic link is in the path now (it changed after it was resolved)")
	}
	if err != nil {
		return nil, err
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, errors.New("not a regular file")
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(pfd, &sfs); err != nil {
		return nil, err
	}
	if name, bad := pseudoFS(int64(sfs.Type)); bad {
		return nil, fmt.Errorf("a file on %s, the host kernel's own state, which a VM cannot share", name)
	}
	if p == "/dev" || strings.HasPrefix(p, "/dev/") {
		return nil, errors.New("host devices cannot reach a VM")
	}
	// The regular file checked, opened for reading through its O_PATH
	// descriptor: the same inode, whatever the path names by now.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pfd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	return readAtMost(f, max)
}

func readSmallFile(p string, max int64) ([]byte, error) {
	// O_NONBLOCK: a FIFO that nobody writes blocked open(2) for ever
	// (exec --process FIFO). A regular file, or a pipe (`--process
	// /dev/stdin`, which runc reads too): opened so, a pipe without a
	// writer reads as empty at once, and one with a writer is read
	// (through Go's poller) to its end.
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, unwrapPath(err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, unwrapPath(err)
	} else if !st.Mode().IsRegular() && st.Mode()&os.ModeNamedPipe == 0 {
		return nil, fmt.Errorf("a %s, not a regular file or a pipe", fileKind(st.Mode()))
	}
	return readAtMost(f, max)
}

// readAtMost reads f to its end, refusing more than max bytes.
func readAtMost(f *os.File, max int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("larger than %d bytes", max)
	}
	return b, nil
}

func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeSocket != 0:
		return "unix socket"
	case m&os.ModeNamedPipe != 0:
		return "named pipe"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeDevice != 0:
		return "block device"
	}
	return "special file"
}

// translateLinux handles the linux section.
func translateLinux(p *Plan, id string, l *specs.Linux, opt translateOptions) error {
	if l == nil {
		return nil
	}
	if len(l.UIDMappings) > 0 || len(l.GIDMappings) > 0 {
		return specError("linux.uidMappings", "user namespaces are not supported: the VM is the isolation boundary, and its root file system is served with the host's ids")
	}
	switch {
	case l.IntelRdt != nil:
		return specError("linux.intelRdt", "not supported")
	case l.MemoryPolicy != nil:
		return specError("linux.memoryPolicy", "not supported")
	case l.Personality != nil:
		return specError("linux.personality", "not supported")
	case len(l.NetDevices) > 0:
		return specError("linux.netDevices", "host network devices cannot be moved into a VM")
	case len(l.TimeOffsets) > 0:
		return specError("linux.timeOffsets", "not supported")
	}
	for _, ns := range l.Namespaces {
		switch ns.Type {
		case specs.UserNamespace:
			return specError("linux.namespaces", "user namespaces are not supported: the VM is the isolation boundary")
		case specs.NetworkNamespace:
			if ns.Path == "" {
				p.Net = NetPlan{Mode: NetNew}
				continue
			}
			if err := checkNetNS(ns.Path); err != nil {
				return specError("linux.namespaces", "network namespace %s: %v", ns.Path, err)
			}
			p.Net = NetPlan{Mode: NetNS, Path: ns.Path}
		case specs.PIDNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.CgroupNamespace:
			// The VM has all of these of its own. A path to join is
			// what Kubernetes gives every container of a pod (the
			// sandbox's ipc and uts, its pid with
			// shareProcessNamespace): the container keeps its VM's
			// own, as docs/OCI.md says.
		case specs.MountNamespace:
			if ns.Path != "" {
				return specError("linux.namespaces", "joining the mount namespace %s: a VM has its own root", ns.Path)
			}
		case specs.TimeNamespace:
			if ns.Path != "" {
				return specError("linux.namespaces", "joining the time namespace %s: a VM has its own clock", ns.Path)
			}
		default:
			return specError("linux.namespaces", "unknown namespace type %q", ns.Type)
		}
	}
	if len(l.Sysctl) > 0 {
		p.Setup.Sysctl = l.Sysctl
	}
	for i, d := range l.Devices {
		mode := uint32(0o666)
		if d.FileMode != nil {
			mode = uint32(d.FileMode.Perm())
		}
		dev := container.Device{Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor, Mode: mode}
		if d.UID != nil {
			dev.UID = *d.UID
		}
		if d.GID != nil {
			dev.GID = *d.GID
		}
		if d.Type == "p" {
			dev.Major, dev.Minor = 0, 0
		}
		if _, err := container.CleanPath("path", d.Path); err != nil {
			return specError(fmt.Sprintf("linux.devices[%d]", i), "%v", err)
		}
		p.Setup.Devices = append(p.Setup.Devices, dev)
	}
	p.Setup.MaskedPaths = l.MaskedPaths
	p.Setup.ReadonlyPaths = l.ReadonlyPaths
	p.Setup.RootPropagation = l.RootfsPropagation
	if r := l.Resources; r != nil {
		if err := translateResources(p, r); err != nil {
			return err
		}
	}
	if l.CgroupsPath != "" {
		dir, err := cgroupDir(l.CgroupsPath, id, opt)
		if err != nil {
			return specError("linux.cgroupsPath", "%v", err)
		}
		p.Cgroup.Path = dir
	}
	return nil
}

// translateResources sizes the VM from the memory limit and the CPU
// quota or cpuset; the other controllers are ignored (docs/OCI.md).
func translateResources(p *Plan, r *specs.LinuxResources) error {
	if m := r.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		mib := uint64(*m.Limit) >> 20
		if mib < MinMemoryMiB {
			return specError("linux.resources.memory.limit", "%d bytes; a VM needs at least %d MiB", *m.Limit, MinMemoryMiB)
		}
		p.MemoryMiB = min(mib, vmm.MaxMemoryMiB)
	}
	if c := r.CPU; c != nil {
		if c.Quota != nil && *c.Quota > 0 {
			period := uint64(100000)
			if c.Period != nil && *c.Period > 0 {
				period = *c.Period
			}
			n := (uint64(*c.Quota) + period - 1) / period
			p.CPUs = int(min(max(n, 1), 255))
			p.Cgroup.CPUMax = fmt.Sprintf("%d %d", *c.Quota, period)
		} else if c.Cpus != "" {
			n, err := countCPUs(c.Cpus)
			if err != nil {
				return specError("linux.resources.cpu.cpus", "%v", err)
			}
			p.CPUs = min(n, 255)
		}
	}
	return nil
}

// countCPUs counts the CPUs of a cpuset list ("0-3,6").
func countCPUs(s string) (int, error) {
	n := 0
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
		a, err := strconv.ParseUint(lo, 10, 16)
		if err != nil {
			return 0, fmt.Errorf("%q is not a CPU list", s)
		}
		b := a
		if isRange {
			if b, err = strconv.ParseUint(hi, 10, 16); err != nil || b < a {
				return 0, fmt.Errorf("%q is not a CPU list", s)
			}
		}
		n += int(b-a) + 1
	}
	if n == 0 {
		return 0, fmt.Errorf("%q names no CPU", s)
	}
	return n, nil
}

// Annotations by which containerd's CRI plugin and CRI-O mark a pod's
// sandbox container.
var podSandboxAnnotations = []string{"io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"}

func isPodSandbox(a map[string]string) bool {
	for _, k := range podSandboxAnnotations {
		if a[k] == "sandbox" {
			return true
		}
	}
	return false
}

// checkPortSpec accepts "all", "none", or a comma-separated list of ports
// and ranges (1-65535) for passt's -t and -u.
func checkPortSpec(v string) error {
	if v == "all" || v == "none" {
		return nil
	}
	bad := fmt.Errorf("%q is not all, none or a list of ports and ranges (80,443,8000-8100)", v)
	items := strings.Split(v, ",")
	if len(items) > 64 {
		return bad
	}
	for _, item := range items {
		lo, hi, isRange := strings.Cut(item, "-")
		a, err1 := strconv.ParseUint(lo, 10, 16)
		b, err2 := a, error(nil)
		if isRange {
			b, err2 = strconv.ParseUint(hi, 10, 16)
		}
		if err1 != nil || err2 != nil || a == 0 || b < a {
			return bad
		}
	}
	return nil
}

// applyAnnotations applies krun.cpus, krun.ram_mib and krun.open_files.
func applyAnnotations(p *Plan, a map[string]string) error {
	if v, ok := a[AnnotationCPUs]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 255 {
			return specError("annotations."+AnnotationCPUs, "%q is not a vCPU count (1-255)", v)
		}
		p.CPUs = n
	}
	if v, ok := a[AnnotationRAMMiB]; ok {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n < MinMemoryMiB || n > vmm.MaxMemoryMiB {
			return specError("annotations."+AnnotationRAMMiB, "%q is not a memory size in MiB (%d-%d)", v, MinMemoryMiB, vmm.MaxMemoryMiB)
		}
		p.MemoryMiB = n
	}
	if v, ok := a[AnnotationOpenFiles]; ok {
		n, err := devspec.ParseOpenFiles(v)
		if err != nil {
			return specError("annotations."+AnnotationOpenFiles, "%q is not an open-files limit (%d-%d)", v, devspec.MinFSOpenFiles, devspec.MaxFSOpenFiles)
		}
		p.OpenFiles = n
	}
	return nil
}

// translateHooks keeps the hooks that run on the host; createContainer
// and startContainer would have to run inside the guest and are refused.
func translateHooks(p *Plan, h *specs.Hooks) error {
	if h == nil {
		return nil
	}
	if len(h.CreateContainer) > 0 {
		return specError("hooks.createContainer", "not supported: it would have to run inside the VM")
	}
	if len(h.StartContainer) > 0 {
		return specError("hooks.startContainer", "not supported: it would have to run inside the VM")
	}
	all := [][]specs.Hook{h.Prestart, h.CreateRuntime, h.Poststart, h.Poststop}
	for _, list := range all {
		for _, hk := range list {
			if !filepath.IsAbs(hk.Path) {
				return specError("hooks", "hook path %q is not absolute", hk.Path)
			}
			if hk.Timeout != nil && *hk.Timeout <= 0 {
				return specError("hooks", "hook %s: timeout %d is not positive", hk.Path, *hk.Timeout)
			}
		}
	}
	p.Hooks = h
	return nil
}

// lookupOnHost reports whether the command can be looked up in the root
// on the host before boot: not when it may come from a mount the guest
// makes, or is relative to the working directory.
func lookupOnHost(p *Plan) bool {
	name := p.Process.Args[0]
	var dirs []string
	if strings.Contains(name, "/") {
		if !path.IsAbs(name) {
			return false
		}
		dirs = []string{path.Dir(name)}
	} else {
		pathEnv := initconfig.DefaultPath
		for _, kv := range p.Process.Env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				pathEnv = v
			}
		}
		for _, d := range strings.Split(pathEnv, ":") {
			if !path.IsAbs(d) {
				return false
			}
			dirs = append(dirs, path.Clean(d))
		}
	}
	for _, m := range p.Setup.Mounts {
		for _, d := range dirs {
			if d == m.Destination || strings.HasPrefix(d, m.Destination+"/") || m.Destination == "/" {
				return false
			}
		}
	}
	return true
}
