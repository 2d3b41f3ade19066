package fs

import (
	"encoding/binary"
	"errors"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// acl builds a POSIX ACL xattr value (version 2) with the owner, group,
// mask and other entries and the named user and group entries given.
func acl(users, groups []uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	ent := func(tag, perm uint16, id uint32) {
		b = binary.LittleEndian.AppendUint16(b, tag)
		b = binary.LittleEndian.AppendUint16(b, perm)
		b = binary.LittleEndian.AppendUint32(b, id)
	}
	ent(0x01, 6, aclNoID)
	for _, u := range users {
		ent(0x02, 4, u)
	}
	ent(0x04, 4, aclNoID)
	for _, g := range groups {
		ent(0x08, 4, g)
	}
	ent(0x10, 4, aclNoID)
	ent(0x20, 4, aclNoID)
	return b
}

// aclNoID is the id of the entries that name nobody (owner, group, mask,
// other).
const aclNoID = 1<<32 - 1

// aclIDs returns the ids of the named user and group entries of an ACL.
func aclIDs(t *testing.T, b []byte) (users, groups []uint32) {
	t.Helper()
	if len(b) < 4 || (len(b)-4)%8 != 0 {
		t.Fatalf("ACL of %d bytes", len(b))
	}
	for e := b[4:]; len(e) > 0; e = e[8:] {
		switch binary.LittleEndian.Uint16(e) {
		case 0x02:
			users = append(users, binary.LittleEndian.Uint32(e[4:]))
		case 0x08:
			groups = append(groups, binary.LittleEndian.Uint32(e[4:]))
		}
	}
	return users, groups
}

// TestACLIDsMapped: the named user and group entries of a POSIX ACL
// (system.posix_acl_access and _default) are ids, and go through the
// share's uidmap and gidmap as the owner does. They were passed verbatim:
// a guest on a mapped share granted access to host ids its map does not
// cover (chown to them is EINVAL), and read host ids back as its own.
func TestACLIDsMapped(t *testing.T) {
	e := newEnv(t, 0, func(c *ServerConfig) {
		c.UIDMap = []IDMap{{Guest: 0, Host: uint32(os.Geteuid()), Count: 1}, {Guest: 1000, Host: 20000, Count: 10}}
		c.GIDMap = []IDMap{{Guest: 0, Host: uint32(os.Getegid()), Count: 1}, {Guest: 1000, Host: 30000, Count: 10}}
	})
	must(t, "write", os.WriteFile(e.path("f"), nil, 0o644))
	must(t, "mkdir", os.Mkdir(e.path("d"), 0o755))
	if err := unix.Setxattr(e.path("f"), "system.posix_acl_access", acl([]uint32{20001}, nil), 0); errors.Is(err, unix.EOPNOTSUPP) {
		t.Skip("no POSIX ACLs on the test directory's file system")
	}
	f := e.lookup(fuse.RootID, "f")
	d := e.lookup(fuse.RootID, "d")
	for _, tc := range []struct {
		node uint64
		path string
		name string
	}{{f.NodeID, "f", "system.posix_acl_access"}, {d.NodeID, "d", "system.posix_acl_default"}} {
		must(t, "SETXATTR "+tc.name, e.c.Setxattr(tc.node, tc.name, acl([]uint32{1003}, []uint32{1005, 0}), 0))
		host := make([]byte, 256)
		n, err := unix.Getxattr(e.path(tc.path), tc.name, host)
		must(t, "host getxattr", err)
		u, g := aclIDs(t, host[:n])
		if len(u) != 1 || u[0] != 20003 || len(g) != 2 || g[0] != 30005 || g[1] != uint32(os.Getegid()) {
			t.Fatalf("%s on the host names users %v and groups %v, want [20003] and [30005 %d]", tc.name, u, g, os.Getegid())
		}
		v, err := e.c.Getxattr(tc.node, tc.name, 256)
		must(t, "GETXATTR "+tc.name, err)
		if u, g := aclIDs(t, v); len(u) != 1 || u[0] != 1003 || len(g) != 2 || g[0] != 1005 || g[1] != 0 {
			t.Fatalf("GETXATTR %s names users %v and groups %v, want [1003] and [1005 0]", tc.name, u, g)
		}
		if out, err := e.c.Call(fuse.OpGetxattr, tc.node, 64, []byte{0, 0, 0, 0, 0, 0, 0, 0}, []byte(tc.name+"\x00")); err != nil || len(out) != fuse.GetxattrOutSize || binary.LittleEndian.Uint32(out) != uint32(len(v)) {
			t.Fatalf("GETXATTR %s of size 0: %x %v, want the length %d", tc.name, out, err, len(v))
		}
		// An id the map does not cover cannot be granted anything.
		err = e.c.Setxattr(tc.node, tc.name, acl([]uint32{1234}, nil), 0)
		wantErrno(t, "SETXATTR of an ACL naming an unmapped user", err, syscall.EINVAL)
		err = e.c.Setxattr(tc.node, tc.name, acl(nil, []uint32{4321}), 0)
		wantErrno(t, "SETXATTR of an ACL naming an unmapped group", err, syscall.EINVAL)
		err = e.c.Setxattr(tc.node, tc.name, []byte{2, 0, 0, 0, 1}, 0)
		wantErrno(t, "SETXATTR of a malformed ACL", err, syscall.EINVAL)
		n, err = unix.Getxattr(e.path(tc.path), tc.name, host)
		must(t, "host getxattr", err)
		if u, _ := aclIDs(t, host[:n]); len(u) != 1 || u[0] != 20003 {
			t.Fatalf("a refused SETXATTR changed the ACL: users %v", u)
		}
		// A host id outside the map reads as the overflow id.
		must(t, "host setxattr", unix.Setxattr(e.path(tc.path), tc.name, acl([]uint32{777}, []uint32{30009}), 0))
		v, err = e.c.Getxattr(tc.node, tc.name, 256)
		must(t, "GETXATTR "+tc.name, err)
		if u, g := aclIDs(t, v); len(u) != 1 || u[0] != OverflowID || len(g) != 1 || g[0] != 1009 {
			t.Fatalf("GETXATTR %s names users %v and groups %v, want [%d] and [1009]", tc.name, u, g, OverflowID)
		}
	}
	// Without maps the ids pass as they are.
	e2 := newEnv(t, 0, nil)
	must(t, "write", os.WriteFile(e2.path("f"), nil, 0o644))
	f2 := e2.lookup(fuse.RootID, "f")
	must(t, "SETXATTR", e2.c.Setxattr(f2.NodeID, "system.posix_acl_access", acl([]uint32{1234}, nil), 0))
	host := make([]byte, 256)
	n, err := unix.Getxattr(e2.path("f"), "system.posix_acl_access", host)
	must(t, "host getxattr", err)
	if u, _ := aclIDs(t, host[:n]); len(u) != 1 || u[0] != 1234 {
		t.Fatalf("identity share: users %v", u)
	}
}
