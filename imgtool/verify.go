package imgtool

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc/codes"

	"github.com/krun-core/krun-core/proto/imagepb"
)

// codeTooLarge is the gRPC code the plugin uses for input over the limit.
const codeTooLarge = codes.ResourceExhausted

// Policy is what `img verify` demands of an image beyond validity.
type Policy struct {
	// NoBacking refuses any backing file.
	NoBacking bool
	// BackingDir, if set, requires the backing file the image records to
	// lie inside this directory (see CheckBacking).
	BackingDir string
	// MaxSize, if positive, caps the virtual size in bytes.
	MaxSize int64
}

// Validate rejects contradictory policies.
func (p Policy) Validate() error {
	if p.NoBacking && p.BackingDir != "" {
		return errors.New("--no-backing and --backing-dir contradict each other")
	}
	if p.MaxSize < 0 {
		return errors.New("--max-size must be positive")
	}
	if p.BackingDir != "" {
		st, err := os.Stat(p.BackingDir)
		if err != nil {
			return fmt.Errorf("--backing-dir: %w", err)
		}
		if !st.IsDir() {
			return fmt.Errorf("--backing-dir %s is not a directory", p.BackingDir)
		}
	}
	return nil
}

// Verdict is verify's answer: Violation is "" for an image that passes.
type Verdict struct {
	Violation string
	Info      *Info // nil when the file was not an image of the format
}

// Verify checks that path is a valid image of format (in the plugin) and
// meets every policy (here, on the facts the plugin reported). The first
// violation found is returned; err is for failures to check at all.
func (l *Launcher) Verify(ctx context.Context, path, format string, p Policy) (*Verdict, error) {
	if _, err := checkFormat("--format", format); err != nil {
		return nil, err
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	s, done, err := l.startOnImage(ctx, path, l.readMode())
	if err != nil {
		return nil, err
	}
	defer done()
	var r *imagepb.VerifyResponse
	err = s.call(ctx, "Verify", func(ctx context.Context) (err error) {
		r, err = s.rpc.Verify(ctx, &imagepb.VerifyRequest{File: "image", Format: format})
		return err
	})
	if err != nil {
		return nil, err
	}
	v := &Verdict{Violation: r.GetViolation()}
	if r.GetInfo() != nil {
		v.Info = newInfo(path, r.GetInfo())
	}
	if v.Violation == "" {
		v.Violation = CheckPolicy(path, v.Info, p)
	}
	return v, nil
}

// CheckPolicy applies p to an image's facts, in this order: virtual size,
// then backing file. It returns the first violation or "".
func CheckPolicy(path string, in *Info, p Policy) string {
	if in == nil {
		return "no image facts to check"
	}
	if p.MaxSize > 0 && in.VirtualSize > p.MaxSize {
		return fmt.Sprintf("virtual size %d exceeds --max-size %d", in.VirtualSize, p.MaxSize)
	}
	return CheckBacking(path, in.BackingFilename, in.BackingFilenameFormat, p)
}

// CheckBacking applies the backing-file policy to the backing name an image
// records (backing, possibly "") with its recorded format.
//
// With --backing-dir DIR the rule is:
//   - the image must record the backing file's format (a format is never
//     guessed, so an overlay that does not say is unusable);
//   - the name must not contain characters the plugin had to replace for
//     display (control characters, invalid UTF-8) or '?', so that the name
//     checked is the name the image holds;
//   - the name, resolved against the image's directory the way QEMU and
//     disk/qcow2 do, and cleaned lexically, must lie strictly inside DIR;
//   - the file must exist, be a regular file or block device (stat, never
//     opened), and its real path (symlinks resolved on the host) must lie
//     inside DIR's real path.
//
// The check is a snapshot: a file swapped in afterwards is the declarer's
// problem at the time the overlay is used, where krun-core again compares
// the declared chain with the recorded names.
func CheckBacking(path, backing, backingFormat string, p Policy) string {
	if backing == "" {
		return ""
	}
	if p.NoBacking {
		return fmt.Sprintf("the image has a backing file %q (--no-backing)", backing)
	}
	if p.BackingDir == "" {
		return ""
	}
	if strings.ContainsAny(backing, "?\uFFFD") {
		return fmt.Sprintf("backing file name %q has characters that cannot be checked", backing)
	}
	if backingFormat == "" {
		return fmt.Sprintf("the image does not record the format of its backing file %q", backing)
	}
	// QEMU reads a colon before the first slash as a protocol ("file:",
	// "nbd:", "json:{...}"), not as a file name.
	if colon, slash := strings.IndexByte(backing, ':'), strings.IndexByte(backing, '/'); colon >= 0 && (slash < 0 || colon < slash) {
		return fmt.Sprintf("backing file name %q has a colon before its first slash, which QEMU reads as a protocol", backing)
	}
	img, err := filepath.Abs(path)
	if err != nil {
		return fmt.Sprintf("resolve %s: %v", path, err)
	}
	resolved := filepath.Clean(backing)
	// asOpened is the name as QEMU opens it: joined to the image's
	// directory as written, not cleaned. The kernel applies a ".." after
	// following the link before it, so "link/../x" can lead out of a
	// directory that "x" is in; EvalSymlinks resolves it the same way.
	asOpened := backing
	if !filepath.IsAbs(resolved) {
		resolved = filepath.Join(filepath.Dir(img), backing)
		asOpened = filepath.Dir(img) + "/" + backing
	}
	dir, err := filepath.Abs(p.BackingDir)
	if err != nil {
		return fmt.Sprintf("resolve --backing-dir: %v", err)
	}
	if !inside(resolved, dir) {
		return fmt.Sprintf("backing file %q (%s) is outside --backing-dir %s", backing, resolved, dir)
	}
	real, err := filepath.EvalSymlinks(asOpened)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("backing file %q (%s) does not exist", backing, resolved)
	}
	if err != nil {
		return fmt.Sprintf("backing file %q: %v", backing, err)
	}
	realDir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Sprintf("--backing-dir: %v", err)
	}
	if !inside(real, realDir) {
		return fmt.Sprintf("backing file %q resolves to %s, outside --backing-dir %s", backing, real, realDir)
	}
	st, err := os.Stat(real)
	if err != nil {
		return fmt.Sprintf("backing file %q: %v", backing, err)
	}
	if m := st.Mode(); !m.IsRegular() && (m&fs.ModeDevice == 0 || m&fs.ModeCharDevice != 0) {
		return fmt.Sprintf("backing file %q (%s) is not a regular file or block device", backing, real)
	}
	return ""
}

// inside reports whether p lies strictly beneath dir (both absolute and
// clean).
func inside(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	if err != nil || rel == "." {
		return false
	}
	return rel != ".." && !strings.HasPrefix(rel, "../")
}
