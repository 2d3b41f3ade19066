package devspec

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/initconfig"
)

// MaxTagLen is the size of the virtio-fs config space tag field.
const MaxTagLen = 36

// FSSpec is a parsed --fs option string:
// path=DIR,tag=TAG[,readonly=on][,mount=GUESTDIR][,open-files=N].
type FSSpec struct {
	Path     string
	Tag      string
	ReadOnly bool
	// OpenFiles is the RLIMIT_NOFILE the sandbox gives the share's
	// plugin (open-files=); 0 means the kind's default,
	// sandbox.FSOpenFiles. The plugin keeps about a quarter of it for the
	// guest's open files and directories (devices/fs), so this bounds
	// how many the guest can hold open on the share at once. Without the
	// sandbox the plugin has krun-core's own limit.
	OpenFiles uint64
	// Mount is where `run --root` mounts the share in the guest (an
	// absolute, clean path other than /); "" means /mnt/TAG. Only a root
	// that krun-init enters honours it.
	Mount string
	// PluginOptions are passed to the fs-virtio plugin as they are; it
	// checks their values (see plugins/fs-virtio): uidmap, gidmap, cache,
	// xattr, workers, suid.
	PluginOptions map[string]string
}

// ParseFS parses an --fs option string.
func ParseFS(s string) (*FSSpec, error) {
	opts, err := splitOptions(s)
	if err != nil {
		return nil, err
	}
	f := &FSSpec{}
	seen := map[string]bool{}
	for _, o := range opts {
		if !o.hasValue {
			return nil, fmt.Errorf("%s is not key=value", printable(o.key))
		}
		if seen[o.key] {
			return nil, fmt.Errorf("%s given twice", printable(o.key+"="))
		}
		seen[o.key] = true
		switch o.key {
		case "path":
			if err := checkPath("path", o.value); err != nil {
				return nil, err
			}
			f.Path = o.value
		case "tag":
			if err := checkTag(o.value); err != nil {
				return nil, err
			}
			f.Tag = o.value
		case "readonly":
			if f.ReadOnly, err = parseOnOff(o.key, o.value); err != nil {
				return nil, err
			}
		case "mount":
			if err := checkMount(o.value); err != nil {
				return nil, err
			}
			f.Mount = path.Clean(o.value)
		case OptOpenFiles:
			if f.OpenFiles, err = ParseOpenFiles(o.value); err != nil {
				return nil, err
			}
		default:
			if !slices.Contains(devopts.FSOptionKeys, o.key) {
				return nil, fmt.Errorf("unknown key %s (want path, tag, readonly, mount, open-files, %s)", printable(o.key), strings.Join(devopts.FSOptionKeys, ", "))
			}
			if f.PluginOptions == nil {
				f.PluginOptions = map[string]string{}
			}
			f.PluginOptions[o.key] = o.value
		}
	}
	if f.Path == "" {
		return nil, fmt.Errorf("path= is required")
	}
	if f.Tag == "" {
		return nil, fmt.Errorf("tag= is required (the guest mounts the share by this tag)")
	}
	// The plugin parses these with the same function; a bad value is
	// refused here, before anything starts.
	if _, err := devopts.ParseFSOptions(f.PluginOptions); err != nil {
		return nil, err
	}
	return f, nil
}

// OptOpenFiles is the --fs key of FSSpec.OpenFiles.
const OptOpenFiles = "open-files"

// The range of open-files=: below MinFSOpenFiles the reserve the virtio-fs
// server keeps for the rest of the plugin (vhost-user memory regions,
// eventfds: about 600) would leave the guest a handful of files; above
// MaxFSOpenFiles is more than Linux's default fs.nr_open.
const (
	MinFSOpenFiles = 1024
	MaxFSOpenFiles = 1 << 20
)

// ParseOpenFiles parses an open-files= value.
func ParseOpenFiles(v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n < MinFSOpenFiles || n > MaxFSOpenFiles {
		return 0, fmt.Errorf("open-files=%s: want a number of files from %d to %d", printable(v), MinFSOpenFiles, MaxFSOpenFiles)
	}
	return n, nil
}

// checkMount checks a guest mount point: absolute, not the root, printable.
func checkMount(m string) error {
	if err := checkPath("mount", m); err != nil {
		return err
	}
	if !path.IsAbs(m) {
		return fmt.Errorf("mount=%s is not an absolute path in the guest", printable(m))
	}
	if path.Clean(m) == "/" {
		return fmt.Errorf("mount=%s is the guest's root (use run --root for that)", printable(m))
	}
	if initconfig.APIMountPoint(m) {
		return fmt.Errorf("mount=%s: /proc, /sys and /dev are the guest's own mounts of its kernel's interfaces", printable(m))
	}
	if len(m) > 4095 {
		return fmt.Errorf("mount= is longer than 4095 bytes")
	}
	if hasControl(m) {
		return fmt.Errorf("mount=%s contains a control or invalid character", printable(m))
	}
	return nil
}

// hasControl reports whether s has a control character or invalid UTF-8.
func hasControl(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == 0xfffd {
			return true
		}
	}
	return false
}

func checkTag(t string) error {
	switch {
	case t == "":
		return fmt.Errorf("tag= is empty")
	case len(t) > MaxTagLen:
		return fmt.Errorf("tag=%s is longer than %d bytes", printable(t), MaxTagLen)
	}
	if hasControl(t) {
		return fmt.Errorf("tag=%s contains a control or invalid character", printable(t))
	}
	return nil
}

// Kind is fs-virtio.
func (f *FSSpec) Kind() string { return devopts.KindFS }

// ReadOnlyDirs reports whether the directories spec s hands its plugin
// are to be read-only (a read-only share): the launcher's sandbox then
// enforces it below the plugin (sandbox.LaunchConfig.ReadOnlyDirs), so a
// compromised plugin cannot write there either.
func ReadOnlyDirs(s Spec) bool {
	f, ok := s.(*FSSpec)
	return ok && f.ReadOnly
}

// String renders f in --fs form.
func (f *FSSpec) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "path=%s,tag=%s", escape(f.Path), escape(f.Tag))
	if f.ReadOnly {
		b.WriteString(",readonly=on")
	}
	if f.Mount != "" {
		fmt.Fprintf(&b, ",mount=%s", escape(f.Mount))
	}
	if f.OpenFiles != 0 {
		fmt.Fprintf(&b, ",%s=%d", OptOpenFiles, f.OpenFiles)
	}
	keys := make([]string, 0, len(f.PluginOptions))
	for k := range f.PluginOptions {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, ",%s=%s", k, escape(f.PluginOptions[k]))
	}
	return b.String()
}
