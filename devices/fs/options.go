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
)

// OptionKeys lists the options ParseOptions understands.
var OptionKeys = []string{OptUIDMap, OptGIDMap, OptCache, OptXattr, OptWorkers}

// Options are the parsed tuning options of a shared directory.
type Options struct {
	UIDMap, GIDMap []IDMap
	// Timeout is the entry and attribute timeout; 0 means the server's
	// default, negative means none (cache=0).
	Timeout time.Duration
	NoXattr bool
	Workers int // 0: the device's default
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
	if v, ok := opts[OptXattr]; ok {
		switch v {
		case "on":
		case "off":
			o.NoXattr = true
		default:
			return o, fmt.Errorf("option %s=%q: want on or off", OptXattr, v)
		}
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
