package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CacheEnv names the environment variable that overrides the asset cache
// directory. The default is ~/.cache/krun-core-test.
const CacheEnv = "KRUN_TEST_CACHE"

// KernelMetaPackage is the Debian package whose dependency names the stock
// kernel image package (linux-image-<abi>-amd64).
const KernelMetaPackage = "linux-image-amd64"

// BusyboxPackage is the Debian package providing a static busybox.
const BusyboxPackage = "busybox-static"

// ErrNoPackageLists is wrapped by asset errors caused by missing apt package
// lists; the remedy is `apt-get update`.
var ErrNoPackageLists = errors.New("apt package lists are missing or stale: run `apt-get update` (as root) first")

// Kernel is an unpacked Debian kernel image package.
type Kernel struct {
	Package string // e.g. linux-image-6.1.0-56-amd64
	Version string // Debian package version, e.g. 6.1.192-2
	Release string // kernel release (uname -r), e.g. 6.1.0-56-amd64
	Vmlinuz string // path of the bzImage
	// Vmlinux is the uncompressed ELF kernel extracted from Vmlinuz (booted
	// through QEMU's PVH entry, which is faster under TCG); empty if it
	// could not be extracted, see VmlinuxErr.
	Vmlinux    string
	VmlinuxErr error
	ModulesDir string // path of lib/modules/<Release>
	Root       string // root of the unpacked package
}

// CacheDir returns the asset cache directory ($KRUN_TEST_CACHE or
// ~/.cache/krun-core-test), creating it if needed.
func CacheDir() (string, error) {
	dir := os.Getenv(CacheEnv)
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find home directory for the test cache (set %s): %w", CacheEnv, err)
		}
		dir = filepath.Join(home, ".cache", "krun-core-test")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create test cache %s: %w", dir, err)
	}
	return dir, nil
}

