package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

var be = binary.BigEndian

// header is the parsed and validated image header with its extensions.
type header struct {
	version         uint32
	backingOff      uint64
	backingLen      uint32
	clusterBits     uint32
	size            uint64
	cryptMethod     uint32
	l1Size          uint32
	l1Off           uint64
	rtOff           uint64
	rtClusters      uint32
	nbSnapshots     uint32
	snapOff         uint64
	incompat        uint64
	compat          uint64
	autoclear       uint64
	refcountOrder   uint32
	headerLen       uint32
	compressionType uint8

	backingName      string
	backingFormat    string
	hasBackingFormat bool
	dataFileName     string
	hasDataFileName  bool
	featureNames     []FeatureName
	bitmaps          *bitmapsExt // nil when absent or not marked consistent
	bitmapsExtRaw    bool        // a bitmaps extension is present
	crypto           *cryptoExt
	exts             []Extension

	fileSize int64
}

type bitmapsExt struct {
	nbBitmaps uint32
	dirSize   uint64
	dirOff    uint64
	// extOff is the file offset of the extension's data (for Info).
	extOff int64
}

// readDir reads the bitmap directory (its size was bounded when the
// header was parsed).
func (b *bitmapsExt) readDir(f io.ReaderAt) ([]byte, error) {
	dir := make([]byte, b.dirSize)
	if _, err := readFullAt(f, dir, int64(b.dirOff)); err != nil {
		return nil, fmt.Errorf("read bitmap directory: %w", err)
	}
	return dir, nil
}

type cryptoExt struct {
	off uint64
	len uint64
}

// FeatureName is one entry of an image's feature name table.
type FeatureName struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

// Extension describes one header extension as found in the image.
type Extension struct {
	Type   uint32
	Name   string // known name, or "unknown"
	Offset int64  // file offset of the extension's data
	Length uint32
}

func (h *header) clusterSize() uint64 { return 1 << h.clusterBits }

func (h *header) extendedL2() bool { return h.incompat&incompatExtendedL2 != 0 }

// l2EntrySize is 8, or 16 with extended L2 entries.
func (h *header) l2EntrySize() uint64 {
	if h.extendedL2() {
		return 16
	}
	return 8
}

func (h *header) l2Entries() uint64 { return h.clusterSize() / h.l2EntrySize() }

func (h *header) refcountBits() uint64 { return 1 << h.refcountOrder }

func (h *header) refblockEntries() uint64 { return h.clusterSize() * 8 / h.refcountBits() }

// l1Needed is the number of L1 entries the virtual size needs.
func (h *header) l1Needed() uint64 {
	return divRoundUp(h.size, h.clusterSize()*h.l2Entries())
}

func extName(t uint32) string {
	switch t {
	case extBackingFormat:
		return "backing format"
	case extFeatureTable:
		return "feature name table"
	case extBitmaps:
		return "bitmaps"
	case extCrypto:
		return "full disk encryption header pointer"
	case extDataFile:
		return "external data file name"
	}
	return "unknown"
}

// readHeader reads, parses and validates the header of the image in f.
// It checks every field against the file size but reads no table.
func readHeader(f io.ReaderAt, fileSize int64) (*header, error) {
	if fileSize < v2HeaderLen {
		return nil, invalidf("file is %d bytes, too small for a qcow2 header", fileSize)
	}
	first := make([]byte, v3HeaderLen)
	n, err := f.ReadAt(first, 0)
	if n < v2HeaderLen {
		return nil, fmt.Errorf("read header: %w", err)
	}
	if be.Uint32(first[0:]) != magic {
		return nil, invalidf("bad magic %#08x (not a qcow2 image)", be.Uint32(first[0:]))
	}
	cb := be.Uint32(first[20:])
	if cb < minClusterBits || cb > maxClusterBits {
		return nil, invalidf("cluster_bits %d out of range (%d..%d)", cb, minClusterBits, maxClusterBits)
	}
	cs := int64(1) << cb
	// The header, its extensions and the backing file name all live in the
	// first cluster.
	bufLen := cs
	if fileSize < bufLen {
		bufLen = fileSize
	}
	buf := make([]byte, bufLen)
	if n, err := f.ReadAt(buf, 0); int64(n) < bufLen {
		return nil, fmt.Errorf("read header cluster: %w", err)
	}
	return parseHeader(buf, fileSize)
}

