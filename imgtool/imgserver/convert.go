package imgserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/imgtool/qcow2out"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// ErrTooLarge is wrapped when import input exceeds its size limit.
var ErrTooLarge = errors.New("input exceeds the size limit")

// Layer is one declared file of an input chain.
type Layer struct {
	File   *os.File
	Format string
	Path   string // absolute host path, compared with recorded names
}

// OutputOptions tune a qcow2 output.
type OutputOptions struct {
	Compress        bool
	ClusterSize     int64
	CompressionType string
}

// ProgressFunc receives the virtual bytes done and the total (0 unknown).
type ProgressFunc func(done, total int64)

// rawZeroBlock is the granularity at which a raw output skips zeroes
// (leaves holes), as `qemu-img convert -S 4k` does.
const rawZeroBlock = 4096

// chunkBytes is how much virtual content is copied per step.
const chunkBytes = 1 << 20

// source is the virtual content of an input image.
type source interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
	// nextData returns the first offset >= off that may hold data, or
	// Size() if none does.
	nextData(off int64) int64
	Close() error
}

// rawSource reads a raw file; holes are found with SEEK_DATA.
type rawSource struct {
	f    *os.File
	size int64
	seek bool
}

// ReadAt reads within Size(), the file's length when the conversion
// began. A file that ends before that shrank meanwhile: what it lost is
// not made up with zeros, which would pass for content.
func (r *rawSource) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.f.ReadAt(p, off)
	if n < len(p) && errors.Is(err, io.EOF) {
		return n, fmt.Errorf("the file ends at %d, short of the %d bytes it had when the conversion began: it shrank while it was read", off+int64(n), r.size)
	}
	return n, err
}
func (r *rawSource) Size() int64  { return r.size }
func (r *rawSource) Close() error { return nil }

func (r *rawSource) nextData(off int64) int64 {
	if !r.seek {
		return off
	}
	d, err := unix.Seek(int(r.f.Fd()), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return r.size
	case err != nil:
		r.seek = false // not supported here: read everything
		return off
	}
	return min(d, r.size)
}

type qcow2Source struct{ *qcow2.Image }

func (q qcow2Source) nextData(off int64) int64 { return off }

// ConvertJob copies an image's virtual content into a new image.
type ConvertJob struct {
	Input        Layer
	Backing      []Layer
	DataFile     *Layer
	Output       *os.File // empty, created by the host
	OutputFormat string
	Out          OutputOptions
	Log          hclog.Logger
}

func (j *ConvertJob) open() (source, error) {
	f, err := parseFormat(j.Input.Format)
	if err != nil {
		return nil, err
	}
	if f == disk.Raw {
		if len(j.Backing) > 0 || j.DataFile != nil {
			return nil, errors.New("a raw image has no backing file or data file")
		}
		size, _, err := sizes(j.Input.File)
		if err != nil {
			return nil, fmt.Errorf("input: %w", err)
		}
		return &rawSource{f: j.Input.File, size: size, seek: true}, nil
	}
	o, err := chainOptions("input", j.Input.Path, j.Backing)
	if err != nil {
		return nil, err
	}
	// Each error fails the conversion and reaches the user: corruption
	// is not logged as well.
	o.ReadOnly, o.Logger, o.CallerReports = true, j.Log, true
	if d := j.DataFile; d != nil {
		if err := checkAbs(d.Path); err != nil {
			return nil, fmt.Errorf("data file: %w", err)
		}
		o.DataFile = &qcow2.Layer{File: d.File, Format: disk.Raw, Path: d.Path}
	}
	im, err := qcow2.Open(j.Input.File, o)
	if err != nil {
		return nil, err
	}
	return qcow2Source{im}, nil
}

// chainOptions is disk/qcow2's view of an image at path (absolute, or ""
// when unknown) with its declared backing chain, nearest first: each
// layer's format parsed and its path checked to be absolute. what names
// the image in errors.
func chainOptions(what, path string, backing []Layer) (qcow2.Options, error) {
	o := qcow2.Options{Path: path}
	for i, b := range backing {
		bf, err := parseFormat(b.Format)
		if err != nil {
			return qcow2.Options{}, fmt.Errorf("backing file %d: %w", i, err)
		}
		if err := checkAbs(b.Path); err != nil {
			return qcow2.Options{}, fmt.Errorf("backing file %d: %w", i, err)
		}
		o.Backing = append(o.Backing, qcow2.Layer{File: b.File, Format: bf, Path: b.Path})
	}
	if err := checkAbs(path); err != nil {
		return qcow2.Options{}, fmt.Errorf("%s: %w", what, err)
	}
	return o, nil
}

