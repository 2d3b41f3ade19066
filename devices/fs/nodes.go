package fs

import (
	"cmp"
	"maps"
	"math"
	"slices"
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

// maxAliases bounds the names remembered per node.
const maxAliases = 4

// What the table charges a node and each name it remembers against its
// memory budget (table.maxMem): at least the live heap they hold, the
// maps' entries included, a name counted at its longest (255 bytes) so
// that a charge never changes while it is held (TestNodeCharges measures
// both). A node with one short name costs about 320 bytes live; charged
// 671, it is still a sixth of the 4 KiB per node the limit assumed when
// every node was counted at its worst (four names of 255 bytes).
const (
	nodeCharge  = 256
	aliasCharge = 160 + 255
)

// What an open handle is charged against the same budget (handleCost):
// a file handle its struct and map entry, a directory handle the
// getdents64 buffer it keeps (dirBufSize) on top. Directory buffers were
// not counted: a guest that opened directories and read each partly
// pinned 16 KiB of heap per handle beyond the budget, up to MaxHandles
// (found in review, helper-141). TestHandleCharges measures both.
const (
	handleCharge    = 192
	dirHandleCharge = handleCharge + dirBufSize + 64
)

// handleCost is what a handle is charged: dir says it is a directory's.
func handleCost(dir bool) int64 {
	if dir {
		return dirHandleCharge
	}
	return handleCharge
}

// node is one inode the guest knows (or that something still pins).
//
// The guest's references are counted in lookups (LOOKUP, CREATE, MKNOD,
// MKDIR, SYMLINK, LINK and every READDIRPLUS entry add one; FORGET and
// BATCH_FORGET subtract). pins counts the server's own references: requests
// in flight, open handles, and the names of children (each alias pins its
// parent). The node leaves the table when both reach zero.
//
// A node remembers up to maxAliases names it was last seen under (parent
// node + component). The kernel offers no way to reopen an O_PATH fd for I/O
// without /proc/self/fd, so OPEN, truncate without a handle and the xattr
// calls reopen a regular file by one of these names below its parent's fd
// and check that the result is the same inode; directories reopen
// themselves with openat2(fd, ".").
//
// The names also let the table close the O_PATH fd of a node nobody is
// using when the process runs short of file descriptors (the sandbox gives
// plugins a small RLIMIT_NOFILE): such a node is reopened by name, below its
// parent (reopened the same way if need be), and checked to be the same
// inode before use. A node without a name (unlinked) is never closed.
type node struct {
	id  uint64
	fd  int // O_PATH, or -1 while closed
	key devIno
	typ uint32 // S_IFMT bits, fixed for an inode's life
	// born is the inode's birth time, taken when its fd is closed (the
	// budget) where the file system reports a stable one (bornOK;
	// stableBirth): an inode number freed and given to a new file of the
	// same type comes back with another birth time.
	born    unix.StatxTimestamp
	bornOK  bool
	lookups uint64
	pins    int64
	busy    int32 // requests using fd right now (a subset of pins)
	aliases []alias

	// LRU of open, idle nodes (most recently used at the front).
	prev, next *node
	inLRU      bool
	gone       bool // freed: out of the table, fd closed
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
	// writable: fd was opened for writing. WRITE, FALLOCATE and a
	// truncate through the handle check it before clearing set-id bits,
	// which a write-less fd could otherwise still do (fchmod needs only
	// ownership) ahead of the call that then fails.
	writable bool
	// readable: the guest opened it for reading. READ checks it: fd may
	// be a duplicate of another handle's read-write fd (dupHandleFd).
	readable bool
	// oflags are the guest's open flags (openFlags); fdStatus are the
	// O_APPEND, O_SYNC and O_DSYNC the fd itself has: those of oflags,
	// or, for a duplicate of another handle's fd (dupHandleFd), that
	// handle's, with which opWrite makes each write as oflags say.
	oflags, fdStatus int
	// appends: fd has O_APPEND, as the guest opened it. A WRITE from
	// the guest's page cache (fuse.WriteCache: mmap'd pages written back
	// through whichever writable handle the kernel picks) must still land
	// at its offset; see opWrite.
	appends bool

	// mu serializes directory reads on one handle (the stream position).
	mu sync.Mutex
}

// table holds the node and handle maps. One mutex guards all of it; the
// critical sections are map operations, never system calls that can block.
// The closes decided under it (an evicted or forgotten node's O_PATH fd, a
// released handle's fd) wait in closing until the unlock (unlock): the
// last close of an unlinked file frees its blocks, a close on NFS or a
// FUSE host file system flushes, and every other request would wait
// behind it.
type table struct {
	mu      sync.Mutex
	closing []int // fds to close once mu is released (closeLater)
	// closeFd closes the fds closeLater queued: unix.Close; tests make
	// one slow.
	closeFd func(fd int) error
	root    *node
	nodes   map[uint64]*node
	byKey   map[devIno]*node
	names   map[dirent]*node
	nextID  uint64
	handles map[uint64]*handle
	nextFh  uint64

	lru      node // sentinel of the idle-open list
	open     int  // nodes with an fd (root excluded)
	evicted  uint64
	maxNodes int // nodes in the table
	// mem is what the nodes, their names and the handles are charged
	// (nodeCharge, aliasCharge, handleCost); maxMem bounds it
	// (memBudgetFor).
	mem, maxMem int64
	maxOpen     int // O_PATH fds held at once (beyond it, idle ones are closed)
	maxHandles  int
	// reserved counts handle slots promised to requests in flight
	// (reserveHandle) that have not added their handle yet.
	reserved int
}

// closeLater closes fd once the table's lock is released (unlock). Called
// with t.mu held; fd must no longer be reachable from the table.
func (t *table) closeLater(fd int) { t.closing = append(t.closing, fd) }

// unlock releases t.mu, then closes what closeLater queued meanwhile.
func (t *table) unlock() {
	fds := t.closing
	t.closing = nil
	t.mu.Unlock()
	for _, fd := range fds {
		t.closeFd(fd)
	}
}

func newTable(rootFd int, st *unix.Stat_t, maxNodes, maxOpen, maxHandles int) *table {
	root := &node{id: fuse.RootID, fd: rootFd, key: devIno{st.Dev, st.Ino}, typ: st.Mode & unix.S_IFMT, pins: 1}
	t := &table{root: root, nextID: fuse.RootID + 1, nextFh: 1, maxNodes: maxNodes, maxOpen: maxOpen, maxHandles: maxHandles, maxMem: math.MaxInt64, closeFd: unix.Close}
	t.lru.next, t.lru.prev = &t.lru, &t.lru
	t.clearLocked()
	return t
}

func (t *table) clearLocked() {
	t.nodes = map[uint64]*node{fuse.RootID: t.root}
	t.byKey = map[devIno]*node{t.root.key: t.root}
	t.names = map[dirent]*node{}
	t.handles = map[uint64]*handle{}
}

func (t *table) lruRemoveLocked(n *node) {
	if !n.inLRU {
		return
	}
	n.prev.next, n.next.prev = n.next, n.prev
	n.prev, n.next, n.inLRU = nil, nil, false
}

// lruIdleLocked puts an open node nobody uses at the front of the LRU.
func (t *table) lruIdleLocked(n *node) {
	if n == t.root || n.fd < 0 || n.busy > 0 {
		return
	}
	t.lruRemoveLocked(n)
	n.next, n.prev = t.lru.next, &t.lru
	t.lru.next.prev = n
	t.lru.next = n
	n.inLRU = true
}

// evictLocked closes idle nodes' fds, least recently used first, while
// more than maxOpen are open. Nodes without a name stay open: they could
// not be found again.
func (t *table) evictLocked() {
	for n := t.lru.prev; t.open > t.maxOpen && n != &t.lru; {
		prev := n.prev
		if len(n.aliases) == 0 {
			// Cannot be found again once closed: keep it out of the way.
			t.lruRemoveLocked(n)
		} else if n.busy == 0 {
			t.lruRemoveLocked(n)
			n.born, n.bornOK = stableBirth(n.fd)
			t.closeLater(n.fd)
			n.fd = -1
			t.open--
			t.evicted++
		}
		n = prev
	}
}

// newNodeFitsLocked reports whether one more node, with a name, fits the
// node limit and the memory budget.
func (t *table) newNodeFitsLocked() bool {
	return len(t.nodes) < t.maxNodes && t.mem+nodeCharge+aliasCharge <= t.maxMem
}

// aliasFitsLocked reports whether one more remembered name fits the
// memory budget.
func (t *table) aliasFitsLocked() bool { return t.mem+aliasCharge <= t.maxMem }

// roomForNew reports ENFILE when a request that makes name in parent on
// the host (MKNOD, MKDIR, SYMLINK, CREATE) could not be given its node
// now: checked before the file is made, so that a refusal leaves nothing
// on the host. A name the table knows needs no new node (CREATE of an
// existing file). A concurrent request may still take the room first; the
// file is then made and refused, as before.
func (t *table) roomForNew(parent *node, name string) unix.Errno {
	t.mu.Lock()
	defer t.unlock()
	if t.names[dirent{parent.id, name}] != nil {
		return 0
	}
	if !t.newNodeFitsLocked() || !t.roomLocked() {
		return unix.ENFILE
	}
	return 0
}

// roomLocked makes room for one more node fd: idle nodes are closed
// beyond maxOpen (evictLocked). What cannot be closed (nodes a request is
// using, and nodes without a name: unlinked files the guest still holds)
// may go past maxOpen by an eighth, no further; a guest that unlinked
// files without forgetting them made the server hold one fd each, without
// bound, up to RLIMIT_NOFILE (found in review). Beyond it a new node is
// refused (ENFILE).
func (t *table) roomLocked() bool {
	t.evictLocked()
	return t.open < t.maxOpen+max(t.maxOpen/8, 1)
}

// setFdLocked gives closed node n the fd.
func (t *table) setFdLocked(n *node, fd int) {
	n.fd = fd
	t.open++
	t.evictLocked()
}

// get takes node id for the duration of a request: a pin, and its fd open.
func (t *table) get(id uint64) (*node, unix.Errno) {
	t.mu.Lock()
	n := t.nodes[id]
	if n == nil {
		t.unlock()
		return nil, unix.ESTALE
	}
	n.pins++
	t.unlock()
	if e := t.acquire(n); e != 0 {
		t.mu.Lock()
		n.pins--
		t.maybeFreeLocked(n)
		t.unlock()
		return nil, e
	}
	return n, 0
}

// maxReopenSteps bounds the nodes one reopen may visit while walking up
// closed ancestors (a bind-mount loop inside the share could otherwise make
// the names cyclic).
const maxReopenSteps = 4096

// acquire marks pinned node n busy with its fd open, reopening it by one of
// its names if it was closed. Release with release.
func (t *table) acquire(n *node) unix.Errno {
	budget := maxReopenSteps
	return t.acquireBudget(n, &budget)
}

func (t *table) acquireBudget(n *node, budget *int) unix.Errno {
	if *budget <= 0 {
		return unix.ELOOP
	}
	*budget--
	t.mu.Lock()
	if n.fd >= 0 {
		n.busy++
		t.lruRemoveLocked(n)
		t.unlock()
		return 0
	}
	// A reopen needs room like a new node: a guest that had its nodes
	// closed (LOOKUPs without FORGET) then unlinked each (the server
	// reopens the victim first) made every one an open node without a
	// name, past the cap (found in review, helper-85).
	if !t.roomLocked() {
		t.unlock()
		return unix.ENFILE
	}
	var buf [maxAliases]alias
	as := buf[:0]
	for _, a := range n.aliases {
		a.parent.pins++
		as = append(as, a)
	}
	born, bornOK := n.born, n.bornOK // evictLocked sets them under t.mu
	t.unlock()
	defer t.putAliases(as)
	last := unix.ESTALE
	for _, a := range as {
		if e := t.acquireBudget(a.parent, budget); e != 0 {
			if e != unix.ESTALE {
				last = e
			}
			continue
		}
		fd, err := openPath(a.parent.fd, a.name)
		t.release(a.parent)
		if err != nil {
			// Only an answer that says the name no longer leads to a
			// file forgets it. A refusal that may pass (a parent made
			// unsearchable for a moment, the process out of fds) keeps
			// the name: forgetting it would lose the node for good,
			// and leave its inode unprotected.
			switch e := errno(err); e {
			case unix.ENOENT, unix.ELOOP, unix.ENOTDIR:
				t.dropName(a.parent.id, a.name)
			default:
				last = e
			}
			continue
		}
		var st unix.Stat_t
		if statFd(fd, &st) != nil || st.Dev != n.key.dev || st.Ino != n.key.ino || st.Mode&unix.S_IFMT != n.typ || !sameBirth(born, bornOK, fd) {
			// Another file under the name, or the inode number given
			// to a new file after the host removed ours.
			unix.Close(fd)
			t.dropName(a.parent.id, a.name)
			continue
		}
		t.mu.Lock()
		if n.fd >= 0 {
			t.closeLater(fd) // reopened meanwhile by another request
		} else {
			t.setFdLocked(n, fd)
		}
		n.busy++
		t.lruRemoveLocked(n)
		t.unlock()
		return 0
	}
	return last
}

// birth returns the birth time of the inode behind fd, and false where
// the file system keeps none (or statx fails).
func birth(fd int) (unix.StatxTimestamp, bool) {
	var stx unix.Statx_t
	err := unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_DONT_SYNC, unix.STATX_BTIME, &stx)
	if err != nil || stx.Mask&unix.STATX_BTIME == 0 {
		return unix.StatxTimestamp{}, false
	}
	return stx.Btime, true
}