// parseHeader parses the header in buf, which holds the image's first
// cluster (or the whole file if it is shorter).
func parseHeader(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v2HeaderLen {
		return nil, invalidf("header truncated")
	}
	if be.Uint32(buf[0:]) != magic {
		return nil, invalidf("bad magic %#08x (not a qcow2 image)", be.Uint32(buf[0:]))
	}
	h := &header{
		version:     be.Uint32(buf[4:]),
		backingOff:  be.Uint64(buf[8:]),
		backingLen:  be.Uint32(buf[16:]),
		clusterBits: be.Uint32(buf[20:]),
		size:        be.Uint64(buf[24:]),
		cryptMethod: be.Uint32(buf[32:]),
		l1Size:      be.Uint32(buf[36:]),
		l1Off:       be.Uint64(buf[40:]),
		rtOff:       be.Uint64(buf[48:]),
		rtClusters:  be.Uint32(buf[56:]),
		nbSnapshots: be.Uint32(buf[60:]),
		snapOff:     be.Uint64(buf[64:]),
		fileSize:    fileSize,
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, invalidf("cluster_bits %d out of range (%d..%d)", h.clusterBits, minClusterBits, maxClusterBits)
	}
	cs := h.clusterSize()
	switch h.version {
	case 2:
		h.headerLen = v2HeaderLen
		h.refcountOrder = 4
	case 3:
		if len(buf) < v3HeaderLen {
			return nil, invalidf("version 3 header truncated")
		}
		h.incompat = be.Uint64(buf[72:])
		h.compat = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		h.refcountOrder = be.Uint32(buf[96:])
		h.headerLen = be.Uint32(buf[100:])
		if h.headerLen < v3HeaderLen || h.headerLen%8 != 0 {
			return nil, invalidf("header_length %d invalid (at least %d, a multiple of 8)", h.headerLen, v3HeaderLen)
		}
		if uint64(h.headerLen) > cs || int(h.headerLen) > len(buf) {
			return nil, invalidf("header_length %d larger than the first cluster", h.headerLen)
		}
		if h.headerLen > 104 {
			h.compressionType = buf[104]
		}
	default:
		return nil, unsupportedf("qcow2 version %d (want 2 or 3)", h.version)
	}
	if h.refcountOrder > 6 {
		return nil, invalidf("refcount_order %d out of range (0..6)", h.refcountOrder)
	}
	if err := h.parseExtensions(buf); err != nil {
		return nil, err
	}
	if unknown := h.incompat &^ incompatKnown; unknown != 0 {
		return nil, unsupportedf("unknown incompatible feature(s): %s", h.describeBits(0, unknown))
	}
	if h.incompat&incompatCompression != 0 {
		if h.compressionType == compressionZlib {
			return nil, invalidf("compression type bit set but compression_type is zlib")
		}
	} else if h.compressionType != compressionZlib {
		return nil, invalidf("compression_type %d without the compression type feature bit", h.compressionType)
	}
	if h.compressionType != compressionZlib && h.compressionType != compressionZstd {
		return nil, unsupportedf("compression type %d", h.compressionType)
	}
	if h.extendedL2() && h.clusterBits < 14 {
		return nil, invalidf("extended L2 entries need clusters of at least 16 KiB (cluster_bits %d)", h.clusterBits)
	}
	if h.autoclear&autoclearDataFileRaw != 0 && h.incompat&incompatDataFile == 0 {
		return nil, invalidf("raw external data bit set without an external data file")
	}
	if h.hasDataFileName && h.incompat&incompatDataFile == 0 {
		return nil, invalidf("external data file name present without the external data file bit")
	}

	// Backing file name.
	if h.backingOff != 0 {
		if h.backingLen > maxBackingName {
			return nil, invalidf("backing file name is %d bytes (limit %d)", h.backingLen, maxBackingName)
		}
		if h.backingOff >= cs || h.backingOff+uint64(h.backingLen) > cs || h.backingOff+uint64(h.backingLen) > uint64(len(buf)) {
			return nil, invalidf("backing file name at %#x+%d lies outside the first cluster", h.backingOff, h.backingLen)
		}
		h.backingName = string(buf[h.backingOff : h.backingOff+uint64(h.backingLen)])
	}
	if h.backingName != "" && h.autoclear&autoclearDataFileRaw != 0 {
		return nil, invalidf("backing file with a raw external data file")
	}

	if err := h.validateLayout(); err != nil {
		return nil, err
	}
	return h, nil
}

