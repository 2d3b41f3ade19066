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

// Resize changes the virtual size of the image in f (handed over
// read-write, under the host's exclusive lock), as qemu-img resize does. A
// raw file is extended sparsely or, with req.Shrink, cut; a qcow2 image
// only grows (qcow2.Resize), over backing, its declared chain (nearest
// first, as the host opened it; req.Path is the image's absolute path,
// against which relative names it records are resolved). Nothing is
// changed when the request is refused. The caller keeps f and the
// backing files.
func Resize(f *os.File, backing []Layer, req *imagepb.ResizeRequest) (*imagepb.ResizeResponse, error) {
	format, err := parseFormat(req.GetFormat())
	if err != nil {
		return nil, err
	}
	if format == disk.Raw && len(backing) > 0 {
		return nil, errors.New("a raw image has no backing file")
	}
	length, _, err := sizes(f)
	if err != nil {
		return nil, err
	}
	switch format {
	case disk.Raw:
		if isBlockDevice(f) {
			return nil, errors.New("a raw block device has the size of the device: resize the device itself")
		}
		size, err := newSize(length, req)
		if err != nil {
			return nil, err
		}
		if size < length && !req.GetShrink() {
			return nil, fmt.Errorf("shrinking from %d to %d bytes discards the data beyond the new end: pass --shrink to shrink", length, size)
		}
		if size != length {
			if err := f.Truncate(size); err != nil {
				return nil, err // "truncate PATH: ..." already
			}
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("sync: %w", err)
		}
		return &imagepb.ResizeResponse{OldSize: length, VirtualSize: size}, nil
	case disk.QCOW2:
		o, err := chainOptions("image", req.GetPath(), backing)
		if err != nil {
			return nil, err
		}
		in, err := qcow2.ReadInfo(f)
		if err != nil {
			return nil, fmt.Errorf("not a valid qcow2 image: %w", err)
		}
		size, err := newSize(in.VirtualSize, req)
		if err != nil {
			return nil, err
		}
		// A smaller size is refused there, with --shrink or without;
		// each of its writes is durable when it returns.
		if err := qcow2.Resize(f, size, o); err != nil {
			return nil, err
		}
		return &imagepb.ResizeResponse{OldSize: in.VirtualSize, VirtualSize: size}, nil
	}
	return nil, fmt.Errorf("format %s cannot be resized", format)
}

// newSize is the requested virtual size: req's size, or with
// req.Relative the current size plus req's size. It is positive and a
// multiple of 512.
func newSize(current int64, req *imagepb.ResizeRequest) (int64, error) {
	size := req.GetSize()
	if req.GetRelative() {
		if size > 0 && current > math.MaxInt64-size {
			return 0, fmt.Errorf("%d + %d bytes overflows", current, size)
		}
		size += current
	}
	if size <= 0 {
		return 0, fmt.Errorf("the new size (%d bytes) must be positive", size)
	}
	if size%512 != 0 {
		return 0, fmt.Errorf("the new size (%d bytes) is not a multiple of 512", size)
	}
	return size, nil
}

func isBlockDevice(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeDevice != 0
}