// stableBirth is birth, for a node whose fd is being closed: false too
// where the birth time is not the inode's for life. Overlayfs keeps a
// file's device and inode number when it copies the file up (a write
// below a directory copies the directory), but then reports the upper
// inode's birth time: an unchanged directory would no longer match (found
// in review).
func stableBirth(fd int) (unix.StatxTimestamp, bool) {
	var sfs unix.Statfs_t
	if unix.Fstatfs(fd, &sfs) != nil || sfs.Type == unix.OVERLAYFS_SUPER_MAGIC {
		return unix.StatxTimestamp{}, false
	}
	return birth(fd)
}

// sameBirth reports whether fd, found under closed node n's (dev, ino)
// and type, can be n's inode (t.mu held): true unless n's birth time is known and
// fd's differs. Without birth times (a file system that keeps none) an
// inode number reused for a file of the same type cannot be told apart.
func (n *node) sameBirth(fd int) bool { return sameBirth(n.born, n.bornOK, fd) }

// sameBirth is node.sameBirth for a birth time born (known: bornOK) read
// under the table's lock.
func sameBirth(born unix.StatxTimestamp, bornOK bool, fd int) bool {
	if !bornOK {
		return true
	}
	b, ok := birth(fd)
	return ok && b == born
}

// release ends a request's use of n's fd (acquire).
func (t *table) release(n *node) {
	t.mu.Lock()
	n.busy--
	if n.busy == 0 {
		t.lruIdleLocked(n)
		t.evictLocked()
	}
	t.unlock()
}

