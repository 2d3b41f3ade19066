package devspec

import (
	"fmt"
	"sort"
	"strings"
)

// PluginSpec is a parsed --plugin option string for a third-party plugin:
//
//	KIND[,key=value...]
//
// The options go to the plugin unchanged (it validates them); no files are
// opened, so such a plugin gets only its vhost-user socket.
type PluginSpec struct {
	PluginKind string
	Options    map[string]string
}

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
		if _, dup := p.Options[o.key]; dup {
			return nil, fmt.Errorf("%s given twice", printable(o.key+"="))
		}
		p.Options[o.key] = o.value
	}
	return p, nil
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
	return b.String()
}

// Open opens nothing: it returns the options.
func (p *PluginSpec) Open(OpenOptions) (*Opened, error) {
	opts := make(map[string]string, len(p.Options))
	for k, v := range p.Options {
		opts[k] = v
	}
	return &Opened{Kind: p.PluginKind, Options: opts}, nil
}
