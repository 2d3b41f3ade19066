package vmtest

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/klauspost/compress/gzip"

	"github.com/krun-core/krun-core/guest/initramfs/cpio"
	"github.com/krun-core/krun-core/guest/initramfs/kmod"
)

// ResultPrefix starts the line a guest prints to report its verdict:
// "KRUN-E2E-RESULT <nonce>: ok" or "KRUN-E2E-RESULT <nonce>: fail <reason>".
// The nonce is per initramfs, so the console of a nested guest echoed by the
// outer one cannot be mistaken for the outer verdict.
const ResultPrefix = "KRUN-E2E-RESULT"

// Guest-side paths the generated /init uses.
const (
	guestScriptPath = "/etc/krun-e2e/test.sh"
	guestLibPath    = "/etc/krun-e2e/lib.sh"
)

// Compression selects how Initramfs.Write compresses the archive.
type Compression int

const (
	// CompressNone writes a plain cpio archive. The kernel unpacks it
	// without decompression, which boots fastest under TCG.
	CompressNone Compression = iota
	// CompressGzip writes a gzip-compressed archive (smaller files).
	CompressGzip
)

type ibNode struct {
	mode   uint32 // type | perm
	data   []byte
	src    string
	major  uint32
	minor  uint32
	target string
}

type ibModule struct {
	name string
	path string   // guest path
	deps []string // hard dependencies (module names)
}

// Initramfs builds a newc cpio initramfs with busybox, kernel modules, extra
// files and a generated /init. The zero value is not usable; call
// NewInitramfs. Methods record errors; Write reports the first one, so calls
// can be chained without checking each.
type Initramfs struct {
	nodes       map[string]*ibNode // absolute path -> node
	modules     []ibModule         // load order
	moduleSet   map[string]int     // name -> index in modules
	params      map[string]string
	release     string
	script      string
	nonce       string
	busybox     string
	compression Compression
	err         error
}

// NewInitramfs returns an empty builder with a fresh result nonce.
func NewInitramfs() *Initramfs {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("crypto/rand: " + err.Error()) // never fails on Linux
	}
	ib := &Initramfs{
		nodes:     map[string]*ibNode{},
		moduleSet: map[string]int{},
		params:    map[string]string{},
		nonce:     hex.EncodeToString(b[:]),
	}
	for _, d := range []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/dev", "/proc", "/sys", "/tmp", "/run", "/mnt", "/root", "/etc", "/etc/krun-e2e", "/lib", "/lib/modules", "/var"} {
		ib.AddDir(d, 0o755)
	}
	ib.nodes["/tmp"].mode = cpio.Dir | 0o1777
	// The kernel opens /dev/console for init before anything is mounted.
	ib.AddDevice("/dev/console", false, 5, 1, 0o600)
	ib.AddDevice("/dev/null", false, 1, 3, 0o666)
	return ib
}

// Nonce returns the per-archive token in this initramfs's result line.
func (ib *Initramfs) Nonce() string { return ib.nonce }

// ResultMarker returns "KRUN-E2E-RESULT <nonce>:", the start of the verdict
// line this initramfs's /init prints.
func (ib *Initramfs) ResultMarker() string { return ResultPrefix + " " + ib.nonce + ":" }

// SetCompression selects the archive compression (default CompressNone).
func (ib *Initramfs) SetCompression(c Compression) { ib.compression = c }

func (ib *Initramfs) fail(err error) {
	if ib.err == nil {
		ib.err = err
	}
}

func cleanGuestPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("guest path %q must be absolute", p)
	}
	c := path.Clean(p)
	if c == "/" {
		return "", fmt.Errorf("guest path %q names the root", p)
	}
	return c, nil
}

func (ib *Initramfs) put(dst string, n *ibNode) {
	p, err := cleanGuestPath(dst)
	if err != nil {
		ib.fail(err)
		return
	}
	// Create parents as directories.
	for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
		if old, ok := ib.nodes[dir]; ok {
			if old.mode&cpio.TypeMask != cpio.Dir {
				ib.fail(fmt.Errorf("initramfs: %s is needed as a directory for %s", dir, p))
				return
			}
			continue
		}
		ib.nodes[dir] = &ibNode{mode: cpio.Dir | 0o755}
	}
	if old, ok := ib.nodes[p]; ok && old.mode&cpio.TypeMask == cpio.Dir && n.mode&cpio.TypeMask == cpio.Dir {
		old.mode = n.mode
		return
	}
	ib.nodes[p] = n
}

