package imgtool

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/krun-core/krun-core/proto/imagepb"
)

// Info is what `img info` reports. The JSON uses qemu-img's key names for
// what both report; what only krun-core reports is under "krun-core".
type Info struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	ActualSize  int64  `json:"actual-size"`
	ClusterSize int64  `json:"cluster-size,omitempty"`
	// BackingFilename is the name as recorded; FullBackingFilename the
	// same name joined lexically to the image's directory (as qemu-img
	// prints it). Neither is opened or looked up.
	BackingFilename       string          `json:"backing-filename,omitempty"`
	FullBackingFilename   string          `json:"full-backing-filename,omitempty"`
	BackingFilenameFormat string          `json:"backing-filename-format,omitempty"`
	DirtyFlag             bool            `json:"dirty-flag"`
	Snapshots             []Snapshot      `json:"snapshots,omitempty"`
	FormatSpecific        *FormatSpecific `json:"format-specific,omitempty"`
	Extra                 *Extra          `json:"krun-core,omitempty"`
}

// FormatSpecific is qemu-img's "format-specific" object.
type FormatSpecific struct {
	Type string    `json:"type"`
	Data QCOW2Data `json:"data"`
}

// QCOW2Data is qemu-img's format-specific data of a qcow2 image. The
// pointer fields exist for version 3 (compat 1.1) images only.
type QCOW2Data struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   *bool  `json:"lazy-refcounts,omitempty"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         *bool  `json:"corrupt,omitempty"`
	ExtendedL2      *bool  `json:"extended-l2,omitempty"`
	DataFile        string `json:"data-file,omitempty"`
	DataFileRaw     *bool  `json:"data-file-raw,omitempty"`
	// Bitmaps are the persistent bitmaps, as qemu-img lists them (only
	// where the image has some).
	Bitmaps []Bitmap `json:"bitmaps,omitempty"`
}

// Bitmap is one persistent bitmap, in qemu-img's keys: Flags holds
// "in-use" and "auto", in that order, and is [] (not absent) without.
type Bitmap struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
}

// Snapshot is one internal snapshot, in qemu-img's keys.
type Snapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	ICount      *int64 `json:"icount,omitempty"`
}

// Extra holds what only krun-core reports.
type Extra struct {
	FileLength           int64         `json:"file-length"`
	Version              int           `json:"version,omitempty"`
	Encrypted            bool          `json:"encrypted,omitempty"`
	ExternalDataFile     bool          `json:"external-data-file,omitempty"`
	Bitmaps              int           `json:"bitmaps,omitempty"`
	IncompatibleFeatures uint64        `json:"incompatible-features"`
	CompatibleFeatures   uint64        `json:"compatible-features"`
	AutoclearFeatures    uint64        `json:"autoclear-features"`
	FeatureNames         []FeatureName `json:"feature-names,omitempty"`
}

// FeatureName is one entry of a qcow2 feature name table.
type FeatureName struct {
	Type string `json:"type"` // incompatible, compatible, autoclear
	Bit  int    `json:"bit"`
	Name string `json:"name"`
}

func boolp(b bool) *bool { return &b }

// newInfo builds the report for path from the plugin's answer.
func newInfo(path string, r *imagepb.InfoResponse) *Info {
	in := &Info{
		Filename:    path,
		Format:      r.GetFormat(),
		VirtualSize: r.GetVirtualSize(),
		ActualSize:  r.GetActualSize(),
		DirtyFlag:   r.GetDirty(),
	}
	if r.GetFormat() != "qcow2" {
		return in
	}
	in.ClusterSize = r.GetClusterSize()
	if b := r.GetBackingFile(); b != "" {
		in.BackingFilename = b
		in.FullBackingFilename = fullBackingName(path, b)
		in.BackingFilenameFormat = r.GetBackingFormat()
	}
	d := QCOW2Data{Compat: "0.10", CompressionType: r.GetCompressionType(), RefcountBits: int(r.GetRefcountBits())}
	if r.GetVersion() >= 3 {
		d.Compat = "1.1"
		d.LazyRefcounts = boolp(r.GetLazyRefcounts())
		d.Corrupt = boolp(r.GetCorrupt())
		d.ExtendedL2 = boolp(r.GetExtendedL2())
	}
	if r.GetExternalData() {
		d.DataFile = r.GetDataFile()
		d.DataFileRaw = boolp(r.GetDataFileRaw())
	}
	for _, bm := range r.GetBitmapList() {
		b := Bitmap{Flags: []string{}, Name: bm.GetName(), Granularity: bm.GetGranularity()}
		if bm.GetInUse() {
			b.Flags = append(b.Flags, "in-use")
		}
		if bm.GetAuto() {
			b.Flags = append(b.Flags, "auto")
		}
		d.Bitmaps = append(d.Bitmaps, b)
	}
	in.FormatSpecific = &FormatSpecific{Type: "qcow2", Data: d}
	for _, s := range r.GetSnapshots() {
		sn := Snapshot{
			ID: s.GetId(), Name: s.GetName(), VMStateSize: s.GetVmStateSize(),
			DateSec: s.GetDateSec(), DateNsec: s.GetDateNsec(),
			VMClockSec: s.GetVmClockNsec() / 1e9, VMClockNsec: s.GetVmClockNsec() % 1e9,
		}
		if ic := s.GetIcount(); ic >= 0 {
			sn.ICount = &ic
		}
		in.Snapshots = append(in.Snapshots, sn)
	}
	x := &Extra{
		FileLength: r.GetFileSize(), Version: int(r.GetVersion()), Encrypted: r.GetEncrypted(),
		ExternalDataFile: r.GetExternalData(), Bitmaps: int(r.GetBitmaps()),
		IncompatibleFeatures: r.GetIncompatibleFeatures(), CompatibleFeatures: r.GetCompatibleFeatures(),
		AutoclearFeatures: r.GetAutoclearFeatures(),
	}
	for _, fn := range r.GetFeatureNames() {
		t := map[uint32]string{0: "incompatible", 1: "compatible", 2: "autoclear"}[fn.GetType()]
		if t == "" {
			t = fmt.Sprintf("type-%d", fn.GetType())
		}
		x.FeatureNames = append(x.FeatureNames, FeatureName{Type: t, Bit: int(fn.GetBit()), Name: fn.GetName()})
	}
	in.Extra = x
	return in
}

// WriteJSON writes the report as indented JSON.
func (in *Info) WriteJSON(w io.Writer) error {
	return writeJSON(w, in)
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// WriteHuman writes the report the way `qemu-img info` lays it out.
func (in *Info) WriteHuman(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "image: %s\n", in.Filename)
	fmt.Fprintf(&b, "file format: %s\n", in.Format)
	fmt.Fprintf(&b, "virtual size: %s (%d bytes)\n", humanSize(in.VirtualSize), in.VirtualSize)
	fmt.Fprintf(&b, "disk size: %s\n", humanSize(in.ActualSize))
	if in.ClusterSize != 0 {
		fmt.Fprintf(&b, "cluster_size: %d\n", in.ClusterSize)
	}
	if in.BackingFilename != "" {
		fmt.Fprintf(&b, "backing file: %s (recorded, not opened)\n", in.BackingFilename)
		if in.BackingFilenameFormat != "" {
			fmt.Fprintf(&b, "backing file format: %s\n", in.BackingFilenameFormat)
		} else {
			fmt.Fprintf(&b, "backing file format: (not recorded)\n")
		}
	}
	if in.DirtyFlag {
		fmt.Fprintf(&b, "cleanly shut down: no\n")
	}
	if len(in.Snapshots) > 0 {
		// qemu-img's columns (bdrv_snapshot_dump): the header's widths
		// differ from the rows' (found in review, helper-92), and a row's
		// TAG is 16 wide, then a space (helper-125).
		fmt.Fprintf(&b, "Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range in.Snapshots {
			date := time.Unix(s.DateSec, 0).Format("2006-01-02 15:04:05")
			clock := fmt.Sprintf("%02d:%02d:%02d.%03d", s.VMClockSec/3600, s.VMClockSec/60%60, s.VMClockSec%60, s.VMClockNsec/1e6)
			icount := ""
			if s.ICount != nil {
				icount = fmt.Sprint(*s.ICount)
			}
			fmt.Fprintf(&b, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, humanSize(int64(s.VMStateSize)), date, clock, icount)
		}
	}
	if fs := in.FormatSpecific; fs != nil {
		d := fs.Data
		fmt.Fprintf(&b, "Format specific information:\n")
		fmt.Fprintf(&b, "    compat: %s\n", d.Compat)
		fmt.Fprintf(&b, "    compression type: %s\n", d.CompressionType)
		if d.LazyRefcounts != nil {
			fmt.Fprintf(&b, "    lazy refcounts: %v\n", *d.LazyRefcounts)
		}
		if len(d.Bitmaps) > 0 {
			// Where qemu-img prints them, in its layout.
			fmt.Fprintf(&b, "    bitmaps:\n")
			for i, bm := range d.Bitmaps {
				fmt.Fprintf(&b, "        [%d]:\n            flags:\n", i)
				for j, f := range bm.Flags {
					fmt.Fprintf(&b, "                [%d]: %s\n", j, f)
				}
				fmt.Fprintf(&b, "            name: %s\n            granularity: %d\n", bm.Name, bm.Granularity)
			}
		}
		fmt.Fprintf(&b, "    refcount bits: %d\n", d.RefcountBits)
		if d.DataFile != "" {
			fmt.Fprintf(&b, "    data file: %s\n", d.DataFile)
		}
		if d.DataFileRaw != nil {
			fmt.Fprintf(&b, "    data file raw: %v\n", *d.DataFileRaw)
		}
		if d.Corrupt != nil {
			fmt.Fprintf(&b, "    corrupt: %v\n", *d.Corrupt)
		}
		if d.ExtendedL2 != nil {
			fmt.Fprintf(&b, "    extended l2: %v\n", *d.ExtendedL2)
		}
	}
	if x := in.Extra; x != nil {
		fmt.Fprintf(&b, "krun-core:\n")
		fmt.Fprintf(&b, "    file length: %d\n", x.FileLength)
		fmt.Fprintf(&b, "    features: incompatible %#x, compatible %#x, autoclear %#x\n",
			x.IncompatibleFeatures, x.CompatibleFeatures, x.AutoclearFeatures)
		if x.Encrypted {
			fmt.Fprintf(&b, "    encrypted: true\n")
		}
		if x.Bitmaps > 0 {
			fmt.Fprintf(&b, "    persistent bitmaps: %d\n", x.Bitmaps)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// humanSize renders a byte count with binary units and three significant
// digits, as qemu-img does.
func humanSize(n int64) string {
	// As qemu-img: the next unit once the value reaches 1000 of this one
	// (1000 bytes are 0.977 KiB, 1 MiB less a sector 1 MiB; it printed
	// 1000 B and 1.02e+03 KiB; found in review, helper-92).
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	for i < len(units)-1 && float64(n) >= 1000*float64(uint64(1)<<(10*i)) {
		i++
	}
	return fmt.Sprintf("%.3g %s", float64(n)/float64(uint64(1)<<(10*i)), units[i])
}

// CheckResult is what `img check` reports, in qemu-img's JSON keys.
type CheckResult struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	Leaks              int64  `json:"leaks,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`

	// Supported is false for formats without metadata (raw).
	Supported        bool     `json:"-"`
	RefcountsRebuilt bool     `json:"-"`
	Messages         []string `json:"-"`
}

