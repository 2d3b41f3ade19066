package kmod

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
)

// Offsets in the x86 boot protocol's setup header
// (Documentation/arch/x86/boot.rst).
const (
	hdrMagicOff    = 0x202 // "HdrS"
	hdrVersionOff  = 0x206 // protocol version, u16
	kernelVersOff  = 0x20e // kernel_version: pointer to a NUL-terminated string, minus 0x200
	maxVersionText = 256
)

// releaseRE matches a kernel release as uname -r prints it.
var releaseRE = regexp.MustCompile(`^[0-9]+\.[0-9]+[0-9A-Za-z._+~-]*$`)

// maxKernelScan bounds how much of an ELF kernel Release searches.
const maxKernelScan = 256 << 20

// Release returns the release (uname -r) of the kernel image at path: for a
// bzImage from the string the setup header's kernel_version field points
// to; for an uncompressed ELF vmlinux from its "Linux version " banner.
func Release(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("kernel release: %w", err)
	}
	defer f.Close()
	head := make([]byte, 64<<10)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("kernel release of %s: %w", path, err)
	}
	head = head[:n]
	if bytes.HasPrefix(head, []byte("\x7fELF")) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return "", fmt.Errorf("kernel release of %s: %w", path, err)
		}
		img, err := io.ReadAll(io.LimitReader(f, maxKernelScan))
		if err != nil {
			return "", fmt.Errorf("kernel release of %s: %w", path, err)
		}
		r, err := ReleaseFromBanner(img)
		if err != nil {
			return "", fmt.Errorf("kernel release of %s: %w", path, err)
		}
		return r, nil
	}
	r, err := ReleaseFromBzImage(head)
	if err != nil {
		return "", fmt.Errorf("kernel release of %s: %w", path, err)
	}
	return r, nil
}

// ReleaseFromBzImage reads the release from the start of a bzImage (the
// first 64 KiB are enough: the string lives in the setup sectors).
func ReleaseFromBzImage(img []byte) (string, error) {
	if len(img) < kernelVersOff+2 || string(img[hdrMagicOff:hdrMagicOff+4]) != "HdrS" {
		return "", errors.New("not a bzImage (no HdrS setup header) nor an ELF kernel")
	}
	if v := binary.LittleEndian.Uint16(img[hdrVersionOff:]); v < 0x200 {
		return "", fmt.Errorf("boot protocol %#x has no kernel_version field", v)
	}
	ptr := uint64(binary.LittleEndian.Uint16(img[kernelVersOff:]))
	if ptr == 0 {
		return "", errors.New("bzImage has no kernel_version string")
	}
	start := ptr + 0x200
	if start >= uint64(len(img)) {
		return "", fmt.Errorf("kernel_version pointer %#x outside the %d-byte setup area", ptr, len(img))
	}
	text := img[start:min(uint64(len(img)), start+maxVersionText)]
	end := bytes.IndexByte(text, 0)
	if end < 0 {
		return "", errors.New("kernel_version string is not terminated")
	}
	return releaseWord(text[:end])
}

// ReleaseFromBanner finds "Linux version <release> " in a kernel image.
func ReleaseFromBanner(img []byte) (string, error) {
	const banner = "Linux version "
	for rest := img; ; {
		i := bytes.Index(rest, []byte(banner))
		if i < 0 {
			return "", errors.New(`no "Linux version" banner in the kernel image`)
		}
		rest = rest[i+len(banner):]
		text := rest[:min(len(rest), maxVersionText)]
		if end := bytes.IndexAny(text, " \x00"); end > 0 {
			if r, err := releaseWord(text[:end]); err == nil {
				return r, nil
			}
		}
	}
}

func releaseWord(text []byte) (string, error) {
	w := text
	if i := bytes.IndexByte(w, ' '); i >= 0 {
		w = w[:i]
	}
	if !releaseRE.Match(w) {
		return "", fmt.Errorf("kernel version string %q does not start with a release", text)
	}
	return string(w), nil
}

// ModulesDirCandidates returns where the module tree of kernel image
// kernelPath with release rel may be, in the order FindModulesDir tries
// them: <dir>/../lib/modules/R and <dir>/../usr/lib/modules/R next to the
// kernel's directory (a Debian package unpacked with dpkg -x, kernel in
// boot/; for an installed /boot/vmlinuz-R that is /lib/modules/R), then
// /lib/modules/R and /usr/lib/modules/R. The tree that came with the
// kernel file wins over the host's tree of the same release, which may be
// another build.
func ModulesDirCandidates(kernelPath, rel string) []string {
	var out []string
	next := func(k string) {
		up := filepath.Join(filepath.Dir(k), "..")
		out = append(out, filepath.Join(up, "lib", "modules", rel), filepath.Join(up, "usr", "lib", "modules", rel))
	}
	next(kernelPath)
	// A link to the kernel (make kernel's cache/vmlinuz): the tree next
	// to the file it names.
	if real, err := filepath.EvalSymlinks(kernelPath); err == nil && real != kernelPath {
		next(real)
	}
	return append(out, filepath.Join("/lib/modules", rel), filepath.Join("/usr/lib/modules", rel))
}

// FindModulesDir returns the first candidate of ModulesDirCandidates that
// holds a module tree (a kernel/ directory).
func FindModulesDir(kernelPath, rel string) (string, error) {
	if !releaseRE.MatchString(rel) {
		return "", fmt.Errorf("bad kernel release %q", rel)
	}
	cands := ModulesDirCandidates(kernelPath, rel)
	for _, c := range cands {
		if st, err := os.Stat(filepath.Join(c, "kernel")); err == nil && st.IsDir() {
			return filepath.Clean(c), nil
		}
	}
	return "", fmt.Errorf("no module tree for kernel %s (release %s) in %v", kernelPath, rel, cands)
}
