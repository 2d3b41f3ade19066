package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// Info holds the header facts `img info` shows.
type Info struct {
	Version         int
	ClusterSize     int64
	RefcountBits    int
	VirtualSize     int64
	BackingFile     string // as recorded (not resolved)
	BackingFormat   string // as recorded; "" if none
	DataFile        string // external data file name as recorded
	DataFileRaw     bool
	ExternalData    bool
	Encrypted       bool
	CompressionType string // "zlib" or "zstd"
	ExtendedL2      bool
	LazyRefcounts   bool
	Dirty           bool
	Corrupt         bool
	// Bitmaps is the number of persistent bitmaps (0 if none or if the
	// bitmaps extension is marked inconsistent).
	Bitmaps int
	// BitmapList is what the bitmap directory says of each (ReadInfo
	// only; nil when the directory cannot be read or parsed: check
	// reports that).
	BitmapList []BitmapInfo

	IncompatibleFeatures uint64
	CompatibleFeatures   uint64
	AutoclearFeatures    uint64
	FeatureNames         []FeatureName
	Extensions           []Extension
	Snapshots            []SnapshotInfo

	HeaderLength        int
	L1Size              int
	L1TableOffset       int64
	RefcountTableOffset int64
	RefcountTableSize   int // clusters
	FileSize            int64
}

func (h *header) info(snaps []snapshot) Info {
	in := Info{
		Version:              int(h.version),
		ClusterSize:          int64(h.clusterSize()),
		RefcountBits:         int(h.refcountBits()),
		VirtualSize:          int64(h.size &^ 511), // whole sectors, as QEMU
		BackingFile:          sanitize(h.backingName),
		BackingFormat:        sanitize(h.backingFormat),
		DataFile:             sanitize(h.dataFileName),
		DataFileRaw:          h.autoclear&autoclearDataFileRaw != 0,
		ExternalData:         h.incompat&incompatDataFile != 0,
		Encrypted:            h.cryptMethod != 0,
		CompressionType:      "zlib",
		ExtendedL2:           h.extendedL2(),
		LazyRefcounts:        h.compat&compatLazyRefcounts != 0,
		Dirty:                h.incompat&incompatDirty != 0,
		Corrupt:              h.incompat&incompatCorrupt != 0,
		IncompatibleFeatures: h.incompat,
		CompatibleFeatures:   h.compat,
		AutoclearFeatures:    h.autoclear,
		FeatureNames:         append([]FeatureName(nil), h.featureNames...),
		Extensions:           append([]Extension(nil), h.exts...),
		HeaderLength:         int(h.headerLen),
		L1Size:               int(h.l1Size),
		L1TableOffset:        int64(h.l1Off),
		RefcountTableOffset:  int64(h.rtOff),
		RefcountTableSize:    int(h.rtClusters),
		FileSize:             h.fileSize,
	}
	if h.compressionType == compressionZstd {
		in.CompressionType = "zstd"
	}
	if h.bitmaps != nil {
		in.Bitmaps = int(h.bitmaps.nbBitmaps)
	}
	for i := range in.FeatureNames {
		in.FeatureNames[i].Name = sanitize(in.FeatureNames[i].Name)
	}
	for i := range snaps {
		in.Snapshots = append(in.Snapshots, snaps[i].info())
	}
	return in
}

// Info returns the image's header facts.
func (im *Image) Info() Info {
	im.mu.RLock()
	defer im.mu.RUnlock()
	in := im.h.info(im.snaps)
	in.RefcountTableOffset = int64(im.h.rtOff)
	in.RefcountTableSize = int(im.h.rtClusters)
	return in
}

// ReadInfo parses and validates the header and snapshot table of the image
// in f without opening anything else (the backing file is never opened).
func ReadInfo(f *os.File) (Info, error) {
	if f == nil {
		return Info{}, errors.New("qcow2: nil image file")
	}
	_, size, err := identify(f)
	if err != nil {
		return Info{}, fmt.Errorf("stat: %w", err)
	}
	h, err := readHeader(f, size)
	if err != nil {
		return Info{}, err
	}
	snaps, _, err := readSnapshots(f, h)
	if err != nil {
		return Info{}, err
	}
	in := h.info(snaps)
	in.BitmapList = readBitmapList(f, h)
	return in, nil
}

// BitmapInfo is one persistent bitmap, as qemu-img info lists it.
type BitmapInfo struct {
	Name        string
	Granularity uint64 // bytes
	InUse       bool   // flag bit 0: its content is not to be trusted
	Auto        bool   // flag bit 1: tracks the guest's writes when enabled
}

// readBitmapList reads the bitmap directory the header's extension names;
// nil when there is none or it cannot be read or parsed.
func readBitmapList(f io.ReaderAt, h *header) []BitmapInfo {
	bm := h.bitmaps
	if bm == nil {
		return nil
	}
	dir, err := bm.readDir(f)
	if err != nil {
		return nil
	}
	ents, err := parseBitmapDir(dir, bm.nbBitmaps)
	if err != nil {
		return nil
	}
	out := make([]BitmapInfo, 0, len(ents))
	for _, e := range ents {
		if e.granularityBits >= 64 {
			return nil
		}
		out = append(out, BitmapInfo{Name: e.name, Granularity: 1 << e.granularityBits, InUse: e.flags&1 != 0, Auto: e.flags&2 != 0})
	}
	return out
}

// prepareWritable runs once when an image is opened read-write: it clears
// autoclear bits this package does not maintain and marks persistent
// bitmaps in use (this package does not update them).
func (im *Image) prepareWritable() error {
	h := im.h
	if h.version < 3 {
		return nil
	}
	auto := h.autoclear &^ (autoclearBitmaps | autoclearDataFileRaw)
	newAuto := h.autoclear &^ auto
	if h.bitmaps != nil {
		if err := im.markBitmapsInUse(); err != nil {
			im.log.Warn("bitmap directory unusable; clearing the bitmaps autoclear bit", "error", err)
			newAuto &^= autoclearBitmaps
		}
	} else {
		newAuto &^= autoclearBitmaps
	}
	if newAuto != h.autoclear {
		var b [8]byte
		be.PutUint64(b[:], newAuto)
		if _, err := im.f.WriteAt(b[:], hdrAutoclearOff); err != nil {
			return fmt.Errorf("write header: %w", err)
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		h.autoclear = newAuto
	}
	return nil
}

// markBitmapsInUse sets the in_use flag of every bitmap: their content no
// longer tracks the guest's writes.
func (im *Image) markBitmapsInUse() error {
	bm := im.h.bitmaps
	dir, err := bm.readDir(im.f)
	if err != nil {
		return err
	}
	ents, err := parseBitmapDir(dir, bm.nbBitmaps)
	if err != nil {
		return err
	}
	changed := false
	for _, e := range ents {
		if e.flags&1 == 0 {
			be.PutUint32(dir[e.pos+12:], e.flags|1)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if err := im.meta.check(bm.dirOff/im.cs, divRoundUp(bm.dirSize, im.cs), metaBitmapDir); err != nil {
		return err
	}
	if _, err := im.f.WriteAt(dir, int64(bm.dirOff)); err != nil {
		return fmt.Errorf("write bitmap directory: %w", err)
	}
	return im.f.Sync()
}