// runCmd runs name args in dir and returns stdout; the error carries stderr.
func runCmd(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

var aptMissingRE = regexp.MustCompile(`(?i)(unable to locate package|no packages found|has no installation candidate|can't select candidate|404\s+not found|failed to fetch)`)

// aptErr turns an apt failure into an error that names the remedy when the
// cause is missing or stale package lists.
func aptErr(what string, err error) error {
	if aptMissingRE.MatchString(err.Error()) {
		return fmt.Errorf("%s: %w (%v)", what, ErrNoPackageLists, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// resolveKernelPackage asks apt which linux-image-<abi>-amd64 package the
// meta package depends on.
func resolveKernelPackage(ctx context.Context) (string, error) {
	out, err := runCmd(ctx, "", "apt-cache", "depends", KernelMetaPackage)
	if err != nil {
		return "", aptErr("resolve "+KernelMetaPackage, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if strings.HasPrefix(dep, "linux-image-") && !strings.HasPrefix(dep, "<") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("resolve %s: no linux-image-* dependency in `apt-cache depends` output: %w", KernelMetaPackage, ErrNoPackageLists)
}

// candidateVersion returns apt's candidate version of pkg.
func candidateVersion(ctx context.Context, pkg string) (string, error) {
	out, err := runCmd(ctx, "", "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return "", aptErr("look up "+pkg, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version:"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("look up %s: no Version in `apt-cache show`: %w", pkg, ErrNoPackageLists)
}

// safeName turns a package name + version into a directory name.
func safeName(pkg, version string) string {
	r := strings.NewReplacer(":", "%3a", "/", "_", " ", "_")
	return r.Replace(pkg + "_" + version)
}

const completeMarker = ".krun-complete"

// withLock runs fn while holding an exclusive flock on path. flock excludes
// other processes and other open file descriptions in this process.
func withLock(ctx context.Context, path string, fn func() error) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("open lock %s: %w", path, err)
	}
	defer f.Close()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return fn()
}

// fetchDeb makes sure pkg at version is downloaded and unpacked under the
// cache and returns the root of the unpacked tree. Concurrent callers (other
// test processes included) serialise on a lock file; the tree appears
// atomically by rename, so a reader never sees a half-unpacked package.
func fetchDeb(ctx context.Context, pkg, version string) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	debDir := filepath.Join(cache, "deb")
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", debDir, err)
	}
	name := safeName(pkg, version)
	final := filepath.Join(debDir, name)
	if _, err := os.Stat(filepath.Join(final, completeMarker)); err == nil {
		return final, nil
	}
	err = withLock(ctx, filepath.Join(debDir, name+".lock"), func() error {
		if _, err := os.Stat(filepath.Join(final, completeMarker)); err == nil {
			return nil // another process finished while we waited
		}
		// Holding the lock, no one else is unpacking this package: temp
		// dirs left by a killed process can go.
		if stale, _ := filepath.Glob(filepath.Join(debDir, ".tmp-"+name+"-*")); len(stale) > 0 {
			for _, d := range stale {
				os.RemoveAll(d)
			}
		}
		tmp, err := os.MkdirTemp(debDir, ".tmp-"+name+"-")
		if err != nil {
			return fmt.Errorf("create download dir: %w", err)
		}
		defer os.RemoveAll(tmp)
		// apt-get download drops privileges to _apt when it can; a private
		// 0755 directory readable by it avoids the "unsandboxed" warning
		// becoming an error on some setups.
		if err := os.Chmod(tmp, 0o755); err != nil {
			return fmt.Errorf("chmod download dir: %w", err)
		}
		if _, err := runCmd(ctx, tmp, "apt-get", "download", "-q", pkg+"="+version); err != nil {
			return aptErr("download "+pkg+"="+version, err)
		}
		debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
		if len(debs) != 1 {
			return fmt.Errorf("download %s: expected one .deb, found %d", pkg, len(debs))
		}
		root := filepath.Join(tmp, "root")
		if _, err := runCmd(ctx, tmp, "dpkg-deb", "-x", debs[0], root); err != nil {
			return fmt.Errorf("unpack %s: %w", debs[0], err)
		}
		if err := os.WriteFile(filepath.Join(root, completeMarker), []byte(pkg+" "+version+"\n"), 0o644); err != nil {
			return fmt.Errorf("mark %s complete: %w", pkg, err)
		}
		// A stale incomplete tree (crash before the marker) is replaced.
		if err := os.RemoveAll(final); err != nil {
			return fmt.Errorf("remove stale %s: %w", final, err)
		}
		if err := os.Rename(root, final); err != nil {
			return fmt.Errorf("install %s into cache: %w", pkg, err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return final, nil
}

// cachedTrees lists complete cached trees of packages whose name starts with
// prefix, newest modification first. Used when apt cannot be asked (offline
// reuse of an earlier download).
func cachedTrees(prefix string) []string {
	cache, err := CacheDir()
	if err != nil {
		return nil
	}
	matches, _ := filepath.Glob(filepath.Join(cache, "deb", prefix+"*"))
	type tree struct {
		path string
		mod  time.Time
	}
	var trees []tree
	for _, m := range matches {
		st, err := os.Stat(filepath.Join(m, completeMarker))
		if err != nil {
			continue
		}
		trees = append(trees, tree{m, st.ModTime()})
	}
	sort.Slice(trees, func(i, j int) bool { return trees[i].mod.After(trees[j].mod) })
	out := make([]string, len(trees))
	for i, tr := range trees {
		out[i] = tr.path
	}
	return out
}

// FetchKernel downloads (once) and unpacks Debian's stock amd64 kernel.
// If apt cannot resolve the package but an earlier download is cached, the
// cached kernel is used.
func FetchKernel(ctx context.Context) (*Kernel, error) {
	v, err := aptMemo(ctx, "kernel", func() (string, error) {
		pkg, err := resolveKernelPackage(ctx)
		if err != nil {
			return "", err
		}
		version, err := candidateVersion(ctx, pkg)
		if err != nil {
			return "", err
		}
		return pkg + " " + version, nil
	})
	pkg, version, _ := strings.Cut(v, " ")
	if err != nil {
		for _, root := range cachedTrees("linux-image-") {
			if k, kerr := kernelFromTree(root); kerr == nil {
				k.Vmlinux, k.VmlinuxErr = extractVmlinux(ctx, k)
				return k, nil
			}
		}
		return nil, err
	}
	root, err := fetchDeb(ctx, pkg, version)
	if err != nil {
		return nil, err
	}
	k, err := kernelFromTree(root)
	if err != nil {
		return nil, err
	}
	k.Package, k.Version = pkg, version
	k.Vmlinux, k.VmlinuxErr = extractVmlinux(ctx, k)
	return k, nil
}

// kernelFromTree finds vmlinuz and the modules directory in an unpacked
// kernel package.
func kernelFromTree(root string) (*Kernel, error) {
	vmlinuz, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return nil, fmt.Errorf("kernel package at %s: expected one boot/vmlinuz-*, found %d", root, len(vmlinuz))
	}
	release := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	mods := filepath.Join(root, "lib", "modules", release)
	if st, err := os.Stat(mods); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("kernel package at %s: no modules directory lib/modules/%s", root, release)
	}
	k := &Kernel{Release: release, Vmlinuz: vmlinuz[0], ModulesDir: mods, Root: root}
	if b, err := os.ReadFile(filepath.Join(root, completeMarker)); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			k.Package, k.Version = f[0], f[1]
		}
	}
	return k, nil
}

// FetchBusybox downloads (once) Debian's busybox-static and returns the path
// of the static binary inside the cache.
func FetchBusybox(ctx context.Context) (string, error) {
	version, err := aptMemo(ctx, "busybox", func() (string, error) {
		return candidateVersion(ctx, BusyboxPackage)
	})
	if err != nil {
		for _, root := range cachedTrees(BusyboxPackage + "_") {
			p := filepath.Join(root, "bin", "busybox")
			if _, serr := os.Stat(p); serr == nil {
				return p, nil
			}
		}
		return "", err
	}
	root, err := fetchDeb(ctx, BusyboxPackage, version)
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "bin", "busybox")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("busybox-static package has no bin/busybox: %w", err)
	}
	return p, nil
}

// aptListsDir is where apt keeps its package lists.
const aptListsDir = "/var/lib/apt/lists"

// aptListsStamp identifies the current state of apt's package lists: the
// newest modification time and the number of entries in the lists
// directory. It changes on every `apt-get update` that changes anything.
func aptListsStamp() (string, bool) {
	ents, err := os.ReadDir(aptListsDir)
	if err != nil {
		return "", false
	}
	var newest int64
	for _, e := range ents {
		if info, err := e.Info(); err == nil && info.ModTime().UnixNano() > newest {
			newest = info.ModTime().UnixNano()
		}
	}
	if st, err := os.Stat(aptListsDir); err == nil && st.ModTime().UnixNano() > newest {
		newest = st.ModTime().UnixNano()
	}
	return fmt.Sprintf("%d/%d", newest, len(ents)), true
}

// aptMemo returns compute()'s result, remembered in the cache for as long as
// apt's package lists are unchanged: asking apt-cache costs about a second
// per call on a machine without a persistent pkgcache.bin.
func aptMemo(ctx context.Context, key string, compute func() (string, error)) (string, error) {
	stamp, haveStamp := aptListsStamp()
	cache, err := CacheDir()
	if err != nil || !haveStamp {
		return compute()
	}
	memo := filepath.Join(cache, "apt-memo-"+key)
	if b, err := os.ReadFile(memo); err == nil {
		if st, val, ok := strings.Cut(strings.TrimSpace(string(b)), "\n"); ok && st == stamp && val != "" {
			return val, nil
		}
	}
	val, err := compute()
	if err != nil {
		return "", err
	}
	if f, err := os.CreateTemp(cache, ".apt-memo-*"); err == nil {
		_, werr := f.WriteString(stamp + "\n" + val + "\n")
		cerr := f.Close()
		if werr == nil && cerr == nil {
			_ = os.Rename(f.Name(), memo)
		}
		os.Remove(f.Name())
	}
	return val, nil
}
