package imgserver

import (
	"errors"
	"fmt"
	"os"
	"strings"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// parseFormat validates a format the host passed on from the user.
func parseFormat(s string) (disk.Format, error) {
	f, err := disk.ParseFormat(s)
	if err != nil {
		return "", fmt.Errorf("format: %w", err)
	}
	return f, nil
}

// sizes returns a file's length (a block device's size) and the bytes it
// occupies on disk.
func sizes(f *os.File) (length, actual int64, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, 0, fmt.Errorf("stat: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return st.Size, st.Blocks * 512, nil
	case unix.S_IFBLK:
		n, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_END)
		if err != nil {
			return 0, 0, fmt.Errorf("block device size: %w", err)
		}
		return n, 0, nil
	}
	return 0, 0, errors.New("not a regular file or block device")
}

// Info reads what `img info` shows. For qcow2 only the header, its
// extensions and the snapshot table are read; nothing the image names is
// opened (the plugin could not: it has no file system access).
func Info(f *os.File, format string) (*imagepb.InfoResponse, error) {
	fmtName, err := parseFormat(format)
	if err != nil {
		return nil, err
	}
	length, actual, err := sizes(f)
	if err != nil {
		return nil, err
	}
	if fmtName == disk.Raw {
		return &imagepb.InfoResponse{Format: string(disk.Raw), VirtualSize: length, ActualSize: actual, FileSize: length}, nil
	}
	in, err := qcow2.ReadInfo(f)
	if err != nil {
		return nil, err
	}
	r := infoResponse(in)
	r.ActualSize = actual
	r.FileSize = length
	return r, nil
}

func infoResponse(in qcow2.Info) *imagepb.InfoResponse {
	r := &imagepb.InfoResponse{
		Format:               string(disk.QCOW2),
		VirtualSize:          in.VirtualSize,
		ClusterSize:          in.ClusterSize,
		Version:              uint32(in.Version),
		RefcountBits:         uint32(in.RefcountBits),
		BackingFile:          in.BackingFile,
		BackingFormat:        in.BackingFormat,
		DataFile:             in.DataFile,
		DataFileRaw:          in.DataFileRaw,
		ExternalData:         in.ExternalData,
		Encrypted:            in.Encrypted,
		CompressionType:      in.CompressionType,
		ExtendedL2:           in.ExtendedL2,
		LazyRefcounts:        in.LazyRefcounts,
		Dirty:                in.Dirty,
		Corrupt:              in.Corrupt,
		Bitmaps:              uint32(in.Bitmaps),
		IncompatibleFeatures: in.IncompatibleFeatures,
		CompatibleFeatures:   in.CompatibleFeatures,
		AutoclearFeatures:    in.AutoclearFeatures,
	}
	for _, fn := range in.FeatureNames {
		r.FeatureNames = append(r.FeatureNames, &imagepb.FeatureName{Type: uint32(fn.Type), Bit: uint32(fn.Bit), Name: fn.Name})
	}
	for _, b := range in.BitmapList {
		r.BitmapList = append(r.BitmapList, &imagepb.Bitmap{Name: b.Name, Granularity: b.Granularity, InUse: b.InUse, Auto: b.Auto})
	}
	for _, s := range in.Snapshots {
		ps := &imagepb.Snapshot{
			Id: s.ID, Name: s.Name, VmClockNsec: uint64(s.VMClock.Nanoseconds()),
			VmStateSize: s.VMStateSize, Icount: s.ICount, DiskSize: s.DiskSize,
		}
		if !s.Date.IsZero() {
			ps.DateSec, ps.DateNsec = s.Date.Unix(), int64(s.Date.Nanosecond())
		}
		r.Snapshots = append(r.Snapshots, ps)
	}
	return r
}

