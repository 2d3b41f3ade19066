// Package imgtool is the host side of `krun-core img`: it opens the files a
// command needs, starts the sandboxed image plugin (krun-plugin-img) with
// them as inherited fds, runs the operation over the ImageTool gRPC service
// (proto/imagepb) and renders the results, in qemu-img's JSON key names
// where both report the same thing.
//
// Nothing here parses an image byte: every header, table and data cluster
// is read inside the plugin, which is confined before it reads anything.
// The host opens only what the user named: the image, an output it creates
// (never overwriting), the backing files and data file the user declared,
// and stdin for import. A backing file an image merely records is never
// opened; for `verify --backing-dir` the host resolves and stats the
// recorded name without opening it.
package imgtool

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// Progress reports convert and import progress: virtual bytes done and
// the total (0 when unknown).
type Progress func(done, total int64)

// Result is what convert and import produced.
type Result struct {
	VirtualSize int64 // of the output
	Written     int64 // data bytes stored (zero blocks are skipped)
}

func checkFormat(what, f string) (disk.Format, error) {
	format, err := disk.ParseFormat(f)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	return format, nil
}

// ProbeResult is a guessed format.
type ProbeResult struct {
	Format    string
	Supported bool // krun-core serves it (raw, qcow2)
	Detail    string
}

// Probe guesses the format of path, in the plugin.
func (l *Launcher) Probe(ctx context.Context, path string) (*ProbeResult, error) {
	s, done, err := l.startOnImage(ctx, path, l.readMode())
	if err != nil {
		return nil, err
	}
	defer done()
	var r *imagepb.ProbeResponse
	err = s.call(ctx, "Probe", func(ctx context.Context) (err error) {
		r, err = s.rpc.Probe(ctx, &imagepb.ProbeRequest{File: "image"})
		return err
	})
	if err != nil {
		return nil, err
	}
	return &ProbeResult{Format: r.GetFormat(), Supported: r.GetSupported(), Detail: r.GetDetail()}, nil
}

// Info reads an image's facts in the plugin. Nothing the image names is
// opened, by the plugin or here.
func (l *Launcher) Info(ctx context.Context, path, format string) (*Info, error) {
	if _, err := checkFormat("--format", format); err != nil {
		return nil, err
	}
	s, done, err := l.startOnImage(ctx, path, l.readMode())
	if err != nil {
		return nil, err
	}
	defer done()
	var r *imagepb.InfoResponse
	err = s.call(ctx, "Info", func(ctx context.Context) (err error) {
		r, err = s.rpc.Info(ctx, &imagepb.InfoRequest{File: "image", Format: format})
		return err
	})
	if err != nil {
		return nil, err
	}
	return newInfo(path, r), nil
}

// Repair selects what Check fixes.
type Repair int

// Repair modes, as `qemu-img check -r`.
const (
	RepairNone Repair = iota
	RepairLeaks
	RepairAll
)

// ParseRepair parses --repair's value: leaks or all.
func ParseRepair(s string) (Repair, error) {
	switch s {
	case "leaks":
		return RepairLeaks, nil
	case "all":
		return RepairAll, nil
	}
	return 0, fmt.Errorf("--repair %q: want leaks or all", s)
}

// Check checks an image's metadata in the plugin; with a repair mode the
// image is opened read-write and the plugin fixes what it reports.
func (l *Launcher) Check(ctx context.Context, path, format string, repair Repair) (*CheckResult, error) {
	if _, err := checkFormat("--format", format); err != nil {
		return nil, err
	}
	mode := l.readMode()
	if repair != RepairNone {
		if l.ForceShare {
			return nil, errors.New("--force-share is for read-only opens; --repair writes the image")
		}
		mode = imagelock.ReadWrite
	}
	s, done, err := l.startOnImage(ctx, path, mode)
	if err != nil {
		return nil, err
	}
	defer done()
	var r *imagepb.CheckResponse
	err = s.call(ctx, "Check", func(ctx context.Context) (err error) {
		r, err = s.rpc.Check(ctx, &imagepb.CheckRequest{File: "image", Format: format, Repair: imagepb.Repair(repair)})
		return err
	})
	if err != nil {
		return nil, err
	}
	return newCheckResult(path, format, r), nil
}