// put ends a request's use of a node taken with get.
func (t *table) put(n *node) {
	if n == nil {
		return
	}
	t.mu.Lock()
	n.busy--
	n.pins--
	if n.busy == 0 {
		t.lruIdleLocked(n)
	}
	t.maybeFreeLocked(n)
	t.evictLocked()
	t.unlock()
}

// count returns how many nodes and handles are live (tests, stats).
// handleUse reports the handles open, and whether they (with those
// promised to requests in flight) are at MaxHandles.
func (t *table) handleUse() (open int, atLimit bool) {
	t.mu.Lock()
	defer t.unlock()
	return len(t.handles), len(t.handles)+t.reserved >= t.maxHandles
}

func (t *table) count() (nodes, handles int) {
	t.mu.Lock()
	defer t.unlock()
	return len(t.nodes), len(t.handles)
}

// insert records that the guest now holds one more reference to the inode
// behind fd, found as name in parent. fd is consumed: it becomes the node's
// fd or is closed when the inode already has a node.
func (t *table) insert(parent *node, name string, fd int, st *unix.Stat_t) (*node, unix.Errno) {
	return t.insertNode(parent, name, fd, st, false)
}

// insertHeld is insert, with the node also taken for the request as get
// takes it (pinned, its fd open and busy) in the same critical section: a
// FORGET or the fd budget cannot free it or close its fd before the
// request is done with it. Release with put.
func (t *table) insertHeld(parent *node, name string, fd int, st *unix.Stat_t) (*node, unix.Errno) {
	return t.insertNode(parent, name, fd, st, true)
}

