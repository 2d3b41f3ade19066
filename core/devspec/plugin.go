package devspec

import (
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// PluginSpec is a parsed --plugin option string for a third-party plugin:
//
//	KIND[,key=value...][,file.NAME=PATH...][,file-rw.NAME=PATH...]
//
// The options go to the plugin unchanged (it validates them). The files
// are the user's to give: krun-core opens each PATH (read-only, or
// read-write for file-rw; never created) and the plugin receives it as
// file NAME; it opens nothing itself.
type PluginSpec struct {
	PluginKind string
	Options    map[string]string
	Files      []PluginFile
}

// PluginFile is a file the user hands a third-party plugin.
type PluginFile struct {
	Name  string // as the plugin sees it (Configure's files)
	Path  string
	Write bool // opened O_RDWR (file-rw.NAME), else O_RDONLY
}

// Prefixes of the --plugin keys that name files.
const (
	pluginFileKey   = "file."
	pluginFileRWKey = "file-rw."
)

// MaxPluginFiles bounds the files one --plugin names.
const MaxPluginFiles = 16

// pluginFileTypes are what a plugin may be handed: a regular file, a block
// or a character device (a hardware random source, a serial line). A
// directory is not: the plugin's sandbox gives it no access below one.
var pluginFileTypes = []uint32{unix.S_IFREG, unix.S_IFBLK, unix.S_IFCHR}

const pluginFileWant = "a regular file or device"

// ImageToolKind is the kind of krun-plugin-img, which serves `krun-core
// img` over a protocol of its own: never a device.
const ImageToolKind = "img"

// ParsePlugin parses a --plugin option string.
func ParsePlugin(s string) (*PluginSpec, error) {
	opts, err := splitOptions(s)
	if err != nil {
		return nil, err
	}
	if opts[0].hasValue {
		return nil, fmt.Errorf("the first item must be the plugin kind, not %s", printable(opts[0].key+"="+opts[0].value))
	}
	kind := opts[0].key
	if !validKind(kind) {
		return nil, fmt.Errorf("plugin kind %s: want 1-64 characters of a-z, 0-9 and '-'", printable(kind))
	}
	if kind == ImageToolKind {
		return nil, fmt.Errorf("plugin kind %s: krun-plugin-img is krun-core img's image tool, not a device", kind)
	}
	p := &PluginSpec{PluginKind: kind, Options: map[string]string{}}
	for _, o := range opts[1:] {
		if !o.hasValue {
			return nil, fmt.Errorf("%s is not key=value", printable(o.key))
		}
		if f, ok, err := pluginFile(o.key, o.value); ok || err != nil {
			if err != nil {
				return nil, err
			}
			if slices.ContainsFunc(p.Files, func(g PluginFile) bool { return g.Name == f.Name }) {
				return nil, fmt.Errorf("file %s given twice", f.Name)
			}
			if len(p.Files) == MaxPluginFiles {
				return nil, fmt.Errorf("more than %d files", MaxPluginFiles)
			}
			p.Files = append(p.Files, f)
			continue
		}
		if _, dup := p.Options[o.key]; dup {
			return nil, fmt.Errorf("%s given twice", printable(o.key+"="))
		}
		p.Options[o.key] = o.value
	}
	return p, nil
}

// pluginFile parses a file.NAME=PATH or file-rw.NAME=PATH item; ok is
// false for any other key.
func pluginFile(key, value string) (f PluginFile, ok bool, err error) {
	name, found := strings.CutPrefix(key, pluginFileKey)
	if !found {
		if name, found = strings.CutPrefix(key, pluginFileRWKey); !found {
			return f, false, nil
		}
		f.Write = true
	}
	if !validFileName(name) {
		return f, true, fmt.Errorf("%s: the file's name after the dot: want 1-64 characters of a-z, 0-9, '-', '_' and '.'", printable(key+"="))
	}
	if value == "" {
		return f, true, fmt.Errorf("%s: no path", printable(key+"="))
	}
	f.Name, f.Path = name, value
	return f, true, nil
}

func validFileName(n string) bool {
	if n == "" || len(n) > 64 {
		return false
	}
	for _, c := range []byte(n) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

func validKind(k string) bool {
	if k == "" || len(k) > 64 || k[0] == '-' {
		return false
	}
	for _, c := range []byte(k) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Kind is the plugin kind given.
func (p *PluginSpec) Kind() string { return p.PluginKind }

// String renders p in --plugin form (options sorted).
func (p *PluginSpec) String() string {
	keys := make([]string, 0, len(p.Options))
	for k := range p.Options {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(p.PluginKind)
	for _, k := range keys {
		fmt.Fprintf(&b, ",%s=%s", escape(k), escape(p.Options[k]))
	}
	for _, f := range p.Files {
		key := pluginFileKey
		if f.Write {
			key = pluginFileRWKey
		}
		fmt.Fprintf(&b, ",%s%s=%s", key, f.Name, escape(f.Path))
	}
	return b.String()
}

// open opens f as Open does.
func (f PluginFile) open() (*os.File, error) {
	flags := unix.O_RDONLY
	if f.Write {
		flags = unix.O_RDWR
	}
	return openAs("file "+f.Name, f.Path, flags, pluginFileWant, pluginFileTypes...)
}

// Open opens the files the user named (read-only, or read-write for
// file-rw; a regular file or a device, never created) and returns them
// with the options.
func (p *PluginSpec) Open(OpenOptions) (_ *Opened, err error) {
	opts := make(map[string]string, len(p.Options))
	for k, v := range p.Options {
		opts[k] = v
	}
	o := &Opened{Kind: p.PluginKind, Options: opts}
	defer func() {
		if err != nil {
			o.Close()
		}
	}()
	for _, f := range p.Files {
		fh, err := f.open()
		if err != nil {
			return nil, err
		}
		o.add(f.Name, fh)
	}
	return o, nil
}

// Check checks the files as Open does and closes them; a character device
// is only looked at (stat), since opening one can act (a serial line's
// modem lines, a watchdog that arms on open).
func (p *PluginSpec) Check() error {
	for _, f := range p.Files {
		var st unix.Stat_t
		if err := unix.Stat(f.Path, &st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR {
			if err := refuseHostMemory("file "+f.Name, f.Path, &st); err != nil {
				return err
			}
			if err := unix.Access(f.Path, accessMode(f.Write)); err != nil {
				return fmt.Errorf("file %s: %w", f.Name, &os.PathError{Op: "open", Path: f.Path, Err: err})
			}
			continue
		}
		fh, err := f.open()
		if err != nil {
			return err
		}
		fh.Close()
	}
	return nil
}

func accessMode(write bool) uint32 {
	if write {
		return unix.R_OK | unix.W_OK
	}
	return unix.R_OK
}
