package imgserver

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
	"github.com/krun-core/krun-core/sandbox"
)

// qemuTools returns the paths of qemu-img and qemu-io, or skips the test.
func qemuTools(t *testing.T) (qimg, qio string) {
	t.Helper()
	var paths [2]string
	for i, name := range []string{"qemu-img", "qemu-io"} {
		p, err := exec.LookPath(name)
		if err != nil {
			t.Skipf("%s not installed (Debian package qemu-utils); it makes and reads back the images of this test", name)
		}
		paths[i] = p
	}
	return paths[0], paths[1]
}

// runIn runs a QEMU tool in dir and returns its output and whether it
// exited 0.
func runIn(t *testing.T, dir, name string, args ...string) (string, bool) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s: %v", name, err)
	}
	return string(out), err == nil
}

func mustRun(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	out, ok := runIn(t, dir, name, args...)
	if !ok {
		t.Fatalf("%s %s failed:\n%s", filepath.Base(name), strings.Join(args, " "), out)
	}
	return out
}

// backedImage makes, with qemu-img and qemu-io, base (of baseFormat,
// baseSize bytes of 0xbb) and over it top.qcow2 (topSize bytes, recording
// the base by its relative name, with 0x11 in its first 64 KiB). extra
// are more qemu-img create options for the top.
func backedImage(t *testing.T, dir, baseFormat, baseSize, topSize string, extra ...string) (top, base string) {
	t.Helper()
	qimg, qio := qemuTools(t)
	base = filepath.Join(dir, "base."+baseFormat)
	top = filepath.Join(dir, "top.qcow2")
	mustRun(t, dir, qimg, "create", "-q", "-f", baseFormat, base, baseSize)
	mustRun(t, dir, qio, "-f", baseFormat, "-c", "write -P 0xbb 0 "+baseSize, base)
	args := append([]string{"create", "-q", "-f", "qcow2", "-b", filepath.Base(base), "-F", baseFormat}, extra...)
	mustRun(t, dir, qimg, append(args, top, topSize)...)
	mustRun(t, dir, qio, "-f", "qcow2", "-c", "write -P 0x11 0 64k", top)
	return top, base
}