func (t *table) insertNode(parent *node, name string, fd int, st *unix.Stat_t, hold bool) (*node, unix.Errno) {
	key := devIno{st.Dev, st.Ino}
	typ := st.Mode & unix.S_IFMT
	t.mu.Lock()
	defer t.unlock()
	if n := t.byKey[key]; n != nil && n.fd < 0 && (len(n.aliases) == 0 || n.typ != typ || !n.sameBirth(fd)) {
		// A closed node holds nothing that keeps its inode alive: with
		// no name left, another file type or another birth time, the
		// inode number was freed and given to a new file. That file
		// gets a node of its own; the old node id stays, stale
		// (ESTALE), until forgotten.
		delete(t.byKey, key)
	}
	n := t.byKey[key]
	if (n == nil || n.fd < 0) && !t.roomLocked() {
		t.closeLater(fd)
		return nil, unix.ENFILE
	}
	switch {
	case n != nil:
		if n.fd < 0 {
			t.setFdLocked(n, fd)
			t.lruIdleLocked(n)
		} else {
			t.closeLater(fd)
		}
		n.lookups++
		if len(n.aliases) > 0 || t.aliasFitsLocked() {
			// A node without a name (its names were unlinked) gets
			// one back only within the budget; without one it stays
			// open and reachable by its id, within the fd budget.
			t.setAliasLocked(n, parent, name)
		}
	case !t.newNodeFitsLocked():
		t.closeLater(fd)
		return nil, unix.ENFILE
	default:
		n = &node{id: t.nextID, fd: -1, key: key, typ: typ, lookups: 1}
		t.mem += nodeCharge
		t.nextID++
		t.nodes[n.id] = n
		t.byKey[key] = n
		t.setAliasLocked(n, parent, name)
		t.setFdLocked(n, fd)
		t.lruIdleLocked(n)
	}
	if hold {
		n.pins++
		n.busy++
		t.lruRemoveLocked(n)
	}
	return n, 0
}

