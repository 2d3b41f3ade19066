// Package devspec parses and validates the --disk, --fs and --net option
// strings shared by `krun-core run` and `krun-core serve`, and opens the
// files they name so that a sandboxed plugin, which opens no paths, can be
// handed them as inherited fds.
//
// Option strings are comma-separated key=value lists in QEMU style; ",,"
// stands for a literal comma inside a value. Every problem is reported as an
// error whose message is a single line naming the offending key or value.
//
// Disk formats always come from the user (format= is required; backing files
// need backing-format=): nothing here looks at an image's content.
//
// The plugin kinds and the names of the files and options a plugin is
// configured with are in devopts, which the plugins use too.
package devspec

import (
	"errors"
	"fmt"
	"strings"

	"github.com/krun-core/krun-core/devopts"
)

// Spec is a parsed, validated device option string.
type Spec interface {
	// Kind is the plugin kind that serves the device.
	Kind() string
	// String renders the spec back in option-string form.
	String() string
	// Open opens the files (and helper processes) the device needs and
	// returns what the plugin is configured with.
	Open(o OpenOptions) (*Opened, error)
}

// Parse parses the value of --disk, --fs, --net, --plugin or --vhost-user;
// flag is "disk", "fs", "net", "plugin" or "vhost-user" (leading dashes are
// ignored).
func Parse(flag, value string) (Spec, error) {
	switch strings.TrimLeft(flag, "-") {
	case "disk":
		return ParseDisk(value)
	case "fs":
		return ParseFS(value)
	case "net":
		return ParseNet(value)
	case "plugin":
		return ParsePlugin(value)
	case "vhost-user":
		return ParseVhostUser(value)
	}
	return nil, fmt.Errorf("unknown device flag %q (want --disk, --fs, --net, --plugin or --vhost-user)", flag)
}

// maxOptions bounds how many options one string may carry.
const maxOptions = 64

// option is one key=value item; bare items (no '=') have hasValue false.
type option struct {
	key, value string
	hasValue   bool
}

// splitOptions splits s at single commas; ",," is a literal comma.
func splitOptions(s string) ([]option, error) {
	if s == "" {
		return nil, errors.New("empty option string")
	}
	var items []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != ',' {
			cur.WriteByte(s[i])
			continue
		}
		if i+1 < len(s) && s[i+1] == ',' {
			cur.WriteByte(',')
			i++
			continue
		}
		items = append(items, cur.String())
		cur.Reset()
		if len(items) > maxOptions {
			return nil, fmt.Errorf("more than %d options", maxOptions)
		}
	}
	items = append(items, cur.String())
	if len(items) > maxOptions {
		return nil, fmt.Errorf("more than %d options", maxOptions)
	}
	opts := make([]option, 0, len(items))
	for i, it := range items {
		if it == "" {
			return nil, fmt.Errorf("empty option at position %d", i+1)
		}
		k, v, ok := strings.Cut(it, "=")
		if ok && k == "" {
			return nil, fmt.Errorf("option %q has no key", it)
		}
		opts = append(opts, option{key: k, value: v, hasValue: ok})
	}
	return opts, nil
}

// parseOnOff parses a switch's value: on or off (devopts.ParseOnOff, as
// the plugins read theirs).
func parseOnOff(key, v string) (bool, error) { return devopts.ParseOnOff(key, v) }

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// escape renders a value for an option string (commas doubled).
func escape(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// checkPath rejects path values that cannot name a file.
func checkPath(key, v string) error {
	if v == "" {
		return fmt.Errorf("%s= is empty", key)
	}
	if strings.IndexByte(v, 0) >= 0 {
		return fmt.Errorf("%s= contains a NUL byte", key)
	}
	return nil
}

// printable makes a value safe to echo inside a one-line error.
func printable(v string) string {
	const max = 64
	if len(v) > max {
		v = v[:max] + "..."
	}
	return fmt.Sprintf("%q", v)
}