// AddDir adds a directory (parents are created as needed).
func (ib *Initramfs) AddDir(dst string, mode os.FileMode) {
	ib.put(dst, &ibNode{mode: cpio.Dir | uint32(mode.Perm())})
}

// AddFile copies the host file src to dst in the guest with permissions
// mode. The content is read when Write runs.
func (ib *Initramfs) AddFile(dst, src string, mode os.FileMode) {
	st, err := os.Stat(src)
	if err != nil {
		ib.fail(fmt.Errorf("initramfs add %s: %w", dst, err))
		return
	}
	if !st.Mode().IsRegular() {
		ib.fail(fmt.Errorf("initramfs add %s: %s is not a regular file", dst, src))
		return
	}
	ib.put(dst, &ibNode{mode: cpio.Reg | uint32(mode.Perm()), src: src})
}

// AddBytes adds a file with the given content.
func (ib *Initramfs) AddBytes(dst string, data []byte, mode os.FileMode) {
	ib.put(dst, &ibNode{mode: cpio.Reg | uint32(mode.Perm()), data: bytes.Clone(data)})
}

// AddSymlink adds a symbolic link dst -> target.
func (ib *Initramfs) AddSymlink(dst, target string) {
	ib.put(dst, &ibNode{mode: cpio.Symlink | 0o777, target: target})
}

// AddDevice adds a character (block=false) or block device node. devtmpfs
// is mounted over /dev at boot; nodes here matter before that or elsewhere.
func (ib *Initramfs) AddDevice(dst string, block bool, major, minor uint32, mode os.FileMode) {
	t := uint32(cpio.Char)
	if block {
		t = cpio.Block
	}
	ib.put(dst, &ibNode{mode: t | uint32(mode.Perm()), major: major, minor: minor})
}

// AddBusybox installs the static busybox binary at /bin/busybox and a
// symlink for each applet it reports (busybox --list-full, run on the host:
// the binary is static amd64).
func (ib *Initramfs) AddBusybox(busybox string) {
	out, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		ib.fail(fmt.Errorf("list busybox applets with %s --list-full: %w", busybox, err))
		return
	}
	ib.AddFile("/bin/busybox", busybox, 0o755)
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		applet := strings.TrimSpace(sc.Text())
		if applet == "" || applet == "bin/busybox" || strings.Contains(applet, "..") {
			continue
		}
		if _, exists := ib.nodes["/"+applet]; exists {
			continue
		}
		ib.AddSymlink("/"+applet, "/bin/busybox")
	}
	ib.busybox = busybox
}

// HasBusybox reports whether AddBusybox was called.
func (ib *Initramfs) HasBusybox() bool { return ib.busybox != "" }

// AddModules copies the named modules of kernel k and everything they
// depend on into /lib/modules/<release>/, decompressed, and makes /init load
// them with insmod in dependency order before the test script runs. Names
// may use '-' or '_'. Built-in modules are skipped silently. A module not
// found is an error reported by Write. All modules must come from one kernel.
func (ib *Initramfs) AddModules(k *Kernel, names ...string) {
	if k == nil {
		ib.fail(fmt.Errorf("initramfs add modules: nil kernel"))
		return
	}
	if ib.release != "" && ib.release != k.Release {
		ib.fail(fmt.Errorf("initramfs add modules: kernel %s, but modules of %s already added", k.Release, ib.release))
		return
	}
	ib.release = k.Release
	idx, err := kmod.NewIndex(k.ModulesDir)
	if err != nil {
		ib.fail(err)
		return
	}
	mods, err := idx.Resolve(names)
	if err != nil {
		ib.fail(fmt.Errorf("initramfs add modules: %w", err))
		return
	}
	for _, m := range mods {
		if _, ok := ib.moduleSet[m.Name]; ok {
			continue
		}
		p := path.Join("/lib/modules", k.Release, m.Rel)
		ib.moduleSet[m.Name] = len(ib.modules)
		ib.modules = append(ib.modules, ibModule{name: m.Name, path: p, deps: m.Deps})
		ib.AddBytes(p, m.Image, 0o644)
	}
}