func newCheckResult(path, format string, r *imagepb.CheckResponse) *CheckResult {
	return &CheckResult{
		Filename: path, Format: format, Supported: r.GetSupported(),
		CheckErrors: r.GetCheckErrors(), Corruptions: r.GetCorruptions(), Leaks: r.GetLeaks(),
		CorruptionsFixed: r.GetCorruptionsFixed(), LeaksFixed: r.GetLeaksFixed(),
		ImageEndOffset: r.GetImageEndOffset(), TotalClusters: r.GetTotalClusters(),
		AllocatedClusters: r.GetAllocatedClusters(), FragmentedClusters: r.GetFragmentedClusters(),
		CompressedClusters: r.GetCompressedClusters(), RefcountsRebuilt: r.GetRefcountsRebuilt(),
		Messages: r.GetMessages(),
	}
}

// Exit statuses of `img check`, as qemu-img check.
const (
	CheckClean       = 0
	CheckFailed      = 1 // the check could not be completed
	CheckCorrupt     = 2
	CheckLeaks       = 3
	CheckUnsupported = 63 // the format has no metadata to check
)

// ExitCode is the exit status qemu-img check would give.
func (c *CheckResult) ExitCode() int {
	switch {
	case !c.Supported:
		return CheckUnsupported
	case c.CheckErrors > 0:
		return CheckFailed
	case c.Corruptions > 0:
		return CheckCorrupt
	case c.Leaks > 0:
		return CheckLeaks
	}
	return CheckClean
}

