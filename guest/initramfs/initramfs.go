// Package initramfs builds the initramfs krun-core boots for `run --root
// DIR -- CMD`: /init (the krun-init binary), /krun/config.json, the kernel
// modules the VM's devices need (uncompressed, from the kernel's own module
// tree, dependencies first) and /krun/modules, their load order. Nothing is
// downloaded: everything comes from the host's kernel and the krun-init
// binary the caller hands in.
//
// Subpackages: cpio (the newc archive format) and kmod (module trees,
// dependencies, kernel release detection).
package initramfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/initramfs/cpio"
	"github.com/krun-core/krun-core/guest/initramfs/kmod"
)

// Directories every krun initramfs has: the mount points krun-init uses
// before the root is switched.
var baseDirs = []string{"/dev", "/proc", "/sys", "/newroot", "/krun", "/tmp", "/run"}

// Options describe one initramfs.
type Options struct {
	// Init is the krun-init binary (static), stored as /init.
	Init []byte
	// Config is stored as /krun/config.json; it must validate.
	Config *initconfig.Config
	// Modules are the kernel modules to load, by name ('-' and '_' are
	// the same). Their dependencies are added; built-in ones are skipped.
	// Typically the transport (virtio_mmio or virtio_pci), virtiofs,
	// virtio_console, and virtio_net when the VM has a NIC.
	Modules []string
	// ModulesDir is the kernel's module tree (kmod.FindModulesDir);
	// required when Modules is not empty.
	ModulesDir string
}

// Module is a module placed in the initramfs.
type Module struct {
	Name string
	Path string // absolute path inside the initramfs
}

// Result says what Build put in the archive.
type Result struct {
	Modules []Module // in load order
}

// Build writes the archive to w.
func Build(w io.Writer, o Options) (*Result, error) {
	if len(o.Init) == 0 {
		return nil, errors.New("initramfs: no krun-init binary")
	}
	if !bytes.HasPrefix(o.Init, []byte("\x7fELF")) {
		return nil, errors.New("initramfs: the krun-init binary is not an ELF executable")
	}
	if o.Config == nil {
		return nil, errors.New("initramfs: no config")
	}
	cfg, err := o.Config.Marshal()
	if err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	var mods []kmod.Module
	if len(o.Modules) > 0 {
		if o.ModulesDir == "" {
			return nil, errors.New("initramfs: modules requested without a module tree")
		}
		idx, err := kmod.NewIndex(o.ModulesDir)
		if err != nil {
			return nil, fmt.Errorf("initramfs: %w", err)
		}
		if mods, err = idx.Resolve(o.Modules); err != nil {
			return nil, fmt.Errorf("initramfs: %w", err)
		}
	}

	// Every file and its parent directories, written sorted so that each
	// directory precedes its contents.
	entries := map[string]*cpio.Entry{}
	addDir := func(p string) {
		for d := p; d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = &cpio.Entry{Name: d, Mode: cpio.Dir | 0o755}
			}
		}
	}
	addFile := func(p string, data []byte, perm uint32) {
		addDir(path.Dir(p))
		entries[p] = &cpio.Entry{Name: p, Mode: cpio.Reg | perm, Data: data}
	}
	for _, d := range baseDirs {
		addDir(d)
	}
	entries["/tmp"].Mode = cpio.Dir | 0o1777
	// The kernel opens /dev/console for init before anything is mounted.
	entries["/dev/console"] = &cpio.Entry{Name: "/dev/console", Mode: cpio.Char | 0o600, RdevMajor: 5, RdevMinor: 1}
	addFile("/init", o.Init, 0o755)
	addFile(initconfig.Path, cfg, 0o644)
	res := &Result{}
	var order strings.Builder
	release := path.Base(o.ModulesDir)
	for _, m := range mods {
		p := path.Join("/lib/modules", release, m.Rel)
		addFile(p, m.Image, 0o644)
		res.Modules = append(res.Modules, Module{Name: m.Name, Path: p})
		order.WriteString(p + "\n")
	}
	addFile(initconfig.ModulesPath, []byte(order.String()), 0o644)

	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	sort.Strings(names)
	cw := cpio.NewWriter(w)
	for _, p := range names {
		if err := cw.Add(entries[p]); err != nil {
			return nil, fmt.Errorf("initramfs: %w", err)
		}
	}
	if err := cw.Close(); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	return res, nil
}

// BuildBytes builds the archive in memory.
func BuildBytes(o Options) ([]byte, *Result, error) {
	var buf bytes.Buffer
	res, err := Build(&buf, o)
	if err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), res, nil
}