// SetModuleParams sets the insmod parameters for a module, e.g.
// SetModuleParams("virtio_mmio", "device=4K@0xd0000000:5"). busybox insmod
// does not read the kernel command line, so parameters must be given here.
// The module must be added with AddModules (before or after this call).
func (ib *Initramfs) SetModuleParams(module, params string) {
	ib.params[kmod.Name(module)] = params
}

// Modules returns the modules /init loads, in load order.
func (ib *Initramfs) Modules() []string {
	out := make([]string, len(ib.modules))
	for i, m := range ib.modules {
		out[i] = m.name
	}
	return out
}

// SetInit sets the test script. It runs under `sh -e` after the modules are
// loaded; see the package documentation for the helpers it can call and how
// the verdict is reported.
func (ib *Initramfs) SetInit(script string) { ib.script = script }

// guestLib is sourced by /init and by the test script.
const guestLib = `# krun-e2e guest helpers
KRUN_E2E_MARKER='%s'
e2e_ok() { echo "$KRUN_E2E_MARKER ok"; e2e_poweroff; }
e2e_fail() { echo "$KRUN_E2E_MARKER fail ${*:-no reason given}"; e2e_poweroff; }
# e2e_nested_hang WHAT: an inner guest made no progress (nested KVM under
# TCG can leave one idle for good); vmtest.NestedKVM retries the outer VM.
e2e_nested_hang() { echo "KRUN-E2E-NESTED-HANG $*"; e2e_fail "inner guest hung: $*"; }
# e2e_bounded SECONDS LOG CMD...: runs CMD (stdin /dev/null, output to LOG)
# and returns its status; if it still runs after SECONDS, or ends with the
# boot watchdog's line, it shows the tail of LOG and reports a nested hang.
e2e_bounded() {
	_limit=$1 _log=$2
	shift 2
	"$@" </dev/null >"$_log" 2>&1 &
	_pid=$!
	_i=0
	while kill -0 $_pid 2>/dev/null; do
		_i=$((_i+1))
		if [ $_i -gt $((_limit*2)) ]; then
			kill -9 $_pid 2>/dev/null
			wait $_pid 2>/dev/null
			tail -30 "$_log" | sed 's/^/hung| /'
			e2e_nested_hang "$* ran over ${_limit}s"
		fi
		sleep 0.5
	done
	_rc=0
	wait $_pid || _rc=$?
	if grep -q 'boot watchdog: the guest showed no sign of life' "$_log"; then
		tail -30 "$_log" | sed 's/^/hung| /'
		e2e_nested_hang "$* never started its guest"
	fi
	return $_rc
}
e2e_poweroff() {
	sync
	# Give the UART a moment to drain before the machine goes away.
	sleep 0.2 2>/dev/null || sleep 1
	poweroff -f
	sleep 5
}
`

