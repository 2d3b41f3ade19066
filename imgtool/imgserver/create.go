package imgserver

import (
	"errors"
	"fmt"
	"math"
	"os"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// Create writes a new, empty image into out (created empty by the host).
// With a backing file, the file the host opened is checked to be of the
// declared format and, when req.Size is 0, gives the virtual size; the
// image records req.BackingName exactly as the user wrote it.
func Create(out, backing *os.File, req *imagepb.CreateRequest) (*imagepb.CreateResponse, error) {
	format, err := parseFormat(req.GetFormat())
	if err != nil {
		return nil, err
	}
	size := req.GetSize()
	if size < 0 {
		return nil, fmt.Errorf("size %d is negative", size)
	}
	if _, _, err := sizes(out); err != nil {
		return nil, fmt.Errorf("output: %w", err)
	}
	if req.GetBackingName() != "" {
		if format != disk.QCOW2 {
			return nil, errors.New("a raw image has no backing file")
		}
		if backing == nil {
			return nil, errors.New("backing file was not handed over")
		}
		bf, err := parseFormat(req.GetBackingFormat())
		if err != nil {
			return nil, fmt.Errorf("backing %w", err)
		}
		bsize, err := backingSize(backing, bf)
		if err != nil {
			return nil, fmt.Errorf("backing file %q: %w", req.GetBackingName(), err)
		}
		if size == 0 {
			size = bsize
		}
	}
	if size == 0 {
		return nil, errors.New("size is required (no backing file to take it from)")
	}
	switch format {
	case disk.Raw:
		if req.GetClusterSize() != 0 || req.GetCompressionType() != "" {
			return nil, errors.New("cluster size and compression type apply to qcow2 only")
		}
		// Whole sectors, as qcow2's and qemu-img's: a disk plugin serves
		// no partial last sector.
		if size > math.MaxInt64-511 {
			return nil, fmt.Errorf("size %d is too large", size)
		}
		size = (size + 511) &^ 511
		if err := out.Truncate(size); err != nil {
			return nil, err // "truncate PATH: ..." already
		}
	case disk.QCOW2:
		o := qcow2.CreateOptions{
			Size:            size,
			ClusterSize:     req.GetClusterSize(),
			BackingFile:     req.GetBackingName(),
			CompressionType: req.GetCompressionType(),
		}
		if o.BackingFile != "" {
			o.BackingFormat = disk.Format(req.GetBackingFormat())
		}
		if err := qcow2.Create(out, o); err != nil {
			return nil, err
		}
		size = (size + 511) &^ 511
	}
	if err := out.Sync(); err != nil {
		return nil, fmt.Errorf("sync: %w", err)
	}
	return &imagepb.CreateResponse{VirtualSize: size}, nil
}

// backingSize checks that f is an image of format and returns its virtual
// size. Only f's own header is read: its backing file, if any, is not.
func backingSize(f *os.File, format disk.Format) (int64, error) {
	length, _, err := sizes(f)
	if err != nil {
		return 0, err
	}
	if format == disk.Raw {
		return length, nil
	}
	in, err := qcow2.ReadInfo(f)
	if err != nil {
		return 0, fmt.Errorf("not a valid qcow2 image: %w", err)
	}
	return in.VirtualSize, nil
}