// forget drops nlookup guest references from node id. Unknown ids and the
// root are ignored (FORGET has no reply to carry an error).
func (t *table) forget(id, nlookup uint64) {
	t.mu.Lock()
	defer t.unlock()
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
		if n == t.root || n.lookups > 0 || n.pins > 0 || n.gone {
			continue
		}
		n.gone = true
		t.mem -= nodeCharge
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
		t.mem -= aliasCharge * int64(len(n.aliases))
		n.aliases = nil
		t.lruRemoveLocked(n)
		if n.fd >= 0 {
			t.closeLater(n.fd)
			n.fd = -1
			t.open--
		}
	}
}

// setAliasLocked remembers that non-directory n is called name in parent.
func (t *table) setAliasLocked(n, parent *node, name string) {
	if parent == nil {
		return
	}
	k := dirent{parent.id, name}
	if old := t.names[k]; old != nil {
		if old == n {
			return
		}
		t.removeAliasLocked(old, k)
	}
	if len(n.aliases) == maxAliases || len(n.aliases) > 0 && !t.aliasFitsLocked() {
		// At most maxAliases names, and no more names at all while the
		// budget is spent: the oldest makes way.
		last := n.aliases[len(n.aliases)-1]
		t.removeAliasLocked(n, dirent{last.parent.id, last.name})
	}
	n.aliases = append(n.aliases, alias{})
	copy(n.aliases[1:], n.aliases)
	n.aliases[0] = alias{parent: parent, name: name}
	t.mem += aliasCharge
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
			t.mem -= aliasCharge
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
	defer t.unlock()
	k := dirent{parent, name}
	if n := t.names[k]; n != nil {
		t.removeAliasLocked(n, k)
	}
}

// renamed updates the names after a successful rename of oldName in
// oldParent to newName in newParent.
func (t *table) renamed(oldParent *node, oldName string, newParent *node, newName string, exchange bool) {
	t.mu.Lock()
	defer t.unlock()
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
	defer t.unlock()
	for _, a := range n.aliases {
		a.parent.pins++
		dst = append(dst, a)
	}
	return dst
}