// TestResizeOverBacking grows qcow2 images made by qemu-img over a qcow2
// and a raw backing file full of 0xbb, through Resize with the chain
// declared: qemu-img info shows the new size, qemu-io reads the new area
// as zeros (the backing file has data there), and the old content (the
// top's own and the backing file's) is unchanged; qemu-img check finds
// nothing. A chain declared wrongly or not at all is refused with the
// image unchanged.
func TestResizeOverBacking(t *testing.T) {
	qimg, qio := qemuTools(t)
	const old, size = 4 << 20, 8 << 20
	cases := []struct {
		name       string
		baseFormat string
		extra      []string // qemu-img create options of the top
		size       int64
		// chain: the declared backing; nil declares none, a layer's
		// Path "" the base's path.
		chain []Layer
		path  string // req.Path; "" for the top's absolute path
		err   string // substring of the refusal; "" for growth
	}{
		{name: "qcow2-base", baseFormat: "qcow2", size: size, chain: []Layer{{Format: "qcow2"}}},
		{name: "raw-base", baseFormat: "raw", size: size, chain: []Layer{{Format: "raw"}}},
		// 512-byte clusters: 64 MiB needs a larger L1 table, written
		// after the end of the file, before the zeroing.
		{name: "raw-base-new-l1", baseFormat: "raw", extra: []string{"-o", "cluster_size=512"}, size: 64 << 20, chain: []Layer{{Format: "raw"}}},
		{name: "undeclared", baseFormat: "qcow2", size: size,
			err: `names backing file "base.qcow2", which was not declared (add backing=...)`},
		{name: "wrong-format", baseFormat: "qcow2", size: size, chain: []Layer{{Format: "raw"}},
			err: `records backing format "qcow2", but`},
		{name: "wrong-path", baseFormat: "raw", size: size, chain: []Layer{{Format: "raw", Path: "/nonexistent/base.raw"}},
			err: "but the declared backing is /nonexistent/base.raw"},
		// Without the image's path its relative backing name cannot be
		// compared with the declared one.
		{name: "no-path", baseFormat: "raw", size: size, chain: []Layer{{Format: "raw"}}, path: "-",
			err: `cannot resolve relative name "base.raw"`},
		{name: "relative-path", baseFormat: "raw", size: size, chain: []Layer{{Format: "raw"}}, path: "top.qcow2",
			err: `image: path "top.qcow2" is not absolute`},
		{name: "relative-backing-path", baseFormat: "raw", size: size, chain: []Layer{{Format: "raw", Path: "base.raw"}},
			err: `backing file 0: path "base.raw" is not absolute`},
		{name: "bad-backing-format", baseFormat: "raw", size: size, chain: []Layer{{Format: "vmdk"}},
			err: "backing file 0:"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			top, base := backedImage(t, dir, c.baseFormat, "8M", "4M", c.extra...)
			var chain []Layer
			for _, l := range c.chain {
				if l.Path == "" {
					l.Path = base
				}
				l.File = open(t, base, os.O_RDONLY)
				chain = append(chain, l)
			}
			req := &imagepb.ResizeRequest{Format: "qcow2", Size: c.size, Path: top}
			switch c.path {
			case "-":
				req.Path = ""
			case "":
			default:
				req.Path = c.path
			}
			before, err := os.ReadFile(top)
			if err != nil {
				t.Fatal(err)
			}
			r, err := Resize(open(t, top, os.O_RDWR), chain, req)
			refusedUnchanged := func() {
				t.Helper()
				if after, _ := os.ReadFile(top); !bytes.Equal(after, before) {
					t.Error("a refused resize changed the image")
				}
			}
			// Refusals that come before disk/qcow2 looks at the image.
			early := strings.HasPrefix(c.err, "image:") || strings.HasPrefix(c.err, "backing file 0")
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || strings.Contains(err.Error(), "\n") {
					t.Errorf("error %v, want one line with %q", err, c.err)
				}
				if !early && !errors.Is(err, qcow2.ErrBacking) {
					t.Errorf("error %v does not wrap qcow2.ErrBacking", err)
				}
				refusedUnchanged()
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.GetOldSize() != old || r.GetVirtualSize() != c.size {
				t.Errorf("response %+v, want old %d, new %d", r, old, c.size)
			}
			m := mustRun(t, dir, qimg, "info", "-f", "qcow2", "--output", "json", top)
			if !strings.Contains(m, `"virtual-size": `+itoa(c.size)+",") {
				t.Errorf("qemu-img info after:\n%s", m)
			}
			mustRun(t, dir, qimg, "check", "-q", "-f", "qcow2", top)
			// The base still holds 0xbb everywhere; through the top the
			// new area reads as zeros, the rest as before.
			mustRun(t, dir, qio, "-f", c.baseFormat, "-r", "-c", "read -P 0xbb 0 8M", base)
			mustRun(t, dir, qio, "-f", "qcow2", "-r",
				"-c", "read -P 0x11 0 64k",
				"-c", "read -P 0xbb 64k "+itoa(old-64<<10),
				"-c", "read -P 0 "+itoa(old)+" "+itoa(c.size-old), top)
		})
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestResizeRawRefusesBacking: a raw image has no backing file, so a
// declared one is refused and the file left as it was.
func TestResizeRawRefusesBacking(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.raw")
	b := filepath.Join(dir, "base.raw")
	for _, f := range []string{p, b} {
		if err := os.WriteFile(f, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, err := Resize(open(t, p, os.O_RDWR), []Layer{{File: open(t, b, os.O_RDONLY), Format: "raw", Path: b}},
		&imagepb.ResizeRequest{Format: "raw", Size: 8192, Path: p})
	if err == nil || err.Error() != "a raw image has no backing file" {
		t.Errorf("raw with a backing file: %v", err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Size() != 4096 {
		t.Errorf("size after a refused resize: %v, %v", fi, err)
	}
}

// TestServerResizeBacking: the Resize RPC hands the declared backing files
// to disk/qcow2 by the names given in Open, with the image's path; a name
// that was not handed over is refused.
func TestServerResizeBacking(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0xbb}, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qcow2")
	newQcow2(t, top, qcow2.CreateOptions{Size: 1 << 20, BackingFile: "base.raw", BackingFormat: disk.Raw}, nil)
	topFD := freeFD(t)
	f := open(t, top, os.O_RDWR)
	if err := unix.Dup3(int(f.Fd()), topFD, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(topFD) })
	baseFD := freeFD(t, topFD)
	placeAt(t, base, baseFD)
	s := NewServer(nil, func(sandbox.Policy, sandbox.Logger) error { return nil })
	ctx := context.Background()
	if _, err := s.Open(ctx, &imagepb.OpenRequest{Files: map[string]uint32{"image": uint32(topFD), "backing.0": uint32(baseFD)}}); err != nil {
		t.Fatal(err)
	}
	req := &imagepb.ResizeRequest{File: "image", Format: "qcow2", Size: 2 << 20, Path: top,
		Backing: []*imagepb.Layer{{File: "backing.7", Format: "raw", Path: base}}}
	if _, err := s.Resize(ctx, req); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `no file named "backing.7"`) {
		t.Errorf("a backing file not handed over: %v", err)
	}
	req.Backing[0].File = "backing.0"
	r, err := s.Resize(ctx, req)
	if err != nil || r.GetOldSize() != 1<<20 || r.GetVirtualSize() != 2<<20 {
		t.Fatalf("Resize: %+v, %v", r, err)
	}
	im, err := qcow2.Open(open(t, top, os.O_RDONLY), qcow2.Options{ReadOnly: true, Path: top,
		Backing: []qcow2.Layer{{File: open(t, base, os.O_RDONLY), Format: disk.Raw, Path: base}}})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, 2<<20)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:1<<20], bytes.Repeat([]byte{0xbb}, 1<<20)) || !bytes.Equal(got[1<<20:], make([]byte, 1<<20)) {
		t.Error("after growing: want the backing file's 0xbb below the old size and zeros above it")
	}
}