// ResizeOptions describe a change of an image's virtual size.
type ResizeOptions struct {
	Format string // raw or qcow2; never guessed
	// Size is the new virtual size or, with Relative, the change to the
	// current one (negative to shrink).
	Size     int64
	Relative bool
	// Shrink allows a smaller size (raw; a qcow2 image only grows).
	Shrink bool
	// Backing is a qcow2 image's declared chain, nearest first (as
	// convert's): an image with a backing file grows only with it.
	Backing []Backing
}

// ResizeResult is an image's virtual size before and after a resize.
type ResizeResult struct {
	OldSize, VirtualSize int64
}

// Resize changes the virtual size of the image at path in place, as
// qemu-img resize does. The image is opened read-write under the exclusive
// lock (as check --repair), so an image anyone uses is refused; its
// declared backing files are opened read-only under the read lock, as
// convert's. The current size is read and the image changed in the
// plugin.
func (l *Launcher) Resize(ctx context.Context, path string, o ResizeOptions) (*ResizeResult, error) {
	format, err := checkFormat("--format", o.Format)
	if err != nil {
		return nil, err
	}
	if format == disk.Raw && len(o.Backing) > 0 {
		return nil, errors.New("--backing needs --format qcow2 (a raw image has no backing file)")
	}
	for _, b := range o.Backing {
		if _, err := checkFormat("--backing-format", b.Format); err != nil {
			return nil, err
		}
	}
	if l.ForceShare {
		return nil, errors.New("--force-share is for read-only opens; resize writes the image")
	}
	if !o.Relative { // a relative size is checked once added, in the plugin
		if o.Size <= 0 {
			return nil, fmt.Errorf("the new size (%d bytes) must be positive", o.Size)
		}
		if o.Size%512 != 0 {
			return nil, fmt.Errorf("the new size (%d bytes) is not a multiple of 512", o.Size)
		}
	}
	abs, err := absPath(path)
	if err != nil {
		return nil, err
	}
	req := &imagepb.ResizeRequest{File: "image", Format: o.Format, Size: o.Size, Relative: o.Relative,
		Shrink: o.Shrink, Path: abs}
	f, err := openImage("image", path, imagelock.ReadWrite)
	if err != nil {
		return nil, err
	}
	files := []file{{"image", f}}
	defer func() {
		for _, f := range files {
			f.f.Close()
		}
	}()
	if req.Backing, err = l.openBacking(&files, o.Backing); err != nil {
		return nil, err
	}
	s, err := l.start(ctx, files)
	if err != nil {
		return nil, err
	}
	defer s.close()
	var r *imagepb.ResizeResponse
	err = s.call(ctx, "Resize", func(ctx context.Context) (err error) {
		r, err = s.rpc.Resize(ctx, req)
		return err
	})
	if err != nil {
		return nil, chainFlags(err)
	}
	return &ResizeResult{OldSize: r.GetOldSize(), VirtualSize: r.GetVirtualSize()}, nil
}

// openLayer opens a declared file (an input, a backing file, a data file)
// at path read-only under the reader lock (l.readMode), adds it to files
// as name, and returns it as a request's layer, with its absolute path.
func (l *Launcher) openLayer(files *[]file, what, name, path, format string) (*imagepb.Layer, error) {
	abs, err := absPath(path)
	if err != nil {
		return nil, err
	}
	// A file declared twice (an image as its own backing file) would
	// otherwise be refused by its own lock, as if another process held it.
	if other := sameFile(*files, abs); other != "" {
		return nil, fmt.Errorf("%s %s is the same file as the %s", what, path, other)
	}
	f, err := openImage(what, abs, l.readMode())
	if err != nil {
		return nil, err
	}
	*files = append(*files, file{name, f})
	return &imagepb.Layer{File: name, Format: format, Path: abs}, nil
}

