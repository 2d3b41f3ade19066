package fs

import (
	"sync"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// devIno identifies a host inode; nodes are deduplicated by it so that hard
// links share one node id. While the server holds a node's O_PATH fd the
// inode cannot be freed, so its (dev, ino) cannot be reused.
type devIno struct{ dev, ino uint64 }

// dirent names one directory entry: a parent node id and a component.
type dirent struct {
	parent uint64
	name   string
}

// maxAliases bounds the names remembered per non-directory node.
const maxAliases = 4

// node is one inode the guest knows (or that something still pins).
//
// The guest's references are counted in lookups (LOOKUP, CREATE, MKNOD,
// MKDIR, SYMLINK, LINK and every READDIRPLUS entry add one; FORGET and
// BATCH_FORGET subtract). pins counts the server's own references: requests
// in flight, open handles, and aliases of children. The O_PATH fd is closed
// when both reach zero.
//
// A non-directory also remembers up to maxAliases names it was last seen
// under (parent node + component). The kernel offers no way to reopen an
// O_PATH fd for I/O without /proc/self/fd, so OPEN, truncate without a
// handle and the xattr calls reopen the file by one of these names below
// its parent's fd and check that the result is the same inode. Directories
// reopen themselves with openat2(fd, ".").
type node struct {
	id      uint64
	fd      int
	key     devIno
	typ     uint32 // S_IFMT bits, fixed for an inode's life
	lookups uint64
	pins    int64
	aliases []alias
}

type alias struct {
	parent *node
	name   string
}

func (n *node) isDir() bool { return n.typ == unix.S_IFDIR }

// handle is an open file or directory (the fh of OPEN/CREATE/OPENDIR).
type handle struct {
	id   uint64
	fd   int
	node *node
	refs int32 // the table's own reference while open + requests in flight
	dir  *dirStream

	// mu serializes directory reads on one handle (the stream position).
	mu sync.Mutex
}

// table holds the node and handle maps. One mutex guards all of it; the
// critical sections are map operations, never system calls that can block
// (close of an O_PATH fd and of a handle's fd excepted).
type table struct {
	mu      sync.Mutex
	root    *node
	nodes   map[uint64]*node
	byKey   map[devIno]*node
	names   map[dirent]*node
	nextID  uint64
	handles map[uint64]*handle
	nextFh  uint64

	maxNodes, maxHandles int
}

func newTable(rootFd int, st *unix.Stat_t, maxNodes, maxHandles int) *table {
	root := &node{id: fuse.RootID, fd: rootFd, key: devIno{st.Dev, st.Ino}, typ: st.Mode & unix.S_IFMT, pins: 1}
	t := &table{root: root, nextID: fuse.RootID + 1, nextFh: 1, maxNodes: maxNodes, maxHandles: maxHandles}
	t.clearLocked()
	return t
}

func (t *table) clearLocked() {
	t.nodes = map[uint64]*node{fuse.RootID: t.root}
	t.byKey = map[devIno]*node{t.root.key: t.root}
	t.names = map[dirent]*node{}
	t.handles = map[uint64]*handle{}
}

// get pins the node with the given id for the duration of a request.
func (t *table) get(id uint64) (*node, unix.Errno) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.nodes[id]
	if n == nil {
		return nil, unix.ESTALE
	}
	n.pins++
	return n, 0
}

// put releases a pin taken by get.
func (t *table) put(n *node) {
	if n == nil {
		return
	}
	t.mu.Lock()
	n.pins--
	t.maybeFreeLocked(n)
	t.mu.Unlock()
}

// count returns how many nodes and handles are live (tests, stats).
func (t *table) count() (nodes, handles int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.nodes), len(t.handles)
}

// insert records that the guest now holds one more reference to the inode
// behind fd, found as name in parent. fd is consumed: it becomes the node's
// fd or is closed when the inode already has a node.
func (t *table) insert(parent *node, name string, fd int, st *unix.Stat_t) (*node, unix.Errno) {
	key := devIno{st.Dev, st.Ino}
	t.mu.Lock()
	defer t.mu.Unlock()
	if n := t.byKey[key]; n != nil {
		unix.Close(fd)
		n.lookups++
		t.setAliasLocked(n, parent, name)
		return n, 0
	}
	if len(t.nodes) >= t.maxNodes {
		unix.Close(fd)
		return nil, unix.ENFILE
	}
	n := &node{id: t.nextID, fd: fd, key: key, typ: st.Mode & unix.S_IFMT, lookups: 1}
	t.nextID++
	t.nodes[n.id] = n
	t.byKey[key] = n
	t.setAliasLocked(n, parent, name)
	return n, 0
}

// forget drops nlookup guest references from node id. Unknown ids and the
// root are ignored (FORGET has no reply to carry an error).
func (t *table) forget(id, nlookup uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.nodes[id]
	if n == nil || n == t.root {
		return
	}
	if nlookup >= n.lookups {
		n.lookups = 0
	} else {
		n.lookups -= nlookup
	}
	t.maybeFreeLocked(n)
}

// maybeFreeLocked closes n when nothing references it any more, releasing
// the parents its aliases pinned (iteratively: deep trees must not recurse).
func (t *table) maybeFreeLocked(n *node) {
	work := []*node{n}
	for len(work) > 0 {
		n := work[len(work)-1]
		work = work[:len(work)-1]
		if n == t.root || n.lookups > 0 || n.pins > 0 || n.fd < 0 {
			continue
		}
		if t.nodes[n.id] == n {
			delete(t.nodes, n.id)
		}
		if t.byKey[n.key] == n {
			delete(t.byKey, n.key)
		}
		for _, a := range n.aliases {
			k := dirent{a.parent.id, a.name}
			if t.names[k] == n {
				delete(t.names, k)
			}
			a.parent.pins--
			work = append(work, a.parent)
		}
		n.aliases = nil
		unix.Close(n.fd)
		n.fd = -1
	}
}