func (h *header) parseExtensions(buf []byte) error {
	end := h.clusterSize()
	if h.backingOff != 0 && h.backingOff < end {
		end = h.backingOff
	}
	if end > uint64(len(buf)) {
		end = uint64(len(buf))
	}
	off := uint64(h.headerLen)
	seen := map[uint32]bool{}
	for off+8 <= end {
		typ := be.Uint32(buf[off:])
		ln := uint64(be.Uint32(buf[off+4:]))
		if typ == extEnd {
			return nil
		}
		data := off + 8
		if ln > end-data {
			return invalidf("header extension %#x at %#x: length %d runs past the header area", typ, off, ln)
		}
		d := buf[data : data+ln]
		h.exts = append(h.exts, Extension{Type: typ, Name: extName(typ), Offset: int64(data), Length: uint32(ln)})
		if extName(typ) != "unknown" {
			if seen[typ] {
				return invalidf("duplicate %s header extension", extName(typ))
			}
			seen[typ] = true
		}
		switch typ {
		case extBackingFormat:
			if ln > maxBackingFmt {
				return invalidf("backing format name is %d bytes (limit %d)", ln, maxBackingFmt)
			}
			h.backingFormat = string(d)
			h.hasBackingFormat = true
		case extFeatureTable:
			for i := uint64(0); i+48 <= ln; i += 48 {
				name := d[i+2 : i+48]
				if z := indexByte(name, 0); z >= 0 {
					name = name[:z]
				}
				h.featureNames = append(h.featureNames, FeatureName{Type: d[i], Bit: d[i+1], Name: string(name)})
			}
		case extBitmaps:
			if ln != 24 {
				return invalidf("bitmaps extension is %d bytes (want 24)", ln)
			}
			h.bitmapsExtRaw = true
			if h.autoclear&autoclearBitmaps == 0 {
				// Without the autoclear bit the extension is stale:
				// ignore it (it stays in the file untouched).
				break
			}
			b := &bitmapsExt{
				nbBitmaps: be.Uint32(d[0:]),
				dirSize:   be.Uint64(d[8:]),
				dirOff:    be.Uint64(d[16:]),
				extOff:    int64(data),
			}
			if be.Uint32(d[4:]) != 0 {
				return invalidf("bitmaps extension: reserved field is not zero")
			}
			if b.nbBitmaps == 0 || b.nbBitmaps > maxBitmaps {
				return invalidf("bitmaps extension: %d bitmaps (want 1..%d)", b.nbBitmaps, maxBitmaps)
			}
			if b.dirSize == 0 || b.dirSize > maxBitmapDirBytes {
				return invalidf("bitmaps extension: directory size %d out of range", b.dirSize)
			}
			h.bitmaps = b
		case extCrypto:
			if ln != 16 {
				return invalidf("encryption header extension is %d bytes (want 16)", ln)
			}
			h.crypto = &cryptoExt{off: be.Uint64(d[0:]), len: be.Uint64(d[8:])}
		case extDataFile:
			if ln > maxDataFileName {
				return invalidf("external data file name is %d bytes (limit %d)", ln, maxDataFileName)
			}
			h.dataFileName = string(d)
			h.hasDataFileName = true
		}
		off = data + (ln+7)&^7
	}
	return nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// describeBits names the set bits of a feature bitmap (typ 0 incompatible,
// 1 compatible, 2 autoclear), using the image's feature name table.
func (h *header) describeBits(typ uint8, bits uint64) string {
	var parts []string
	for b := 0; b < 64; b++ {
		if bits&(1<<b) == 0 {
			continue
		}
		name := ""
		for _, fn := range h.featureNames {
			if fn.Type == typ && int(fn.Bit) == b {
				name = fn.Name
			}
		}
		if name == "" {
			name = knownFeatureName(typ, b)
		}
		if name == "" {
			parts = append(parts, fmt.Sprintf("bit %d", b))
		} else {
			parts = append(parts, fmt.Sprintf("%q (bit %d)", sanitize(name), b))
		}
	}
	return strings.Join(parts, ", ")
}

func knownFeatureName(typ uint8, bit int) string {
	switch typ {
	case 0:
		switch bit {
		case 0:
			return "dirty bit"
		case 1:
			return "corrupt bit"
		case 2:
			return "external data file"
		case 3:
			return "compression type"
		case 4:
			return "extended L2 entries"
		}
	case 1:
		if bit == 0 {
			return "lazy refcounts"
		}
	case 2:
		switch bit {
		case 0:
			return "bitmaps"
		case 1:
			return "raw external data"
		}
	}
	return ""
}

// sanitize makes image-supplied text safe for a one-line message.
func sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			b.WriteByte('?')
		} else {
			b.WriteRune(r)
		}
	}
	return b.String()
}