// WriteJSON writes the result as indented JSON.
func (c *CheckResult) WriteJSON(w io.Writer) error { return writeJSON(w, c) }

// WriteMessages writes one line per finding (a leaked or miscounted
// cluster, a bad entry), which qemu-img check writes on stderr in either
// output format; WriteHuman and WriteJSON write the summary only.
func (c *CheckResult) WriteMessages(w io.Writer) error {
	var b strings.Builder
	for _, m := range c.Messages {
		fmt.Fprintln(&b, m)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteHuman writes the summary the way `qemu-img check` writes it on
// stdout.
func (c *CheckResult) WriteHuman(w io.Writer) error {
	var b strings.Builder
	if !c.Supported {
		fmt.Fprintf(&b, "This image format does not support checks (%s has no metadata)\n", c.Format)
		_, err := io.WriteString(w, b.String())
		return err
	}
	if c.CorruptionsFixed+c.LeaksFixed > 0 || c.RefcountsRebuilt {
		fmt.Fprintf(&b, "The following inconsistencies were found and repaired:\n\n    %d leaked clusters\n    %d corruptions\n\n", c.LeaksFixed, c.CorruptionsFixed)
		if c.RefcountsRebuilt {
			fmt.Fprintf(&b, "The refcount structure was rebuilt.\n")
		}
		fmt.Fprintf(&b, "Double checking the fixed image now...\n")
	}
	if c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0 {
		fmt.Fprintf(&b, "No errors were found on the image.\n")
	}
	if c.Corruptions > 0 {
		fmt.Fprintf(&b, "\n%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", c.Corruptions)
	}
	if c.Leaks > 0 {
		fmt.Fprintf(&b, "\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", c.Leaks)
	}
	if c.CheckErrors > 0 {
		fmt.Fprintf(&b, "\n%d internal errors have occurred during the check.\n", c.CheckErrors)
	}
	if c.TotalClusters > 0 && c.AllocatedClusters > 0 {
		pct := func(n, of int64) float64 {
			if of == 0 {
				return 0
			}
			return 100 * float64(n) / float64(of)
		}
		fmt.Fprintf(&b, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
			c.AllocatedClusters, c.TotalClusters, pct(c.AllocatedClusters, c.TotalClusters),
			pct(c.FragmentedClusters, c.AllocatedClusters), pct(c.CompressedClusters, c.AllocatedClusters))
	}
	if c.ImageEndOffset > 0 {
		fmt.Fprintf(&b, "Image end offset: %d\n", c.ImageEndOffset)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// fullBackingName is the backing file name as qemu-img prints it
// (path_combine): a name with a protocol prefix (a colon before the first
// slash: nbd:, json:, file:) or an absolute one as recorded, otherwise
// pasted after the image's name up to its last slash, neither cleaned
// (sub/../b.raw stays so; found in review, helper-92).
func fullBackingName(image, backing string) string {
	if strings.HasPrefix(backing, "/") {
		return backing
	}
	if i := strings.IndexByte(backing, ':'); i >= 0 && !strings.Contains(backing[:i], "/") {
		return backing
	}
	return image[:strings.LastIndexByte(image, '/')+1] + backing
}
