package qcow2

import (
	"sync"
	"sync/atomic"
)

// table is one cached cluster-sized metadata table (an L2 table or a
// refcount block). buf is only modified while the image's write lock is
// held; readers holding the read lock may use it freely.
type table struct {
	off   uint64
	buf   []byte
	dirty bool
	// lo, hi bound the bytes changed since the table was last written
	// (lo >= hi: none recorded, the whole table if dirty); fresh marks
	// a table that was never written at its place (a new L2 table).
	lo, hi uint64
	fresh  bool

	prev, next *table
}

// tableCache is a bounded LRU cache of tables keyed by host offset. Its own
// mutex protects the map and the list, so readers holding only the image's
// read lock can load tables concurrently. Dirty tables are never dropped by
// the cache itself: the image writes them back first (see Image.trimCaches).
type tableCache struct {
	mu   sync.Mutex
	m    map[uint64]*table
	head table // head.next is the most recently used, head.prev the least
	max  int
	// last is the most recently returned table: random I/O within one L2
	// table's reach finds it without taking mu. It is cleared whenever
	// that table leaves the cache.
	last atomic.Pointer[table]
}

func newTableCache(max int) *tableCache {
	if max < 4 {
		max = 4
	}
	c := &tableCache{m: make(map[uint64]*table), max: max}
	c.head.next = &c.head
	c.head.prev = &c.head
	return c
}

func (c *tableCache) unlink(t *table) {
	if c.last.Load() == t {
		c.last.Store(nil)
	}
	t.prev.next = t.next
	t.next.prev = t.prev
	t.prev, t.next = nil, nil
}

func (c *tableCache) pushFront(t *table) {
	t.next = c.head.next
	t.prev = &c.head
	c.head.next.prev = t
	c.head.next = t
}

// get returns the cached table at off, or nil.
func (c *tableCache) get(off uint64) *table {
	if t := c.last.Load(); t != nil && t.off == off {
		return t
	}
	c.mu.Lock()
	t := c.m[off]
	if t != nil {
		if c.head.next != t {
			c.unlink(t)
			c.pushFront(t)
		}
		c.last.Store(t)
	}
	c.mu.Unlock()
	return t
}

// add inserts t unless a table with the same offset is cached already, in
// which case that one is returned. Clean tables beyond the size bound are
// dropped, least recently used first.
func (c *tableCache) add(t *table) *table {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.m[t.off]; old != nil {
		return old
	}
	c.m[t.off] = t
	c.pushFront(t)
	for p := c.head.prev; len(c.m) > c.max && p != &c.head; {
		prev := p.prev
		if !p.dirty && p != t {
			c.unlink(p)
			delete(c.m, p.off)
		}
		p = prev
	}
	return t
}

// remove drops the table at off (dirty or not).
func (c *tableCache) remove(off uint64) {
	c.mu.Lock()
	if t := c.m[off]; t != nil {
		c.unlink(t)
		delete(c.m, off)
	}
	c.mu.Unlock()
}

// over returns dirty tables that keep the cache above its bound, least
// recently used first. The caller writes them back, marks them clean and
// calls add's trimming again through trim.
func (c *tableCache) over() []*table {
	c.mu.Lock()
	defer c.mu.Unlock()
	excess := len(c.m) - c.max
	var out []*table
	for p := c.head.prev; excess > 0 && p != &c.head; p = p.prev {
		if p.dirty {
			out = append(out, p)
		}
		excess--
	}
	return out
}

// trim drops clean tables beyond the bound.
func (c *tableCache) trim() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p := c.head.prev; len(c.m) > c.max && p != &c.head; {
		prev := p.prev
		if !p.dirty {
			c.unlink(p)
			delete(c.m, p.off)
		}
		p = prev
	}
}

// dirty returns all dirty tables.
func (c *tableCache) dirtyTables() []*table {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*table
	for _, t := range c.m {
		if t.dirty {
			out = append(out, t)
		}
	}
	return out
}

// clear drops everything.
func (c *tableCache) clear() {
	c.mu.Lock()
	c.last.Store(nil)
	c.m = make(map[uint64]*table)
	c.head.next = &c.head
	c.head.prev = &c.head
	c.mu.Unlock()
}

// touch records that bytes [lo, hi) of t changed.
func (t *table) touch(lo, hi uint64) {
	if !t.dirty || t.lo >= t.hi {
		t.lo, t.hi = lo, hi
	} else {
		t.lo, t.hi = min(t.lo, lo), max(t.hi, hi)
	}
	t.dirty = true
}

// written records that t is on the file as it is in memory.
func (t *table) written() {
	t.dirty, t.fresh = false, false
	t.lo, t.hi = 0, 0
}
