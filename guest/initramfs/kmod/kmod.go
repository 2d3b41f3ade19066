// Package kmod finds a kernel's modules for an initramfs: it indexes a
// module tree (lib/modules/<release>), resolves names to files with their
// dependencies from each module's .modinfo (Debian's packages carry no
// modules.dep: depmod runs at install time), decompresses .ko.xz, .ko.zst
// and .ko.gz in pure Go, and finds a kernel's release and module tree from
// its image.
package kmod

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Name normalises a module name the way the kernel does: '-' and '_'
// are the same character.
func Name(s string) string {
	return strings.ReplaceAll(s, "-", "_")
}

// exts are the file name endings of kernel modules, compressed or not.
var exts = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// TrimExt strips a module file ending (.ko, .ko.xz, .ko.zst, .ko.gz) and
// reports whether there was one.
func TrimExt(base string) (string, bool) {
	for _, ext := range exts {
		if name, ok := strings.CutSuffix(base, ext); ok {
			return name, true
		}
	}
	return "", false
}

// Index maps normalised module names of one kernel to their files. It is
// not safe for concurrent use (lookups fill it lazily).
type Index struct {
	dir     string            // lib/modules/<release>
	files   map[string]string // name -> path relative to dir, file seen
	ordered map[string]string // name -> path from modules.order, ending unchecked
	walked  bool              // files holds the whole kernel/ tree
	builtin map[string]bool   // names listed in modules.builtin
}

// NewIndex indexes a modules directory. The names come from modules.order
// when the tree has one (kbuild writes it; reading it is much faster than
// walking some 4000 files), with a walk of kernel/ as the fallback for a
// name it lacks. Debian's package carries no modules.dep (depmod runs at
// install time), so dependencies come from each module's .modinfo section.
func NewIndex(dir string) (*Index, error) {
	if st, err := os.Stat(filepath.Join(dir, "kernel")); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("index modules in %s: no kernel/ directory", dir)
	}
	idx := &Index{dir: dir, files: map[string]string{}, ordered: map[string]string{}, builtin: map[string]bool{}}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.order")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			rel := filepath.Clean(strings.TrimSpace(sc.Text()))
			name, ok := TrimExt(filepath.Base(rel))
			if !ok || filepath.IsAbs(rel) || strings.HasPrefix(rel, "..") {
				continue
			}
			idx.ordered[Name(name)] = strings.TrimSuffix(rel, filepath.Base(rel)) + name
		}
	} else if err := idx.walk(); err != nil {
		return nil, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if name, ok := TrimExt(filepath.Base(strings.TrimSpace(sc.Text()))); ok {
				idx.builtin[Name(name)] = true
			}
		}
	}
	return idx, nil
}

// walk indexes every module file under kernel/.
func (idx *Index) walk() error {
	idx.walked = true
	err := filepath.WalkDir(filepath.Join(idx.dir, "kernel"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		name, ok := TrimExt(d.Name())
		if !ok {
			return nil
		}
		rel, err := filepath.Rel(idx.dir, path)
		if err != nil {
			return err
		}
		idx.files[Name(name)] = rel
		return nil
	})
	if err != nil {
		return fmt.Errorf("index modules in %s: %w", idx.dir, err)
	}
	return nil
}

// lookup returns the file of module name (normalised), relative to the
// tree.
func (idx *Index) lookup(name string) (string, bool, error) {
	if rel, ok := idx.files[name]; ok {
		return rel, true, nil
	}
	if base, ok := idx.ordered[name]; ok {
		for _, ext := range exts {
			if st, err := os.Stat(filepath.Join(idx.dir, base+ext)); err == nil && st.Mode().IsRegular() {
				idx.files[name] = base + ext
				return base + ext, true, nil
			}
		}
	}
	if !idx.walked {
		if err := idx.walk(); err != nil {
			return "", false, err
		}
		rel, ok := idx.files[name]
		return rel, ok, nil
	}
	return "", false, nil
}

// MaxModuleSize bounds a module's uncompressed image.
const MaxModuleSize = 256 << 20

