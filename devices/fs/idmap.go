package fs

import (
	"encoding/binary"

	"github.com/krun-core/krun-core/devopts"
)

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

// POSIX ACLs travel as the xattrs system.posix_acl_access and
// system.posix_acl_default: a version word, then entries of a tag, the
// permissions and an id (linux/posix_acl_xattr.h). The ids of the named
// user (ACL_USER) and group (ACL_GROUP) entries are mapped like owners.
const (
	aclVersion   = 2
	aclHeader    = 4
	aclEntrySize = 8
	aclUser      = 0x02
	aclGroup     = 0x08
)

// mapsIDs reports whether the share maps ids (a uidmap or gidmap).
func (s *Server) mapsIDs() bool { return len(s.uids) > 0 || len(s.gids) > 0 }

func isACLXattr(name string) bool {
	return name == "system.posix_acl_access" || name == "system.posix_acl_default"
}

// mapACL rewrites in place the ids of the named user and group entries of
// ACL xattr value v: guest ids to host ids (toHost), or host ids to the
// guest's, where an id outside the maps shows as OverflowID. It reports
// false for a value that is not an ACL, or (toHost) one that names an id
// outside the maps: such an id could not be chowned to either.
func mapACL(uids, gids idMapper, v []byte, toHost bool) bool {
	if len(v) < aclHeader || (len(v)-aclHeader)%aclEntrySize != 0 || binary.LittleEndian.Uint32(v) != aclVersion {
		return false
	}
	for e := v[aclHeader:]; len(e) > 0; e = e[aclEntrySize:] {
		m := uids
		switch binary.LittleEndian.Uint16(e) {
		case aclUser:
		case aclGroup:
			m = gids
		default:
			continue
		}
		id := binary.LittleEndian.Uint32(e[4:])
		if toHost {
			h, ok := m.toHost(id)
			if !ok {
				return false
			}
			id = h
		} else {
			id = m.toGuest(id)
		}
		binary.LittleEndian.PutUint32(e[4:], id)
	}
	return true
}