// sameFile returns the role of the file in files that path names too
// ("image", "backing file 0", ...), or "".
func sameFile(files []file, path string) string {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return "" // opening it says why
	}
	for _, f := range files {
		var fst unix.Stat_t
		if unix.Fstat(int(f.f.Fd()), &fst) == nil && fst.Dev == st.Dev && fst.Ino == st.Ino {
			role := f.name
			if n, ok := strings.CutPrefix(role, "backing."); ok {
				role = "backing file " + n
			}
			return role
		}
	}
	return ""
}

// openBacking opens a declared backing chain, nearest first, as files
// backing.0, backing.1, ... (openLayer), each format checked first.
func (l *Launcher) openBacking(files *[]file, chain []Backing) ([]*imagepb.Layer, error) {
	var out []*imagepb.Layer
	for i, b := range chain {
		if _, err := checkFormat("--backing-format", b.Format); err != nil {
			return nil, err
		}
		bl, err := l.openLayer(files, "backing file", "backing."+strconv.Itoa(i), b.Path, b.Format)
		if err != nil {
			return nil, err
		}
		out = append(out, bl)
	}
	return out, nil
}

// chainWords rewords disk/qcow2's backing chain errors, which name
// --disk's options (backing=, data-file=), in img's flags.
var chainWords = strings.NewReplacer(
	"(add backing=...)", "(declare it with --backing FILE --backing-format FMT)",
	"(add data-file=...)", "(declare it with --data-file FILE)",
	"backing=", "--backing ",
	"data-file=", "--data-file ")

// chainFlags returns err with an operation's message (*OpError) reworded
// by chainWords.
func chainFlags(err error) error {
	var oe *OpError
	if errors.As(err, &oe) {
		oe.Msg = chainWords.Replace(oe.Msg)
	}
	return err
}

// CreateOptions describe a new image.
type CreateOptions struct {
	Format          string // raw or qcow2
	Size            int64  // 0: the backing file's virtual size
	ClusterSize     int64
	CompressionType string
	// Backing is recorded in the image exactly as given; a relative name
	// is relative to the new image's directory. The host opens it
	// read-only so the plugin can check its format (and take its size).
	Backing       string
	BackingFormat string
}

// Create makes a new image at path, which must not exist. It returns the
// virtual size.
func (l *Launcher) Create(ctx context.Context, path string, o CreateOptions) (_ int64, err error) {
	format, err := checkFormat("--format", o.Format)
	if err != nil {
		return 0, err
	}
	files := []file{}
	if o.Backing != "" {
		if format != disk.QCOW2 {
			return 0, errors.New("--backing needs --format qcow2 (a raw image has no backing file)")
		}
		if _, err := checkFormat("--backing-format", o.BackingFormat); err != nil {
			return 0, err
		}
		bp := o.Backing
		if !filepath.IsAbs(bp) {
			bp = filepath.Join(filepath.Dir(path), bp)
		}
		bf, err := openImage("backing file", bp, l.readMode())
		if err != nil {
			return 0, err
		}
		defer bf.Close()
		files = append(files, file{"backing", bf})
	} else if o.BackingFormat != "" {
		return 0, errors.New("--backing-format needs --backing")
	}
	if o.Size == 0 && o.Backing == "" {
		return 0, errors.New("--size is required (or --backing to take the size from)")
	}
	out, err := createOutput(path)
	if err != nil {
		return 0, err
	}
	defer func() {
		if err != nil {
			out.remove()
		} else {
			err = out.f.Close()
		}
	}()
	files = append(files, file{"output", out.f})
	s, err := l.start(ctx, files)
	if err != nil {
		return 0, err
	}
	defer s.close()
	req := &imagepb.CreateRequest{Output: "output", Format: o.Format, Size: o.Size, ClusterSize: o.ClusterSize,
		CompressionType: o.CompressionType, BackingName: o.Backing, BackingFormat: o.BackingFormat}
	if o.Backing != "" {
		req.BackingFile = "backing"
	}
	var r *imagepb.CreateResponse
	err = s.call(ctx, "Create", func(ctx context.Context) (err error) {
		r, err = s.rpc.Create(ctx, req)
		return err
	})
	if err != nil {
		return 0, err
	}
	return r.GetVirtualSize(), nil
}