func checkAbs(p string) error {
	if p != "" && !filepath.IsAbs(p) {
		return fmt.Errorf("path %q is not absolute", p)
	}
	return nil
}

// Run converts, reporting progress, and returns the final message.
func (j *ConvertJob) Run(ctx context.Context, progress ProgressFunc) (*imagepb.Progress, error) {
	if progress == nil {
		progress = func(int64, int64) {}
	}
	src, err := j.open()
	if err != nil {
		return nil, err
	}
	defer src.Close()
	dst, err := newSink(j.Output, j.OutputFormat, j.Out, src.Size())
	if err != nil {
		return nil, err
	}
	size := src.Size()
	step := dst.chunk()
	buf := make([]byte, step)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		// off is a multiple of step; skipping to the chunk holding the next
		// data keeps it one.
		d := src.nextData(off)
		if d >= size {
			break
		}
		if d > off {
			off = d / step * step
		}
		n := min(step, size-off)
		if _, err := src.ReadAt(buf[:n], off); err != nil {
			return nil, fmt.Errorf("read input at %d: %w", off, err)
		}
		if err := dst.write(buf[:n], off); err != nil {
			return nil, err
		}
		off += n
		progress(off, size)
	}
	if err := dst.finish(size); err != nil {
		return nil, err
	}
	return &imagepb.Progress{Done: size, Total: size, Finished: true, VirtualSize: dst.virtualSize(size), Written: dst.written()}, nil
}

// sink is an output image being written in increasing offsets, in whole
// chunks (the last may be short).
type sink interface {
	chunk() int64
	write(p []byte, off int64) error
	finish(size int64) error
	virtualSize(size int64) int64
	written() int64
}

func newSink(out *os.File, format string, o OutputOptions, size int64) (sink, error) {
	f, err := parseFormat(format)
	if err != nil {
		return nil, fmt.Errorf("output %w", err)
	}
	length, _, err := sizes(out)
	if err != nil {
		return nil, fmt.Errorf("output: %w", err)
	}
	if length != 0 {
		return nil, fmt.Errorf("output is not empty (%d bytes)", length)
	}
	if f == disk.Raw {
		if o.Compress || o.ClusterSize != 0 || o.CompressionType != "" {
			return nil, errors.New("compression and cluster size apply to qcow2 output only")
		}
		if size >= 0 {
			// The file system must take a file of that size (found
			// now, not after the data was written); the output then
			// grows with the data and gets its length at finish, so
			// that a convert killed mid-way leaves a file shorter
			// than the image, not one that looks complete.
			if err := out.Truncate(size); err != nil {
				return nil, fmt.Errorf("output: %w", err)
			}
			if err := out.Truncate(0); err != nil {
				return nil, fmt.Errorf("output: %w", err)
			}
		}
		return &rawSink{f: out}, nil
	}
	if cs := o.ClusterSize; cs != 0 && (cs < 512 || cs > 2<<20 || cs&(cs-1) != 0) {
		// Named before the size check, which cannot judge a size
		// against an invalid cluster size.
		return nil, fmt.Errorf("cluster size %d must be a power of two from 512 to 2 MiB", cs)
	}
	if size > 0 && size > qcow2out.MaxVirtualSize(o.ClusterSize) {
		return nil, fmt.Errorf("virtual size %d is too large for qcow2 with this cluster size (at most %d; use a larger --cluster-size)",
			size, qcow2out.MaxVirtualSize(o.ClusterSize))
	}
	w, err := qcow2out.New(out, qcow2out.Options{ClusterSize: o.ClusterSize, Compress: o.Compress, CompressionType: o.CompressionType})
	if err != nil {
		return nil, err
	}
	return &qcow2Sink{w: w, f: out}, nil
}

type rawSink struct {
	f *os.File
	n int64
}

func (r *rawSink) chunk() int64 { return chunkBytes }

// write stores the non-zero 4 KiB blocks of p; zero blocks stay holes of
// the (new, truncated) file.
func (r *rawSink) write(p []byte, off int64) error {
	zero := func(i int) bool { return qcow2out.IsZero(p[i:min(i+rawZeroBlock, len(p))]) }
	for i := 0; i < len(p); {
		for i < len(p) && zero(i) {
			i += rawZeroBlock
		}
		if i >= len(p) {
			break
		}
		j := i
		for j < len(p) && !zero(j) {
			j += rawZeroBlock
		}
		j = min(j, len(p))
		if _, err := r.f.WriteAt(p[i:j], off+int64(i)); err != nil {
			return roleErr("write output", err)
		}
		r.n += int64(j - i)
		i = j
	}
	return nil
}

