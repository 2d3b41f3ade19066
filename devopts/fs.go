package devopts

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Names of the file and options an fs-virtio plugin is configured with
// (besides OptReadOnly).
const (
	FileDir = "dir" // the shared directory, O_RDONLY|O_DIRECTORY
	OptTag  = "tag" // the virtio-fs mount tag
)

// Tuning options of the fs-virtio plugin, which the user passes through
// --fs. The host (core/devspec) checks them with ParseFSOptions before it
// starts anything; the plugin parses them again with the same function.
const (
	OptUIDMap  = "uidmap"  // G:H:N[/G:H:N...]: guest<->host uid ranges
	OptGIDMap  = "gidmap"  // the same for gids
	OptCache   = "cache"   // entry and attribute timeout in seconds, 0..3600
	OptXattr   = "xattr"   // on|off
	OptWorkers = "workers" // requests served at once per request queue, 1..256
	OptSuid    = "suid"    // on|off (default off): let the guest set S_ISUID/S_ISGID
)

// FSOptionKeys lists the options ParseFSOptions understands.
var FSOptionKeys = []string{OptUIDMap, OptGIDMap, OptCache, OptXattr, OptWorkers, OptSuid}

// FSOptions are the parsed tuning options of a shared directory.
type FSOptions struct {
	UIDMap, GIDMap []IDMap
	// Timeout is the entry and attribute timeout; 0 means the server's
	// default, negative means none (cache=0).
	Timeout time.Duration
	NoXattr bool
	Workers int // 0: the device's default
	// AllowSetID (suid=on) lets the guest set the set-user-ID and
	// set-group-ID bits on host files (devices/fs ServerConfig.AllowSetID).
	AllowSetID bool
}

// ParseFSOptions parses the options in FSOptionKeys; other keys are
// ignored.
func ParseFSOptions(opts map[string]string) (FSOptions, error) {
	var o FSOptions
	var err error
	for _, k := range []string{OptUIDMap, OptGIDMap} {
		if v, ok := opts[k]; ok && v == "" {
			return o, fmt.Errorf("option %s= is empty: want GUEST:HOST:COUNT[/...], or leave it out for the identity", k)
		}
	}
	if o.UIDMap, err = ParseIDMaps(opts[OptUIDMap]); err != nil {
		return o, fmt.Errorf("option %s: %w", OptUIDMap, err)
	}
	if o.GIDMap, err = ParseIDMaps(opts[OptGIDMap]); err != nil {
		return o, fmt.Errorf("option %s: %w", OptGIDMap, err)
	}
	if v, ok := opts[OptCache]; ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n > 3600 {
			return o, fmt.Errorf("option %s=%q: want seconds from 0 to 3600", OptCache, v)
		}
		o.Timeout = time.Duration(n) * time.Second
		if n == 0 {
			o.Timeout = -1
		}
	}
	xattr, err := OnOff(opts, OptXattr, true)
	if err != nil {
		return o, err
	}
	o.NoXattr = !xattr
	if o.AllowSetID, err = OnOff(opts, OptSuid, false); err != nil {
		return o, err
	}
	if v, ok := opts[OptWorkers]; ok {
		n, ok := Decimal(v)
		if !ok || n < 1 || n > 256 {
			return o, fmt.Errorf("option %s=%q: want 1..256", OptWorkers, v)
		}
		o.Workers = n
	}
	return o, nil
}

// OnOff parses an on|off option, def when absent.
func OnOff(opts map[string]string, key string, def bool) (bool, error) {
	v, ok := opts[key]
	if !ok {
		return def, nil
	}
	b, err := ParseOnOff(key, v)
	if err != nil {
		return false, fmt.Errorf("option %w", err)
	}
	return b, nil
}

// ParseOnOff parses a switch's value, one rule for every key, host and
// plugin alike: on or off (readonly= took yes and true where xattr= and
// suid= did not; found in review, helper-89).
func ParseOnOff(key, v string) (bool, error) {
	switch v {
	case "on":
		return true, nil
	case "off":
		return false, nil
	}
	return false, fmt.Errorf("%s=%q: want on or off", key, v)
}

// Decimal parses a non-negative decimal number, digits only: no sign, no
// 0x, no underscores (strconv.Atoi takes +4, and flag.Int 010 as 8).
func Decimal(s string) (int, bool) {
	n, err := strconv.ParseUint(s, 10, 31) // base 10: no sign, 0x or _
	return int(n), err == nil
}

// IDMap maps a range of guest ids onto host ids, like one line of
// /proc/PID/uid_map: guest ids Guest..Guest+Count-1 are host ids
// Host..Host+Count-1.
type IDMap struct {
	Guest, Host, Count uint32
}

// ValidateIDMaps checks that the ranges neither overflow nor overlap on
// either side; what ("uid", "gid") names them in the error.
func ValidateIDMaps(what string, ms []IDMap) error {
	for i, a := range ms {
		if a.Count == 0 {
			return fmt.Errorf("%s map %d: count is 0", what, i)
		}
		if uint64(a.Guest)+uint64(a.Count) > 1<<32 || uint64(a.Host)+uint64(a.Count) > 1<<32 {
			return fmt.Errorf("%s map %d: range overflows 32 bits", what, i)
		}
		for j := 0; j < i; j++ {
			b := ms[j]
			if a.Guest < b.Guest+b.Count && b.Guest < a.Guest+a.Count {
				return fmt.Errorf("%s maps %d and %d overlap on the guest side", what, j, i)
			}
			if a.Host < b.Host+b.Count && b.Host < a.Host+a.Count {
				return fmt.Errorf("%s maps %d and %d overlap on the host side", what, j, i)
			}
		}
	}
	return nil
}

// ParseIDMaps parses "GUEST:HOST:COUNT[/GUEST:HOST:COUNT...]", for example
// "0:1000:1" (guest root is the host user 1000, every other host id shows
// as 65534).
func ParseIDMaps(s string) ([]IDMap, error) {
	if s == "" {
		return nil, nil
	}
	var out []IDMap
	for _, part := range strings.Split(s, "/") {
		f := strings.Split(part, ":")
		if len(f) != 3 {
			return nil, fmt.Errorf("id map %q is not GUEST:HOST:COUNT", part)
		}
		var v [3]uint32
		for i, x := range f {
			n, err := strconv.ParseUint(x, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("id map %q: %q is not a decimal number from 0 to 4294967295", part, x)
			}
			v[i] = uint32(n)
		}
		out = append(out, IDMap{Guest: v[0], Host: v[1], Count: v[2]})
	}
	if err := ValidateIDMaps("id", out); err != nil {
		return nil, err
	}
	return out, nil
}

// FormatIDMaps renders id maps as the uidmap/gidmap options take them.
func FormatIDMaps(ms []IDMap) string {
	s := make([]string, len(ms))
	for i, m := range ms {
		s[i] = fmt.Sprintf("%d:%d:%d", m.Guest, m.Host, m.Count)
	}
	return strings.Join(s, "/")
}