// checkTable validates a table of n bytes at off: aligned to clusters, no
// overflow, inside the file.
func (h *header) checkTable(what string, off, n uint64) error {
	if off%h.clusterSize() != 0 {
		return invalidf("%s offset %#x is not aligned to a cluster", what, off)
	}
	if n == 0 {
		return nil
	}
	if off == 0 {
		return invalidf("%s at offset 0 overlaps the header", what)
	}
	if off >= maxHostOffset || n > maxHostOffset || off+n > uint64(h.fileSize) {
		return invalidf("%s at %#x+%d lies outside the file (%d bytes)", what, off, n, h.fileSize)
	}
	return nil
}

// validateLayout checks sizes and table positions.
func (h *header) validateLayout() error {
	cs := h.clusterSize()
	if h.size > 1<<63-1 {
		return invalidf("virtual size %d too large", h.size)
	}
	if uint64(h.l1Size) > maxL1Bytes/8 {
		return invalidf("L1 table has %d entries (limit %d)", h.l1Size, maxL1Bytes/8)
	}
	if need := h.l1Needed(); uint64(h.l1Size) < need {
		return invalidf("L1 table has %d entries, virtual size %d needs %d", h.l1Size, h.size, need)
	}
	if err := h.checkTable("L1 table", h.l1Off, uint64(h.l1Size)*8); err != nil {
		return err
	}
	if h.rtClusters == 0 {
		return invalidf("refcount table is empty")
	}
	if uint64(h.rtClusters)*cs > maxRefTableBytes {
		return invalidf("refcount table is %d clusters (limit %d bytes)", h.rtClusters, maxRefTableBytes)
	}
	if err := h.checkTable("refcount table", h.rtOff, uint64(h.rtClusters)*cs); err != nil {
		return err
	}
	if h.nbSnapshots > maxSnapshots {
		return invalidf("%d snapshots (limit %d)", h.nbSnapshots, maxSnapshots)
	}
	if h.nbSnapshots > 0 {
		// Each entry is at least 40 bytes; the exact size is checked when
		// the table is read.
		if err := h.checkTable("snapshot table", h.snapOff, uint64(h.nbSnapshots)*40); err != nil {
			return err
		}
	} else if h.snapOff%cs != 0 {
		return invalidf("snapshot table offset %#x is not aligned to a cluster", h.snapOff)
	}
	if h.bitmaps != nil {
		if err := h.checkTable("bitmap directory", h.bitmaps.dirOff, h.bitmaps.dirSize); err != nil {
			return err
		}
	}
	if h.crypto != nil && h.crypto.len > 0 {
		if h.crypto.len > maxHostOffset {
			return invalidf("encryption header length %d too large", h.crypto.len)
		}
		if err := h.checkTable("encryption header", h.crypto.off, h.crypto.len); err != nil {
			return err
		}
	}
	return nil
}

// refTableBytes is the size of the refcount table in bytes.
func (h *header) refTableBytes() uint64 { return uint64(h.rtClusters) << h.clusterBits }