func (r *rawSink) finish(size int64) error {
	if err := r.f.Truncate(size); err != nil {
		return fmt.Errorf("output: truncate: %w", err)
	}
	if err := r.f.Sync(); err != nil {
		return fmt.Errorf("output: sync: %w", err)
	}
	return nil
}

func (r *rawSink) virtualSize(size int64) int64 { return size }
func (r *rawSink) written() int64               { return r.n }

type qcow2Sink struct {
	w *qcow2out.Writer
	f *os.File
}

func (q *qcow2Sink) chunk() int64 { return max(chunkBytes, q.w.ClusterSize()) }

func (q *qcow2Sink) write(p []byte, off int64) error {
	cs := q.w.ClusterSize()
	for i := int64(0); i < int64(len(p)); i += cs {
		if err := q.w.WriteCluster(uint64((off+i)/cs), p[i:min(i+cs, int64(len(p)))]); err != nil {
			return roleErr("write output", err)
		}
	}
	return nil
}

func (q *qcow2Sink) finish(size int64) error {
	if err := q.w.Finish(size); err != nil {
		return roleErr("write output", err)
	}
	if err := q.f.Sync(); err != nil {
		return fmt.Errorf("output: sync: %w", err)
	}
	return nil
}

func (q *qcow2Sink) virtualSize(size int64) int64 { return (size + 511) &^ 511 }
func (q *qcow2Sink) written() int64               { return q.w.Written() }

// ImportJob streams raw virtual content from Input into a new image.
type ImportJob struct {
	Input        io.Reader
	InputFormat  string
	Output       *os.File
	OutputFormat string
	MaxSize      int64
	Out          OutputOptions
}

// Run imports, reporting progress (total 0: unknown), and returns the
// final message. More than MaxSize bytes of input is an error wrapping
// ErrTooLarge; no more than MaxSize+1 bytes are read.
func (j *ImportJob) Run(ctx context.Context, progress ProgressFunc) (*imagepb.Progress, error) {
	if progress == nil {
		progress = func(int64, int64) {}
	}
	if f, err := parseFormat(j.InputFormat); err != nil {
		return nil, fmt.Errorf("input %w", err)
	} else if f != disk.Raw {
		return nil, fmt.Errorf("input format %s: only raw content can be streamed (a qcow2 image is not read sequentially)", f)
	}
	if j.MaxSize <= 0 {
		return nil, errors.New("a positive size limit is required")
	}
	dst, err := newSink(j.Output, j.OutputFormat, j.Out, -1)
	if err != nil {
		return nil, err
	}
	if qs, ok := dst.(*qcow2Sink); ok && j.MaxSize > qcow2out.MaxVirtualSize(qs.w.ClusterSize()) {
		return nil, fmt.Errorf("size limit %d is too large for qcow2 with this cluster size (at most %d; use a larger --cluster-size)",
			j.MaxSize, qcow2out.MaxVirtualSize(qs.w.ClusterSize()))
	}
	// The limit is on the image's virtual size, as img verify's: a qcow2
	// image's rounds the content up to whole sectors.
	limit := j.MaxSize
	if _, ok := dst.(*qcow2Sink); ok {
		limit &^= 511
	}
	in := io.LimitReader(j.Input, limit+1)
	step := dst.chunk()
	buf := make([]byte, step)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n, err := io.ReadFull(in, buf)
		if total+int64(n) > limit {
			if limit != j.MaxSize {
				return nil, fmt.Errorf("%w: more than %d bytes (a qcow2 image's size is whole 512-byte sectors, and %d rounds down to that)", ErrTooLarge, limit, j.MaxSize)
			}
			return nil, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, j.MaxSize)
		}
		if n > 0 {
			if werr := dst.write(buf[:n], total); werr != nil {
				return nil, werr
			}
			total += int64(n)
			progress(total, 0)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return nil, roleErr("read input", err)
		}
	}
	if err := dst.finish(total); err != nil {
		return nil, err
	}
	return &imagepb.Progress{Done: total, Finished: true, VirtualSize: dst.virtualSize(total), Written: dst.written()}, nil
}

// roleErr wraps err with what was done (op), unless err names it already:
// the plugin's files are named after their role ("output", "input"), so
// an error of the file itself reads "write output: no space left on
// device", which a wrapper would repeat.
func roleErr(op string, err error) error {
	if strings.Contains(err.Error(), op+": ") {
		return err
	}
	return fmt.Errorf("%s: %w", op, err)
}
