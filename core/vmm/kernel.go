package vmm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoKernel says no kernel was given and none was found where krun-core
// looks (KernelSearch).
var ErrNoKernel = errors.New("no kernel")

// KernelEnv names the environment variable with the default kernel.
const KernelEnv = "KRUN_KERNEL"

// KernelCacheDir is where `make kernel` (scripts/fetch-kernel.sh) unpacks
// Debian's kernel and links it as vmlinuz: $KRUN_KERNEL_CACHE, else
// $XDG_CACHE_HOME/krun-core/kernel, else ~/.cache/krun-core/kernel.
func KernelCacheDir() string {
	if d := os.Getenv("KRUN_KERNEL_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "krun-core", "kernel")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "krun-core", "kernel")
	}
	return ""
}

// KernelSearch lists where FindKernel looks, in order: $KRUN_KERNEL, the
// host's own /boot/vmlinuz-$(uname -r) (its modules in /lib/modules), and
// the kernel `make kernel` fetched.
func KernelSearch() []string {
	var out []string
	if k := os.Getenv(KernelEnv); k != "" {
		out = append(out, k)
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		out = append(out, "/boot/vmlinuz-"+unix.ByteSliceToString(u.Release[:]))
	}
	if d := KernelCacheDir(); d != "" {
		out = append(out, filepath.Join(d, "vmlinuz"))
	}
	return out
}

// FindKernel returns the first readable kernel of KernelSearch. $KRUN_KERNEL,
// when set, must be readable: it is not skipped. The error names every
// place looked at, in one line.
func FindKernel() (string, error) {
	var tried []string
	for i, p := range KernelSearch() {
		err := readableFile(p)
		if err == nil {
			return p, nil
		}
		if i == 0 && os.Getenv(KernelEnv) != "" {
			return "", fmt.Errorf("%w: %s=%s: %v", ErrNoKernel, KernelEnv, p, unwrapPath(err))
		}
		why := "not found"
		if !errors.Is(err, fs.ErrNotExist) {
			why = unwrapPath(err).Error()
		}
		tried = append(tried, p+" ("+why+")")
	}
	return "", fmt.Errorf("%w: no --kernel, %s unset, looked in %s; give --kernel a bzImage (in a source tree, `make kernel` fetches Debian's)", ErrNoKernel, KernelEnv, strings.Join(tried, ", "))
}

// errNotRegular: a kernel path names a directory or a device.
var errNotRegular = errors.New("not a regular file")

// readableFile checks that p is a regular file and opens for reading. The
// type is checked first: opening a FIFO would wait for a writer, and
// opening a device can do things.
func readableFile(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return errNotRegular
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// CheckKernelFile checks a kernel or initrd path given by the user: it
// must open for reading and be a regular file. The error does not repeat
// the path.
func CheckKernelFile(p string) error { return unwrapPath(readableFile(p)) }

func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