// Backing is one declared backing file of an input image.
type Backing struct {
	Path   string
	Format string
}

// ConvertOptions describe a conversion.
type ConvertOptions struct {
	Input  string
	Format string
	// Backing is the input's declared chain, nearest first (as --disk's
	// backing=); DataFile its declared external data file.
	Backing  []Backing
	DataFile string

	Output       string // must not exist
	OutputFormat string
	Compress     bool
	ClusterSize  int64
	// CompressionType is recorded in a qcow2 output (zlib or zstd).
	CompressionType string
}

// Convert copies the input's virtual content (flattening its declared
// chain) into a new image. The output is removed when anything fails.
func (l *Launcher) Convert(ctx context.Context, o ConvertOptions, progress Progress) (_ *Result, err error) {
	if _, err := checkFormat("--format", o.Format); err != nil {
		return nil, err
	}
	outFormat, err := checkFormat("-O", o.OutputFormat)
	if err != nil {
		return nil, err
	}
	if outFormat == disk.Raw && (o.Compress || o.ClusterSize != 0 || o.CompressionType != "") {
		return nil, errors.New("--compress, --cluster-size and --compression need -O qcow2")
	}
	if o.Format == string(disk.Raw) && (len(o.Backing) > 0 || o.DataFile != "") {
		return nil, errors.New("--backing and --data-file need --format qcow2 (a raw image has neither)")
	}
	var files []file
	defer func() {
		for _, f := range files {
			if f.name != "output" {
				f.f.Close()
			}
		}
	}()
	req := &imagepb.ConvertRequest{OutputFormat: o.OutputFormat, Compress: o.Compress,
		ClusterSize: o.ClusterSize, CompressionType: o.CompressionType, Output: "output"}
	if req.Input, err = l.openLayer(&files, "input", "input", o.Input, o.Format); err != nil {
		return nil, err
	}
	if req.Backing, err = l.openBacking(&files, o.Backing); err != nil {
		return nil, err
	}
	if o.DataFile != "" {
		if req.DataFile, err = l.openLayer(&files, "data file", "data-file", o.DataFile, string(disk.Raw)); err != nil {
			return nil, err
		}
	}
	out, err := createOutput(o.Output)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			out.remove()
		} else {
			err = out.f.Close()
		}
	}()
	files = append(files, file{"output", out.f})
	s, err := l.start(ctx, files)
	if err != nil {
		return nil, err
	}
	defer s.close()
	var last *imagepb.Progress
	err = s.call(ctx, "Convert", func(ctx context.Context) error {
		st, err := s.rpc.Convert(ctx, req)
		if err != nil {
			return err
		}
		last, err = drain(st, progress)
		return err
	})
	if err != nil {
		return nil, chainFlags(err)
	}
	return &Result{VirtualSize: last.GetVirtualSize(), Written: last.GetWritten()}, nil
}

// drain reads a progress stream to its end and returns the final message.
func drain(st interface {
	Recv() (*imagepb.Progress, error)
}, progress Progress) (*imagepb.Progress, error) {
	for {
		p, err := st.Recv()
		if err != nil {
			return nil, err
		}
		if p.GetFinished() {
			if progress != nil {
				progress(p.GetDone(), p.GetTotal())
			}
			// The server ends the stream after the final message.
			if _, err := st.Recv(); err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			return p, nil
		}
		if progress != nil {
			progress(p.GetDone(), p.GetTotal())
		}
	}
}

