package fs

import (
	"fmt"
	"strconv"
	"strings"
)

// IDMap maps a range of guest ids onto host ids, like one line of
// /proc/PID/uid_map: guest ids Guest..Guest+Count-1 are host ids
// Host..Host+Count-1.
type IDMap struct {
	Guest, Host, Count uint32
}

// OverflowID is what the guest sees for a host id that no map covers (the
// kernel's default overflowuid/overflowgid, "nobody").
const OverflowID = 65534

// idMapper translates ids in both directions. An empty mapper is the
// identity.
type idMapper []IDMap

func (m idMapper) toGuest(host uint32) uint32 {
	if len(m) == 0 {
		return host
	}
	for _, r := range m {
		if host >= r.Host && host-r.Host < r.Count {
			return r.Guest + (host - r.Host)
		}
	}
	return OverflowID
}

func (m idMapper) toHost(guest uint32) (uint32, bool) {
	if len(m) == 0 {
		return guest, true
	}
	for _, r := range m {
		if guest >= r.Guest && guest-r.Guest < r.Count {
			return r.Host + (guest - r.Guest), true
		}
	}
	return 0, false
}

// validateIDMaps checks that the ranges neither overflow nor overlap on
// either side.
func validateIDMaps(what string, ms []IDMap) error {
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
				return nil, fmt.Errorf("id map %q: %w", part, err)
			}
			v[i] = uint32(n)
		}
		out = append(out, IDMap{Guest: v[0], Host: v[1], Count: v[2]})
	}
	if err := validateIDMaps("id", out); err != nil {
		return nil, err
	}
	return out, nil
}