// initScript renders /init.
func (ib *Initramfs) initScript() string {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
. ` + guestLibPath + `
echo "KRUN-E2E-INIT $(cut -d' ' -f1 /proc/uptime)"
`)
	for _, m := range ib.modules {
		fmt.Fprintf(&b, "insmod %s %s || e2e_fail %s\n", shQuote(m.path), ib.params[m.name], shQuote("insmod "+m.name+" failed"))
	}
	b.WriteString(`echo "KRUN-E2E-READY $(cut -d' ' -f1 /proc/uptime)"
sh -e ` + guestScriptPath + `
rc=$?
if [ $rc -eq 0 ]; then e2e_ok; else e2e_fail "test script exited with status $rc"; fi
`)
	return b.String()
}

// shQuote quotes s for a POSIX shell.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// modulesDep renders a modules.dep for the added modules so busybox
// modprobe works inside the guest too.
func (ib *Initramfs) modulesDep() []byte {
	prefix := path.Join("/lib/modules", ib.release) + "/"
	var lines []string
	for _, m := range ib.modules {
		// depmod lists the transitive dependencies so that the last one
		// is loaded first: reverse load order.
		seen := map[int]bool{}
		var walk func(deps []string)
		walk = func(deps []string) {
			for _, d := range deps {
				if i, ok := ib.moduleSet[kmod.Name(d)]; ok && !seen[i] {
					seen[i] = true
					walk(ib.modules[i].deps)
				}
			}
		}
		walk(m.deps)
		line := strings.TrimPrefix(m.path, prefix) + ":"
		for i := len(ib.modules) - 1; i >= 0; i-- {
			if seen[i] {
				line += " " + strings.TrimPrefix(ib.modules[i].path, prefix)
			}
		}
		lines = append(lines, line)
	}
	return []byte(strings.Join(lines, "\n") + "\n")
}

// Write renders /init and writes the archive to path.
func (ib *Initramfs) Write(dst string) error {
	if ib.err != nil {
		return ib.err
	}
	if ib.busybox == "" {
		if _, ok := ib.nodes["/bin/sh"]; !ok {
			return fmt.Errorf("initramfs: no /bin/sh: call AddBusybox")
		}
	}
	ib.AddBytes("/init", []byte(ib.initScript()), 0o755)
	ib.AddBytes(guestLibPath, []byte(fmt.Sprintf(guestLib, ib.ResultMarker())), 0o644)
	script := ". " + guestLibPath + "\n" + ib.script + "\n"
	ib.AddBytes(guestScriptPath, []byte(script), 0o755)
	if ib.release != "" {
		ib.AddBytes(path.Join("/lib/modules", ib.release, "modules.dep"), ib.modulesDep(), 0o644)
	}
	if ib.err != nil {
		return ib.err
	}

	f, err := os.CreateTemp(filepath.Dir(dst), ".initramfs-*")
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	var w io.Writer = f
	var zw *gzip.Writer
	if ib.compression == CompressGzip {
		zw, err = gzip.NewWriterLevel(f, gzip.BestSpeed)
		if err != nil {
			return fmt.Errorf("write initramfs: %w", err)
		}
		w = zw
	}
	cw := cpio.NewWriter(w)
	paths := make([]string, 0, len(ib.nodes))
	for p := range ib.nodes {
		paths = append(paths, p)
	}
	// Sorting puts every directory before its contents ("/a" < "/a/b").
	sort.Strings(paths)
	for _, p := range paths {
		n := ib.nodes[p]
		e := &cpio.Entry{Name: p, Mode: n.mode, RdevMajor: n.major, RdevMinor: n.minor}
		switch n.mode & cpio.TypeMask {
		case cpio.Reg:
			e.Data, e.Src = n.data, n.src
		case cpio.Symlink:
			e.Data = []byte(n.target)
		}
		if err := cw.Add(e); err != nil {
			return fmt.Errorf("write initramfs: %w", err)
		}
	}
	if err := cw.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return fmt.Errorf("write initramfs: %w", err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := os.Rename(f.Name(), dst); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}

// AddHostBinary copies a host executable to the same path in the guest
// together with the shared libraries and dynamic loader `ldd` reports for
// it, so dynamically linked host tools (qemu-system-x86_64 for a nested
// inner guest, passt) run in the busybox guest. Static binaries are copied
// alone.
func (ib *Initramfs) AddHostBinary(bin string) {
	if !filepath.IsAbs(bin) {
		p, err := exec.LookPath(bin)
		if err != nil {
			ib.fail(fmt.Errorf("initramfs add host binary %s: %w", bin, err))
			return
		}
		bin = p
	}
	ib.AddFile(bin, bin, 0o755)
	libs, err := sharedLibs(bin)
	if err != nil {
		ib.fail(fmt.Errorf("initramfs add host binary %s: %w", bin, err))
		return
	}
	for _, l := range libs {
		ib.AddFile(l, l, 0o755)
	}
}

// sharedLibs lists the absolute library paths ldd resolves for bin; none for
// a static binary.
func sharedLibs(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd: %w: %s", err, strings.TrimSpace(string(out)))
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("ldd: %s", line)
		}
		// "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
		// "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
		if _, after, ok := strings.Cut(line, "=> "); ok {
			line = after
		}
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "/") {
			libs = append(libs, f[0])
		}
	}
	return libs, nil
}