// ReadModule returns the uncompressed ELF image of a module file. Modules
// go into the initramfs uncompressed: busybox insmod cannot decompress, and
// finit_module's MODULE_INIT_COMPRESSED_FILE needs a kernel built with
// CONFIG_MODULE_DECOMPRESS (6.x with the matching algorithm), while the
// dependencies have to be read from the uncompressed .modinfo here anyway.
// xz is decoded in pure Go, so no xz tool is needed at run time.
func ReadModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read module: %w", err)
	}
	defer f.Close()
	var r io.Reader
	switch {
	case strings.HasSuffix(path, ".ko"):
		r = f
	case strings.HasSuffix(path, ".ko.zst"):
		dec, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxModuleSize))
		if err != nil {
			return nil, fmt.Errorf("zstd %s: %w", path, err)
		}
		defer dec.Close()
		r = dec
	case strings.HasSuffix(path, ".ko.gz"):
		zr, err := gzip.NewReader(bufio.NewReader(f))
		if err != nil {
			return nil, fmt.Errorf("gunzip %s: %w", path, err)
		}
		r = zr
	case strings.HasSuffix(path, ".ko.xz"):
		xr, err := xz.NewReader(bufio.NewReader(f))
		if err != nil {
			return nil, fmt.Errorf("xz %s: %w", path, err)
		}
		r = xr
	default:
		return nil, fmt.Errorf("%s: not a kernel module file", path)
	}
	out, err := io.ReadAll(io.LimitReader(r, MaxModuleSize+1))
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", path, err)
	}
	if len(out) > MaxModuleSize {
		return nil, fmt.Errorf("%s: module larger than %d bytes", path, MaxModuleSize)
	}
	return out, nil
}

// ModInfo is the parsed .modinfo section of a module.
type ModInfo struct {
	Name    string
	Depends []string // hard dependencies (depends=)
	SoftPre []string // softdep pre: names
}

// ParseModinfo extracts name, depends and softdep from a module's ELF image.
func ParseModinfo(image []byte) (*ModInfo, error) {
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("parse module ELF: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module has no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo: %w", err)
	}
	mi := &ModInfo{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			mi.Name = Name(v)
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.Depends = append(mi.Depends, Name(d))
				}
			}
		case "softdep":
			// "pre: a b post: c"
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						mi.SoftPre = append(mi.SoftPre, w)
					}
				}
			}
		}
	}
	return mi, nil
}

// Module is a module file to place into an initramfs.
type Module struct {
	Name  string
	Rel   string // path relative to the modules dir, without compression suffix
	Image []byte // uncompressed
	Deps  []string
}

// softdepCandidates maps a softdep name (often an alias such as
// "crypto-crc32c") to module names to try. Without modules.alias, aliases are
// resolved by convention: crypto-X is provided by X_generic or X.
func softdepCandidates(name string) []string {
	name = Name(name)
	if alg, ok := strings.CutPrefix(name, "crypto_"); ok {
		return []string{alg + "_generic", alg}
	}
	return []string{name}
}

// Resolve returns the named modules and their dependencies in load
// order (every module after its dependencies). Built-in modules are dropped.
// Soft pre-dependencies are added when they resolve to a module file.
func (idx *Index) Resolve(names []string) ([]Module, error) {
	var order []Module
	state := map[string]int{} // 0 new, 1 visiting, 2 done
	var visit func(name string, chain []string, soft bool) error
	visit = func(name string, chain []string, soft bool) error {
		name = Name(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		case 2:
			return nil
		}
		rel, ok, err := idx.lookup(name)
		if err != nil {
			return err
		}
		if !ok {
			if idx.builtin[name] {
				state[name] = 2
				return nil
			}
			if soft {
				return nil
			}
			if len(chain) > 0 {
				return fmt.Errorf("module %s (needed by %s) not found in %s", name, strings.Join(chain, " -> "), idx.dir)
			}
			return fmt.Errorf("module %s not found in %s (neither a module file nor built in)", name, idx.dir)
		}
		state[name] = 1
		image, err := ReadModule(filepath.Join(idx.dir, rel))
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		mi, err := ParseModinfo(image)
		if err != nil {
			return fmt.Errorf("module %s (%s): %w", name, rel, err)
		}
		next := append(append([]string(nil), chain...), name)
		for _, sd := range mi.SoftPre {
			for _, cand := range softdepCandidates(sd) {
				found, _, err := idx.lookup(Name(cand))
				if err != nil {
					return err
				}
				if found != "" || idx.builtin[Name(cand)] {
					if err := visit(cand, next, true); err != nil {
						return err
					}
					break
				}
			}
		}
		for _, dep := range mi.Depends {
			if err := visit(dep, next, false); err != nil {
				return err
			}
		}
		state[name] = 2
		plain, _ := TrimExt(rel)
		order = append(order, Module{Name: name, Rel: plain + ".ko", Image: image, Deps: mi.Depends})
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil, false); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// Dir returns the module tree the index was built from.
func (idx *Index) Dir() string { return idx.dir }