// ImportOptions describe an import.
type ImportOptions struct {
	Input        *os.File // a pipe, stdin, or any readable file
	InputFormat  string   // raw
	Output       string   // must not exist
	OutputFormat string
	MaxSize      int64 // required; more input than this fails
	Compress     bool
	ClusterSize  int64
	// CompressionType is recorded in a qcow2 output (zlib or zstd).
	CompressionType string
}

// ErrTooLarge is wrapped when import input exceeds ImportOptions.MaxSize.
var ErrTooLarge = errors.New("input exceeds --max-size")

// ErrEmptyInput is import's error for input that ends before its first
// byte: an image of size 0 is never what an upload meant (a download that
// failed in a pipe, `curl URL | krun-core img import ...`), and `img
// create` refuses size 0 too.
var ErrEmptyInput = errors.New("the input is empty (0 bytes): no image made")

// Import streams the input's bytes into a new image, which is removed when
// anything fails, the size limit included.
func (l *Launcher) Import(ctx context.Context, o ImportOptions, progress Progress) (_ *Result, err error) {
	if in, err := checkFormat("--from-format", o.InputFormat); err != nil {
		return nil, err
	} else if in != disk.Raw {
		return nil, errors.New("--from-format: only raw content can be streamed")
	}
	outFormat, err := checkFormat("--format", o.OutputFormat)
	if err != nil {
		return nil, err
	}
	if outFormat == disk.Raw && (o.Compress || o.ClusterSize != 0 || o.CompressionType != "") {
		return nil, errors.New("--compress, --cluster-size and --compression need --format qcow2")
	}
	if o.MaxSize <= 0 {
		return nil, errors.New("--max-size is required")
	}
	if o.Input == nil {
		return nil, errors.New("no input")
	}
	// A directory (`img import ... OUT < DIR`) cannot be read: refused
	// here, before OUT is made and the plugin is handed a directory
	// (which also logged a warning about its ids writing to it).
	if st, err := o.Input.Stat(); err == nil && st.IsDir() {
		return nil, errors.New("the input (stdin) is a directory, not the image's content")
	}
	out, err := createOutput(o.Output)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			out.remove()
		} else {
			err = out.f.Close()
		}
	}()
	s, err := l.start(ctx, []file{{"input", o.Input}, {"output", out.f}})
	if err != nil {
		return nil, err
	}
	defer s.close()
	req := &imagepb.ImportRequest{Input: "input", InputFormat: o.InputFormat, Output: "output", OutputFormat: o.OutputFormat,
		MaxSize: o.MaxSize, Compress: o.Compress, ClusterSize: o.ClusterSize, CompressionType: o.CompressionType}
	var last *imagepb.Progress
	err = s.call(ctx, "Import", func(ctx context.Context) error {
		st, err := s.rpc.Import(ctx, req)
		if err != nil {
			return err
		}
		last, err = drain(st, progress)
		return err
	})
	var oe *OpError
	if errors.As(err, &oe) && oe.Code == codeTooLarge {
		return nil, fmt.Errorf("%w (%d bytes)", ErrTooLarge, o.MaxSize)
	}
	if err != nil {
		return nil, err
	}
	if last.GetVirtualSize() == 0 {
		return nil, ErrEmptyInput // the output goes (deferred)
	}
	return &Result{VirtualSize: last.GetVirtualSize(), Written: last.GetWritten()}, nil
}

// readMode is how the launcher opens (and locks) a file it only reads.
func (l *Launcher) readMode() imagelock.Mode {
	if l.ForceShare {
		return imagelock.ForceShare
	}
	return imagelock.ReadOnly
}

// startOnImage opens the image at path (read-write for imagelock.ReadWrite)
// and starts the plugin with it as "image". done closes the session and the
// file.
func (l *Launcher) startOnImage(ctx context.Context, path string, mode imagelock.Mode) (s *session, done func(), err error) {
	f, err := openImage("image", path, mode)
	if err != nil {
		return nil, nil, err
	}
	s, err = l.start(ctx, []file{{"image", f}})
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return s, func() { s.close(); f.Close() }, nil
}
