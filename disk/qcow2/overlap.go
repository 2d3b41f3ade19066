package qcow2

import "fmt"

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
// on metadata it was not meant for. Contiguous structures are ranges;
// single-cluster tables are kept per cluster.
type metaMap struct {
	ranges []metaRange
	m      map[uint64]metaKind
}

func newMetaMap() *metaMap { return &metaMap{m: make(map[uint64]metaKind)} }

func (mm *metaMap) addRange(start, n uint64, k metaKind) {
	if n == 0 {
		return
	}
	mm.ranges = append(mm.ranges, metaRange{start, start + n, k})
}

func (mm *metaMap) removeRange(start, n uint64, k metaKind) {
	for i, r := range mm.ranges {
		if r.start == start && r.end == start+n && r.kind == k {
			mm.ranges = append(mm.ranges[:i], mm.ranges[i+1:]...)
			return
		}
	}
}

func (mm *metaMap) add(c uint64, k metaKind) { mm.m[c] |= k }
func (mm *metaMap) clear(c uint64, k metaKind) {
	if v := mm.m[c] &^ k; v == 0 {
		delete(mm.m, c)
	} else {
		mm.m[c] = v
	}
}

// at returns the metadata kinds stored in cluster c.
func (mm *metaMap) at(c uint64) metaKind {
	k := mm.m[c]
	for _, r := range mm.ranges {
		if c >= r.start && c < r.end {
			k |= r.kind
		}
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
	return fmt.Sprintf("%d ranges, %d clusters", len(mm.ranges), len(mm.m))
}
