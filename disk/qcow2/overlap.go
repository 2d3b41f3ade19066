package qcow2

import (
	"fmt"
	"slices"
	"sort"
)

// metaKind says what metadata a host cluster holds.
type metaKind uint16

const (
	metaHeader metaKind = 1 << iota
	metaL1
	metaL2
	metaRefTable
	metaRefBlock
	metaSnapTable
	metaSnapL1
	metaSnapL2
	metaBitmapDir
	metaCrypto
)

func (k metaKind) String() string {
	names := []string{"header", "active L1 table", "active L2 table", "refcount table", "refcount block",
		"snapshot table", "snapshot L1 table", "inactive L2 table", "bitmap directory", "encryption header"}
	s := ""
	for i, n := range names {
		if k&(1<<i) != 0 {
			if s != "" {
				s += "+"
			}
			s += n
		}
	}
	if s == "" {
		return "data"
	}
	return s
}

type metaRange struct {
	start, end uint64 // clusters, end exclusive
	kind       metaKind
}

// metaMap records where the image's metadata lives so that no write lands
// on metadata it was not meant for. Contiguous structures (the header, L1
// and refcount tables, snapshot L1 tables, the snapshot table, ...) are
// ranges, each distinct range kept once however often it is added (65,536
// snapshots may share one 32 MiB L1 table); single-cluster tables (L2
// tables, refcount blocks) are kept per cluster.
//
// Lookups go through segs, the ranges flattened into sorted, disjoint
// segments, so that at is a binary search whatever the number of ranges.
// segs is rebuilt whenever the ranges change: once at open (put, then
// build), and at each later addRange or removeRange, which are rare
// (refcount table moves).
type metaMap struct {
	ranges map[metaRange]int // distinct ranges and how often each was added
	segs   []metaRange       // ranges flattened: sorted, disjoint, kinds merged
	m      map[uint64]metaKind
	// l2 are the active L2 tables Open found (clusters, sorted, unique):
	// 8 bytes each where the map takes several times that, for an L1
	// table of up to 4 Mi entries. Tables added later go to m. l2gone
	// marks those freed or moved since (a bit per entry): a deletion
	// from the slice would copy it, on every copy-on-write of a shared
	// table, under the image's lock.
	l2     []uint64
	l2gone []uint64
	// work counts the operations spent building the map: a range or
	// cluster added, a range visited by build. Tests bound it.
	work uint64
}

func newMetaMap() *metaMap {
	return &metaMap{ranges: make(map[metaRange]int), m: make(map[uint64]metaKind)}
}

// put adds a range without rebuilding the lookup segments; call build
// once after a batch of puts.
func (mm *metaMap) put(start, n uint64, k metaKind) {
	mm.work++
	if n == 0 || start+n < start {
		return
	}
	mm.ranges[metaRange{start, start + n, k}]++
}

// addRange records that clusters [start, start+n) hold metadata of kind k.
func (mm *metaMap) addRange(start, n uint64, k metaKind) {
	mm.put(start, n, k)
	mm.build()
}

// removeRange undoes one addRange of exactly that range.
func (mm *metaMap) removeRange(start, n uint64, k metaKind) {
	r := metaRange{start, start + n, k}
	switch c := mm.ranges[r]; {
	case c == 0:
		return
	case c == 1:
		delete(mm.ranges, r)
	default:
		mm.ranges[r] = c - 1
	}
	mm.build()
}

// build flattens the ranges into segs.
func (mm *metaMap) build() {
	type edge struct {
		at   uint64
		kind metaKind
		open bool
	}
	edges := make([]edge, 0, 2*len(mm.ranges))
	for r := range mm.ranges {
		edges = append(edges, edge{r.start, r.kind, true}, edge{r.end, r.kind, false})
	}
	mm.work += uint64(len(mm.ranges))
	sort.Slice(edges, func(i, j int) bool { return edges[i].at < edges[j].at })
	var open [16]int // ranges open per kind bit
	var cur metaKind
	segs := mm.segs[:0]
	for i := 0; i < len(edges); {
		at := edges[i].at
		for ; i < len(edges) && edges[i].at == at; i++ {
			for b := 0; b < len(open); b++ {
				if edges[i].kind&(1<<b) == 0 {
					continue
				}
				if edges[i].open {
					open[b]++
				} else {
					open[b]--
				}
			}
		}
		var next metaKind
		for b := 0; b < len(open); b++ {
			if open[b] > 0 {
				next |= 1 << b
			}
		}
		if next == cur {
			continue
		}
		if n := len(segs); n > 0 && segs[n-1].end == 0 {
			segs[n-1].end = at // close the open segment
		}
		if next != 0 {
			segs = append(segs, metaRange{start: at, kind: next}) // end set when it closes
		}
		cur = next
	}
	mm.segs = segs
}

func (mm *metaMap) add(c uint64, k metaKind) {
	mm.work++
	mm.m[c] |= k
}

// setL2 records the active L2 tables of Open: clusters, sorted and
// without duplicates.
func (mm *metaMap) setL2(sorted []uint64) {
	mm.work += uint64(len(sorted))
	mm.l2 = sorted
	mm.l2gone = make([]uint64, (len(sorted)+63)/64)
}

// inL2 says whether c is one of Open's active L2 tables still in use, and
// where.
func (mm *metaMap) inL2(c uint64) (int, bool) {
	i, ok := slices.BinarySearch(mm.l2, c)
	if !ok || mm.l2gone[i/64]&(1<<(i%64)) != 0 {
		return i, false
	}
	return i, true
}

func (mm *metaMap) clear(c uint64, k metaKind) {
	if k&metaL2 != 0 {
		if i, ok := mm.inL2(c); ok {
			mm.l2gone[i/64] |= 1 << (i % 64)
		}
	}
	if v := mm.m[c] &^ k; v == 0 {
		delete(mm.m, c)
	} else {
		mm.m[c] = v
	}
}

// at returns the metadata kinds stored in cluster c.
func (mm *metaMap) at(c uint64) metaKind {
	k := mm.m[c]
	if _, ok := mm.inL2(c); ok {
		k |= metaL2
	}
	i := sort.Search(len(mm.segs), func(i int) bool { return mm.segs[i].end > c })
	if i < len(mm.segs) && mm.segs[i].start <= c {
		k |= mm.segs[i].kind
	}
	return k
}

// check returns an error if a write of kind k to clusters [c, c+n) would
// touch metadata of any other kind.
func (mm *metaMap) check(c, n uint64, k metaKind) error {
	for i := uint64(0); i < n; i++ {
		if other := mm.at(c+i) &^ k; other != 0 {
			return corruptf("write of %s to host cluster %d would overwrite the %s there", k, c+i, other)
		}
	}
	return nil
}

func (mm *metaMap) String() string {
	return fmt.Sprintf("%d ranges (%d segments), %d clusters", len(mm.ranges), len(mm.segs), len(mm.m)+len(mm.l2))
}