func (t *table) putAliases(as []alias) {
	t.mu.Lock()
	defer t.unlock()
	for _, a := range as {
		a.parent.pins--
		t.maybeFreeLocked(a.parent)
	}
}

// known returns the node already known as name in parent when it is still
// inode ino on parent's device, with one more guest reference and a pin.
func (t *table) known(parent *node, name string, ino uint64) *node {
	t.mu.Lock()
	defer t.unlock()
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
	t.mu.Lock()
	n.pins--
	t.maybeFreeLocked(n)
	t.unlock()
}

// getName takes the node known as name in parent, if any, like get: kept
// open while a request unlinks or renames over the name, so that it stays
// reachable through its fd once the name is gone. A node that cannot be
// reopened for want of a descriptor (ENFILE at the fd budget's cap,
// EMFILE) is that error, and the caller must not remove the name: the
// node, closed and without it, could never be reopened, and every later
// request by its id, for a file the guest may still have open, would be
// ESTALE (found in review, helper-141). Any other failure (the name leads
// to another file by now) is no node and no error.
func (t *table) getName(parent uint64, name string) (*node, unix.Errno) {
	t.mu.Lock()
	n := t.names[dirent{parent, name}]
	if n == nil {
		t.unlock()
		return nil, 0
	}
	n.pins++
	t.unlock()
	if e := t.acquire(n); e != 0 {
		t.mu.Lock()
		n.pins--
		t.maybeFreeLocked(n)
		t.unlock()
		if e == unix.ENFILE || e == unix.EMFILE {
			return nil, e
		}
		return nil, 0
	}
	return n, 0
}

// forgetPinned undoes known.
func (t *table) forgetPinned(n *node) {
	t.mu.Lock()
	defer t.unlock()
	if n.lookups > 0 {
		n.lookups--
	}
	n.pins--
	t.maybeFreeLocked(n)
}

// reserveHandle promises the request one handle slot, a directory's
// (dir) or a file's, and its charge against the memory budget, or
// answers ENFILE at MaxHandles or with the budget spent. OPEN, CREATE and
// OPENDIR reserve before they touch the host: an OPEN with O_TRUNC
// truncated the file and then found no room for its handle, so the
// guest's open failed and its file was emptied all the same (found in
// review). The slot is taken by addHandle or given back with
// cancelHandle.
func (t *table) reserveHandle(dir bool) unix.Errno {
	t.mu.Lock()
	defer t.unlock()
	if len(t.handles)+t.reserved >= t.maxHandles || t.mem+handleCost(dir) > t.maxMem {
		return unix.ENFILE
	}
	t.reserved++
	t.mem += handleCost(dir)
	return 0
}

// cancelHandle gives back a slot reserveHandle(dir) promised and that
// will not be used.
func (t *table) cancelHandle(dir bool) {
	t.mu.Lock()
	t.reserved--
	t.mem -= handleCost(dir)
	t.unlock()
}

// addHandle registers an open fd for node n (which it pins) in the slot
// reserveHandle promised (a directory's when dir is not nil); oflags are
// the guest's open flags, fdStatus fd's own status flags (handle.fdStatus).
func (t *table) addHandle(fd int, n *node, dir *dirStream, oflags, fdStatus int) uint64 {
	t.mu.Lock()
	defer t.unlock()
	t.reserved--
	h := &handle{id: t.nextFh, fd: fd, node: n, refs: 1, dir: dir, oflags: oflags, fdStatus: fdStatus,
		writable: oflags&unix.O_ACCMODE != unix.O_RDONLY, readable: oflags&unix.O_ACCMODE != unix.O_WRONLY,
		appends: oflags&unix.O_APPEND != 0}
	t.nextFh++
	n.pins++
	t.handles[h.id] = h
	return h.id
}

// getHandle takes a reference to handle fh for one request.
func (t *table) getHandle(fh uint64) (*handle, unix.Errno) {
	t.mu.Lock()
	defer t.unlock()
	h := t.handles[fh]
	if h == nil {
		return nil, unix.EBADF
	}
	h.refs++
	return h, 0
}

// anyHandle takes a reference to an open handle of regular file n, or
// returns nil when the guest holds none. It walks every handle (at most
// MaxHandles): only a file that can no longer be reopened by name gets here.
func (t *table) anyHandle(n *node) *handle {
	t.mu.Lock()
	defer t.unlock()
	for _, h := range t.handles {
		if h.node == n && h.dir == nil && h.fd >= 0 {
			h.refs++
			return h
		}
	}
	return nil
}