// Check checks a qcow2 image's metadata (raw has none: Supported false).
func Check(f *os.File, format string, repair imagepb.Repair) (*imagepb.CheckResponse, error) {
	fmtName, err := parseFormat(format)
	if err != nil {
		return nil, err
	}
	if _, _, err := sizes(f); err != nil {
		return nil, err
	}
	if fmtName == disk.Raw {
		return &imagepb.CheckResponse{Supported: false}, nil
	}
	mode := qcow2.RepairNone
	switch repair {
	case imagepb.Repair_REPAIR_NONE:
	case imagepb.Repair_REPAIR_LEAKS:
		mode = qcow2.RepairLeaks
	case imagepb.Repair_REPAIR_ALL:
		mode = qcow2.RepairAll
	default:
		return nil, fmt.Errorf("unknown repair mode %d", repair)
	}
	res, err := qcow2.Check(f, mode)
	if err != nil {
		return nil, err
	}
	if mode != qcow2.RepairNone {
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("sync: %w", err)
		}
	}
	return &imagepb.CheckResponse{
		Supported:          true,
		Corruptions:        int64(res.Corruptions),
		Leaks:              int64(res.Leaks),
		CheckErrors:        int64(res.CheckErrors),
		CorruptionsFixed:   int64(res.CorruptionsFixed),
		LeaksFixed:         int64(res.LeaksFixed),
		RefcountsRebuilt:   res.RefcountsRebuilt,
		ImageEndOffset:     res.ImageEndOffset,
		TotalClusters:      res.TotalClusters,
		AllocatedClusters:  res.AllocatedClusters,
		FragmentedClusters: res.FragmentedClusters,
		CompressedClusters: res.CompressedClusters,
		Messages:           res.Messages,
	}, nil
}

// Verify says whether f is a valid image of format: for raw any regular
// file or block device (whatever its first bytes look like); for qcow2 a
// header and snapshot table that parse, no encryption, no external data
// file, neither the corrupt nor the dirty bit, no corruption in the
// metadata (leaked clusters are allowed: they only waste space), no L2
// table named by two active L1 entries (a read-write open refuses it)
// and, for an image without a backing file, an Open of the whole image
// that succeeds.
// Policies on size and backing file are the host's, on the returned info.
func Verify(f *os.File, format string, log hclog.Logger) (*imagepb.VerifyResponse, error) {
	fmtName, err := parseFormat(format)
	if err != nil {
		return nil, err
	}
	length, actual, err := sizes(f)
	if err != nil {
		return &imagepb.VerifyResponse{Violation: err.Error()}, nil
	}
	if fmtName == disk.Raw {
		return &imagepb.VerifyResponse{Info: &imagepb.InfoResponse{
			Format: string(disk.Raw), VirtualSize: length, ActualSize: actual, FileSize: length,
		}}, nil
	}
	bad := func(info *imagepb.InfoResponse, format string, a ...any) (*imagepb.VerifyResponse, error) {
		return &imagepb.VerifyResponse{Violation: fmt.Sprintf(format, a...), Info: info}, nil
	}
	in, err := qcow2.ReadInfo(f)
	if err != nil {
		return bad(nil, "not a valid qcow2 image: %s", oneLine(err))
	}
	info := infoResponse(in)
	info.ActualSize, info.FileSize = actual, length
	switch {
	case in.Encrypted:
		return bad(info, "encrypted qcow2 images are not supported")
	case in.ExternalData:
		return bad(info, "the image keeps its data in an external data file (%q)", in.DataFile)
	case in.Corrupt:
		return bad(info, "the image is marked corrupt")
	case in.Dirty:
		return bad(info, "the image is marked dirty (not closed cleanly); repair it with img check --repair all first")
	}
	res, err := qcow2.Check(f, qcow2.RepairNone)
	if err != nil {
		return bad(info, "metadata check failed: %s", oneLine(err))
	}
	if n := res.Corruptions + res.CheckErrors; n > 0 {
		first := ""
		for _, m := range res.Messages {
			if !strings.HasPrefix(m, "Leaked") && !strings.HasPrefix(m, "leaked") {
				first = ": " + m
				break
			}
		}
		return bad(info, "%d corruption(s) in the metadata%s", n, first)
	}
	if res.SharedL2Tables > 0 {
		return bad(info, "%d L2 table(s) named by more than one entry of the active L1 table: the disk plugin does not write to such an image (img convert makes a copy without)", res.SharedL2Tables)
	}
	if in.BackingFile == "" {
		d, err := dupFile(f)
		if err != nil {
			return nil, err
		}
		im, err := qcow2.Open(d, qcow2.Options{ReadOnly: true, Logger: log})
		if err != nil {
			d.Close()
			return bad(info, "open: %s", oneLine(err))
		}
		im.Close()
	}
	return &imagepb.VerifyResponse{Info: info}, nil
}

// dupFile returns a second handle on f (F_DUPFD_CLOEXEC; dup itself is
// not in the sandbox's system call list), for code that closes what it is
// given.
func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

func oneLine(err error) string {
	s := err.Error()
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		s = s[:i]
	}
	return s
}