// setAliasLocked remembers that non-directory n is called name in parent.
func (t *table) setAliasLocked(n, parent *node, name string) {
	if n.isDir() || parent == nil {
		return
	}
	k := dirent{parent.id, name}
	if old := t.names[k]; old != nil {
		if old == n {
			return
		}
		t.removeAliasLocked(old, k)
	}
	if len(n.aliases) == maxAliases {
		last := n.aliases[len(n.aliases)-1]
		t.removeAliasLocked(n, dirent{last.parent.id, last.name})
	}
	n.aliases = append(n.aliases, alias{})
	copy(n.aliases[1:], n.aliases)
	n.aliases[0] = alias{parent: parent, name: name}
	parent.pins++
	t.names[k] = n
}

// removeAliasLocked forgets name k of node n.
func (t *table) removeAliasLocked(n *node, k dirent) {
	if t.names[k] == n {
		delete(t.names, k)
	}
	for i, a := range n.aliases {
		if a.parent.id == k.parent && a.name == k.name {
			n.aliases = append(n.aliases[:i], n.aliases[i+1:]...)
			a.parent.pins--
			t.maybeFreeLocked(a.parent)
			return
		}
	}
}

// dropName forgets whatever node was known as name in parent (after
// UNLINK, RMDIR, or a failed reopen through that name).
func (t *table) dropName(parent uint64, name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := dirent{parent, name}
	if n := t.names[k]; n != nil {
		t.removeAliasLocked(n, k)
	}
}

// renamed updates the names after a successful rename of oldName in
// oldParent to newName in newParent.
func (t *table) renamed(oldParent *node, oldName string, newParent *node, newName string, exchange bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ok, nk := dirent{oldParent.id, oldName}, dirent{newParent.id, newName}
	src, dst := t.names[ok], t.names[nk]
	if src != nil {
		t.removeAliasLocked(src, ok)
	}
	if dst != nil {
		t.removeAliasLocked(dst, nk)
	}
	if src != nil {
		t.setAliasLocked(src, newParent, newName)
	}
	if exchange && dst != nil {
		t.setAliasLocked(dst, oldParent, oldName)
	}
}

// aliases returns a snapshot of n's names with their parents pinned; the
// caller releases them with putAliases.
func (t *table) aliases(n *node, dst []alias) []alias {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, a := range n.aliases {
		a.parent.pins++
		dst = append(dst, a)
	}
	return dst
}

func (t *table) putAliases(as []alias) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, a := range as {
		a.parent.pins--
		t.maybeFreeLocked(a.parent)
	}
}

// known returns the node already known as name in parent when it is still
// inode ino on parent's device, with one more guest reference and a pin.
func (t *table) known(parent *node, name string, ino uint64) *node {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.names[dirent{parent.id, name}]
	if n == nil || n.key.ino != ino || n.key.dev != parent.key.dev {
		return nil
	}
	n.lookups++
	n.pins++
	return n
}

// unpinRef drops the pin known took, keeping the guest reference.
func (t *table) unpinRef(n *node) {
	t.put(n)
}

// forgetPinned undoes known.
func (t *table) forgetPinned(n *node) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if n.lookups > 0 {
		n.lookups--
	}
	n.pins--
	t.maybeFreeLocked(n)
}

// addHandle registers an open fd for node n (which it pins).
func (t *table) addHandle(fd int, n *node, dir *dirStream) (uint64, unix.Errno) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.handles) >= t.maxHandles {
		return 0, unix.ENFILE
	}
	h := &handle{id: t.nextFh, fd: fd, node: n, refs: 1, dir: dir}
	t.nextFh++
	n.pins++
	t.handles[h.id] = h
	return h.id, 0
}

// getHandle takes a reference to handle fh for one request.
func (t *table) getHandle(fh uint64) (*handle, unix.Errno) {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.handles[fh]
	if h == nil {
		return nil, unix.EBADF
	}
	h.refs++
	return h, 0
}

// putHandle drops a reference; the last one closes the fd.
func (t *table) putHandle(h *handle) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.putHandleLocked(h)
}

func (t *table) putHandleLocked(h *handle) {
	h.refs--
	if h.refs > 0 {
		return
	}
	unix.Close(h.fd)
	h.fd = -1
	h.node.pins--
	t.maybeFreeLocked(h.node)
}

// release removes handle fh (RELEASE, RELEASEDIR).
func (t *table) release(fh uint64) unix.Errno {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.handles[fh]
	if h == nil {
		return unix.EBADF
	}
	delete(t.handles, fh)
	t.putHandleLocked(h)
	return 0
}

// reset forgets every node but the root and closes every handle, as after
// DESTROY or a device reset. Nodes and handles still used by a request in
// flight are closed when that request lets go of them.
func (t *table) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	handles := t.handles
	nodes := t.nodes
	t.clearLocked()
	for _, h := range handles {
		t.putHandleLocked(h)
	}
	for _, n := range nodes {
		if n == t.root {
			continue
		}
		for _, a := range n.aliases {
			a.parent.pins--
		}
		n.aliases = nil
		n.lookups = 0
	}
	for _, n := range nodes {
		t.maybeFreeLocked(n)
	}
}