// statusFlags are the open flags that change how writes land; they are
// the open file description's, so a duplicated fd shares them.
const statusFlags = unix.O_APPEND | unix.O_SYNC | unix.O_DSYNC

// dupHandleFd returns a duplicate of the fd of one of the guest's open
// handles of regular file n that serves an open with flags (openFlags),
// and that fd's status flags (handle.fdStatus): a read-write handle or one
// of the same access mode. For an open that writes, not one whose fd has
// O_APPEND where flags have none (every write would need RWF_NOAPPEND,
// Linux 6.9), unless only a truncation is to be made through it
// (truncate); an O_APPEND, O_SYNC or O_DSYNC the fd lacks is given to
// each write instead (opWrite). ESTALE when there is none. It opens a
// file that has no name left to reopen it by (unlinked while the guest
// holds it open), as a guest's open of /proc/self/fd/N asks: the new
// handle's access is what the guest asked for, whatever the duplicate's
// (handle.writable, handle.readable).
func (t *table) dupHandleFd(n *node, flags int, truncate bool) (int, int, unix.Errno) {
	acc := flags & unix.O_ACCMODE
	t.mu.Lock()
	var h *handle
	for _, c := range t.handles {
		if c.node != n || c.dir != nil || c.fd < 0 {
			continue
		}
		if cacc := c.oflags & unix.O_ACCMODE; cacc != unix.O_RDWR && cacc != acc {
			continue
		}
		if acc != unix.O_RDONLY && !truncate && c.fdStatus&unix.O_APPEND != 0 && flags&unix.O_APPEND == 0 {
			continue
		}
		h = c
		h.refs++
		break
	}
	t.mu.Unlock()
	if h == nil {
		return -1, 0, unix.ESTALE
	}
	defer t.putHandle(h)
	fd, err := unix.FcntlInt(uintptr(h.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, 0, errno(err)
	}
	return fd, h.fdStatus, 0
}

// putHandle drops a reference; the last one closes the fd.
func (t *table) putHandle(h *handle) {
	t.mu.Lock()
	defer t.unlock()
	t.putHandleLocked(h)
}

func (t *table) putHandleLocked(h *handle) {
	h.refs--
	if h.refs > 0 {
		return
	}
	t.closeLater(h.fd)
	h.fd = -1
	t.mem -= handleCost(h.dir != nil) // charged at reserveHandle
	h.node.pins--
	t.maybeFreeLocked(h.node)
}

// releaseHandle removes handle fh (RELEASE, RELEASEDIR).
func (t *table) releaseHandle(fh uint64) unix.Errno {
	t.mu.Lock()
	defer t.unlock()
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
	defer t.unlock()
	// Work in id order: the same session always tears down the same way.
	handles := slices.SortedFunc(maps.Values(t.handles), func(a, b *handle) int { return cmp.Compare(a.id, b.id) })
	nodes := slices.SortedFunc(maps.Values(t.nodes), func(a, b *node) int { return cmp.Compare(a.id, b.id) })
	t.clearLocked()
	for _, h := range handles {
		t.putHandleLocked(h)
	}
	var parents []*node
	for _, n := range nodes {
		if n == t.root {
			continue
		}
		for _, a := range n.aliases {
			a.parent.pins--
			parents = append(parents, a.parent)
		}
		t.mem -= aliasCharge * int64(len(n.aliases))
		n.aliases = nil
		n.lookups = 0
	}
	for _, n := range nodes {
		t.maybeFreeLocked(n)
	}
	// A parent may have left the table at an earlier reset while a request
	// held it, then been pinned by a name that request added: its last pin
	// was just dropped here, and nothing else would ever free it (found in
	// review: one directory fd leaked per INIT during a LOOKUP).
	for _, p := range parents {
		t.maybeFreeLocked(p)
	}
}

// stats reports open O_PATH fds and how many were closed for lack of fds.
func (t *table) fdStats() (open int, evicted uint64) {
	t.mu.Lock()
	defer t.unlock()
	return t.open, t.evicted
}
