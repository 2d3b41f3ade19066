package fs

import "github.com/krun-core/krun-core/devopts"

// IDMap maps a range of guest ids onto host ids (devopts.IDMap: the
// uidmap/gidmap options are parsed there, by host and plugin alike).
type IDMap = devopts.IDMap

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
