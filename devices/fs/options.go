package fs

import (
	"fmt"
	"strconv"
	"time"
)

// Option names the fs-virtio plugin takes besides tag and readonly; the
// launcher (core/devspec) checks them with ParseOptions before it starts
// anything, the plugin parses them again with the same function.
const (
	OptUIDMap  = "uidmap"  // G:H:N[/G:H:N...]: guest<->host uid ranges
	OptGIDMap  = "gidmap"  // the same for gids
	OptCache   = "cache"   // entry and attribute timeout in seconds, 0..3600
	OptXattr   = "xattr"   // on|off
	OptWorkers = "workers" // requests served at once per request queue, 1..256
	OptSuid    = "suid"    // on|off (default off): let the guest set S_ISUID/S_ISGID
)

// OptionKeys lists the options ParseOptions understands.
var OptionKeys = []string{OptUIDMap, OptGIDMap, OptCache, OptXattr, OptWorkers, OptSuid}

// Options are the parsed tuning options of a shared directory.
type Options struct {
	UIDMap, GIDMap []IDMap
	// Timeout is the entry and attribute timeout; 0 means the server's
	// default, negative means none (cache=0).
	Timeout time.Duration
	NoXattr bool
	Workers int // 0: the device's default
	// AllowSetID (suid=on) lets the guest set the set-user-ID and
	// set-group-ID bits on host files; see ServerConfig.AllowSetID.
	AllowSetID bool
}

// ParseOptions parses the options in OptionKeys; other keys are ignored.
func ParseOptions(opts map[string]string) (Options, error) {
	var o Options
	var err error
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
	xattr, err := onOff(opts, OptXattr, true)
	if err != nil {
		return o, err
	}
	o.NoXattr = !xattr
	if o.AllowSetID, err = onOff(opts, OptSuid, false); err != nil {
		return o, err
	}
	if v, ok := opts[OptWorkers]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 256 {
			return o, fmt.Errorf("option %s=%q: want 1..256", OptWorkers, v)
		}
		o.Workers = n
	}
	return o, nil
}

// onOff parses an on|off option, def when absent.
func onOff(opts map[string]string, key string, def bool) (bool, error) {
	v, ok := opts[key]
	if !ok {
		return def, nil
	}
	switch v {
	case "on":
		return true, nil
	case "off":
		return false, nil
	}
	return def, fmt.Errorf("option %s=%q: want on or off", key, v)
}
