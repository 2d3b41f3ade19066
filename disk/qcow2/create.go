package qcow2

import (
	"errors"
	"fmt"
	"os"

	"github.com/krun-core/krun-core/disk"
)

// CreateOptions describes a new image.
type CreateOptions struct {
	Size            int64 // virtual size; rounded up to 512 bytes
	ClusterSize     int64 // 0 means 64 KiB
	Version         int   // 2 or 3; 0 means 3
	RefcountBits    int   // 1..64, a power of two; 0 means 16
	BackingFile     string
	BackingFormat   disk.Format // recorded when set
	CompressionType string      // "", "zlib" or "zstd"
	ExtendedL2      bool
	LazyRefcounts   bool
}

// Create writes a new, empty image to f, replacing its content.
func Create(f *os.File, o CreateOptions) error {
	if f == nil {
		return errors.New("qcow2: nil image file")
	}
	buf, fileSize, err := buildImage(o)
	if err != nil {
		return err
	}
	if err := f.Truncate(0); err != nil {
		return err // "truncate PATH: ..." already
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := f.Truncate(fileSize); err != nil {
		return err
	}
	return fdatasync(f)
}

// buildImage lays out a new image: header, refcount table, refcount
// blocks, L1 table. It returns the bytes up to the L1 table (which is all
// zeroes and left to the truncate) and the file size.
func buildImage(o CreateOptions) ([]byte, int64, error) {
	if o.Size < 0 {
		return nil, 0, fmt.Errorf("invalid size %d", o.Size)
	}
	size := uint64(o.Size+511) &^ 511
	cs := uint64(o.ClusterSize)
	if cs == 0 {
		cs = 64 << 10
	}
	cb := uint32(0)
	for uint64(1)<<cb < cs {
		cb++
	}
	if uint64(1)<<cb != cs || cb < minClusterBits || cb > maxClusterBits {
		return nil, 0, fmt.Errorf("cluster size %d must be a power of two from 512 to 2 MiB", o.ClusterSize)
	}
	version := uint32(o.Version)
	if version == 0 {
		version = 3
	}
	if version != 2 && version != 3 {
		return nil, 0, fmt.Errorf("version %d (want 2 or 3)", o.Version)
	}
	rcBits := uint64(o.RefcountBits)
	if rcBits == 0 {
		rcBits = 16
	}
	order := uint32(0)
	for uint64(1)<<order < rcBits {
		order++
	}
	if uint64(1)<<order != rcBits || order > 6 {
		return nil, 0, fmt.Errorf("refcount bits %d must be a power of two from 1 to 64", o.RefcountBits)
	}
	var compression uint8
	switch o.CompressionType {
	case "", "zlib":
	case "zstd":
		compression = compressionZstd
	default:
		return nil, 0, fmt.Errorf("unknown compression type %q (want zlib or zstd)", o.CompressionType)
	}
	if version == 2 && (rcBits != 16 || compression != 0 || o.ExtendedL2 || o.LazyRefcounts) {
		return nil, 0, errors.New("version 2 images support none of: refcount bits other than 16, zstd, extended L2, lazy refcounts")
	}
	if o.ExtendedL2 && cb < 14 {
		return nil, 0, errors.New("extended L2 entries need clusters of at least 16 KiB")
	}
	if len(o.BackingFile) > maxBackingName {
		return nil, 0, fmt.Errorf("backing file name is %d bytes (limit %d)", len(o.BackingFile), maxBackingName)
	}
	if o.BackingFormat != "" && o.BackingFile == "" {
		return nil, 0, errors.New("backing format without a backing file")
	}
	if len(o.BackingFormat) > maxBackingFmt {
		return nil, 0, fmt.Errorf("backing format name too long")
	}

	h := &header{version: version, clusterBits: cb, size: size, refcountOrder: order, compressionType: compression}
	if version == 3 {
		h.headerLen = 112
		if compression != 0 {
			h.incompat |= incompatCompression
		}
		if o.ExtendedL2 {
			h.incompat |= incompatExtendedL2
		}
		if o.LazyRefcounts {
			h.compat |= compatLazyRefcounts
		}
	} else {
		h.headerLen = v2HeaderLen
	}
	l1Entries := h.l1Needed()
	if l1Entries*8 > maxL1Bytes {
		return nil, 0, fmt.Errorf("virtual size %d needs an L1 table of %d bytes (limit %d)%s", size, l1Entries*8, maxL1Bytes, largerClusters(h.clusterBits, "use"))
	}
	l1c := divRoundUp(l1Entries*8, cs)
	E := h.refblockEntries()
	var rtc, nblk uint64 = 1, 1
	for {
		total := 1 + rtc + nblk + l1c
		nb := divRoundUp(total, E)
		nr := divRoundUp(nb*8, cs)
		if nb == nblk && nr == rtc {
			break
		}
		nblk, rtc = nb, nr
	}
	if rtc*cs > maxRefTableBytes {
		return nil, 0, fmt.Errorf("refcount table would need %d bytes (limit %d)", rtc*cs, maxRefTableBytes)
	}
	h.rtOff, h.rtClusters = cs, uint32(rtc)
	h.l1Off, h.l1Size = (1+rtc+nblk)*cs, uint32(l1Entries)
	total := 1 + rtc + nblk + l1c

	buf := make([]byte, (1+rtc+nblk)*cs)
	hb := buf[:cs]
	be.PutUint32(hb[0:], magic)
	be.PutUint32(hb[4:], version)
	be.PutUint32(hb[20:], cb)
	be.PutUint64(hb[24:], size)
	be.PutUint32(hb[36:], h.l1Size)
	be.PutUint64(hb[40:], h.l1Off)
	be.PutUint64(hb[48:], h.rtOff)
	be.PutUint32(hb[56:], h.rtClusters)
	if version == 3 {
		be.PutUint64(hb[72:], h.incompat)
		be.PutUint64(hb[80:], h.compat)
		be.PutUint32(hb[96:], order)
		be.PutUint32(hb[100:], h.headerLen)
		hb[104] = compression
	}
	off := uint64(h.headerLen)
	putExt := func(typ uint32, data []byte) error {
		n := uint64(len(data))
		if off+8+(n+7)&^7+8 > cs {
			return errors.New("header extensions do not fit in the first cluster")
		}
		be.PutUint32(hb[off:], typ)
		be.PutUint32(hb[off+4:], uint32(n))
		copy(hb[off+8:], data)
		off += 8 + (n+7)&^7
		return nil
	}
	if o.BackingFormat != "" {
		if err := putExt(extBackingFormat, []byte(o.BackingFormat)); err != nil {
			return nil, 0, err
		}
	}
	if version == 3 {
		var ft []byte
		for _, fe := range []struct {
			typ, bit uint8
			name     string
		}{
			{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
			{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
			{1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
		} {
			e := make([]byte, 48)
			e[0], e[1] = fe.typ, fe.bit
			copy(e[2:], fe.name)
			ft = append(ft, e...)
		}
		if cs-off >= uint64(len(ft))+16+uint64(len(o.BackingFile)) {
			if err := putExt(extFeatureTable, ft); err != nil {
				return nil, 0, err
			}
		}
	}
	off += 8 // end-of-extensions marker (zeroes)
	if o.BackingFile != "" {
		if off+uint64(len(o.BackingFile)) > cs {
			return nil, 0, errors.New("backing file name does not fit in the first cluster")
		}
		be.PutUint64(hb[8:], off)
		be.PutUint32(hb[16:], uint32(len(o.BackingFile)))
		copy(hb[off:], o.BackingFile)
	}
	// Refcount table and blocks: clusters 0..total-1 have refcount 1.
	for b := uint64(0); b < nblk; b++ {
		be.PutUint64(buf[cs+b*8:], (1+rtc+b)*cs)
		blk := buf[(1+rtc+b)*cs : (2+rtc+b)*cs]
		for k := b * E; k < min(b*E+E, total); k++ {
			setRC(blk, rcBits, k-b*E, 1)
		}
	}
	// Validate what we built with the parser.
	if _, err := parseHeader(hb, int64(total*cs)); err != nil {
		return nil, 0, fmt.Errorf("internal error: created header does not parse: %w", err)
	}
	return buf, int64(total * cs), nil
}

// largerClusters is the hint for a size whose L1 table is over the limit:
// larger clusters, when there are any (verb: "use" or "convert to").
func largerClusters(clusterBits uint32, verb string) string {
	if clusterBits >= maxClusterBits {
		return " even with the largest clusters (2 MiB)"
	}
	return "; " + verb + " larger clusters"
}
