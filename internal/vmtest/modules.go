package vmtest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// moduleName normalises a module name the way the kernel does: '-' and '_'
// are the same character.
func moduleName(s string) string {
	return strings.ReplaceAll(s, "-", "_")
}

// moduleExts are the file name endings of kernel modules, compressed or not.
var moduleExts = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

func trimModuleExt(base string) (string, bool) {
	for _, ext := range moduleExts {
		if name, ok := strings.CutSuffix(base, ext); ok {
			return name, true
		}
	}
	return "", false
}

// moduleIndex maps normalised module names of one kernel to their files.
type moduleIndex struct {
	dir     string            // lib/modules/<release>
	files   map[string]string // name -> path relative to dir
	builtin map[string]bool   // names listed in modules.builtin
}

// indexModules walks a modules directory. Debian's package carries no
// modules.dep (depmod runs at install time), so dependencies come from each
// module's .modinfo section instead.
func indexModules(dir string) (*moduleIndex, error) {
	idx := &moduleIndex{dir: dir, files: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		name, ok := trimModuleExt(d.Name())
		if !ok {
			return nil
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		idx.files[moduleName(name)] = rel
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules in %s: %w", dir, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if name, ok := trimModuleExt(filepath.Base(strings.TrimSpace(sc.Text()))); ok {
				idx.builtin[moduleName(name)] = true
			}
		}
	}
	return idx, nil
}

// readModule returns the uncompressed ELF image of a module file. busybox
// insmod cannot decompress, so compressed modules are expanded here.
func readModule(ctx context.Context, path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read module: %w", err)
	}
	switch {
	case strings.HasSuffix(path, ".ko"):
		return raw, nil
	case strings.HasSuffix(path, ".ko.zst"):
		dec, err := zstd.NewReader(bytes.NewReader(raw), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("zstd %s: %w", path, err)
		}
		defer dec.Close()
		out, err := io.ReadAll(dec)
		if err != nil {
			return nil, fmt.Errorf("zstd %s: %w", path, err)
		}
		return out, nil
	case strings.HasSuffix(path, ".ko.gz"):
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("gunzip %s: %w", path, err)
		}
		out, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("gunzip %s: %w", path, err)
		}
		return out, nil
	case strings.HasSuffix(path, ".ko.xz"):
		// xz is not in the standard library; the xz tool is part of every
		// Debian base system.
		cmd := exec.CommandContext(ctx, "xz", "-dc")
		cmd.Stdin = bytes.NewReader(raw)
		var out, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("xz -dc %s (is xz-utils installed?): %w: %s", path, err, strings.TrimSpace(stderr.String()))
		}
		return out.Bytes(), nil
	}
	return nil, fmt.Errorf("%s: not a kernel module file", path)
}

// modInfo is the parsed .modinfo section of a module.
type modInfo struct {
	Name    string
	Depends []string // hard dependencies (depends=)
	SoftPre []string // softdep pre: names
}

// parseModinfo extracts name, depends and softdep from a module's ELF image.
func parseModinfo(image []byte) (*modInfo, error) {
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
	mi := &modInfo{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			mi.Name = moduleName(v)
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.Depends = append(mi.Depends, moduleName(d))
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

// resolvedModule is a module file to place into an initramfs.
type resolvedModule struct {
	Name  string
	Rel   string // path relative to the modules dir, without compression suffix
	Image []byte // uncompressed
	Deps  []string
}

// softdepCandidates maps a softdep name (often an alias such as
// "crypto-crc32c") to module names to try. Without modules.alias, aliases are
// resolved by convention: crypto-X is provided by X_generic or X.
func softdepCandidates(name string) []string {
	name = moduleName(name)
	if alg, ok := strings.CutPrefix(name, "crypto_"); ok {
		return []string{alg + "_generic", alg}
	}
	return []string{name}
}

// resolveModules returns the named modules and their dependencies in load
// order (every module after its dependencies). Built-in modules are dropped.
// Soft pre-dependencies are added when they resolve to a module file.
func resolveModules(ctx context.Context, idx *moduleIndex, names []string) ([]resolvedModule, error) {
	var order []resolvedModule
	state := map[string]int{} // 0 new, 1 visiting, 2 done
	var visit func(name string, chain []string, soft bool) error
	visit = func(name string, chain []string, soft bool) error {
		name = moduleName(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		case 2:
			return nil
		}
		rel, ok := idx.files[name]
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
		image, err := readModule(ctx, filepath.Join(idx.dir, rel))
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		mi, err := parseModinfo(image)
		if err != nil {
			return fmt.Errorf("module %s (%s): %w", name, rel, err)
		}
		next := append(append([]string(nil), chain...), name)
		for _, sd := range mi.SoftPre {
			for _, cand := range softdepCandidates(sd) {
				if _, ok := idx.files[moduleName(cand)]; ok || idx.builtin[moduleName(cand)] {
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
		plain, _ := trimModuleExt(rel)
		order = append(order, resolvedModule{Name: name, Rel: plain + ".ko", Image: image, Deps: mi.Depends})
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil, false); err != nil {
			return nil, err
		}
	}
	return order, nil
}
