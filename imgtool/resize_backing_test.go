package imgtool

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/imgtool/imgserver"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// TestMain makes this test binary the image plugin when a Launcher starts
// it (pluginhost sets the plugin's kind in its environment), so the tests
// below run the whole path: files opened and locked here, handed over by
// name, the RPC, the plugin's operation, and the error as the user sees it.
func TestMain(m *testing.M) {
	if os.Getenv(pluginhost.EnvKind) == imagepb.Kind {
		imgserver.Main() // exits
	}
	os.Exit(m.Run())
}

// selfPlugin is a Launcher whose plugin is this test binary, unconfined
// (the sandbox has tests of its own).
func selfPlugin(t *testing.T) *Launcher {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return &Launcher{PluginPath: exe, SandboxOff: true, HandshakeTimeout: 30 * time.Second}
}

// newQcow2 creates a qcow2 image of size bytes with disk/qcow2, recording
// backing (as given) when it is not "".
func newQcow2(t *testing.T, path string, size int64, backing string, format disk.Format) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	o := qcow2.CreateOptions{Size: size}
	if backing != "" {
		o.BackingFile, o.BackingFormat = backing, format
	}
	if err := qcow2.Create(f, o); err != nil {
		t.Fatal(err)
	}
}

// TestResizeBackingChain runs Resize through the plugin on a qcow2 image
// whose backing file (raw, 0xbb throughout, twice the image's size) is
// declared, or not, or wrongly. A grown image reads as zeros over the new
// area; every refusal is one line in img's flags (--backing, never
// --disk's backing=) and leaves the image as it was.
func TestResizeBackingChain(t *testing.T) {
	const old = 1 << 20
	dir := t.TempDir()
	// Relative names: the launcher makes them absolute for the plugin.
	t.Chdir(dir)
	if err := os.WriteFile("base.raw", bytes.Repeat([]byte{0xbb}, 2*old), 0o644); err != nil {
		t.Fatal(err)
	}
	topAbs := filepath.Join(dir, "top.qcow2")
	ctx := context.Background()
	cases := []struct {
		name    string
		backing string // the image's recorded backing file, "" for none
		o       ResizeOptions
		// want is the refusal, one whole line; "" for success.
		want string
	}{
		{name: "declared", backing: "base.raw",
			o: ResizeOptions{Size: 2 * old, Backing: []Backing{{Path: "base.raw", Format: "raw"}}}},
		{name: "declared-relative-size", backing: "base.raw",
			o: ResizeOptions{Size: old, Relative: true, Backing: []Backing{{Path: "./base.raw", Format: "raw"}}}},
		{name: "missing", backing: "base.raw", o: ResizeOptions{Size: 2 * old},
			want: `backing chain mismatch: image ` + topAbs + ` names backing file "base.raw", which was not declared (declare it with --backing FILE --backing-format FMT)`},
		{name: "wrong-format", backing: "base.raw",
			o:    ResizeOptions{Size: 2 * old, Backing: []Backing{{Path: "base.raw", Format: "qcow2"}}},
			want: `backing chain mismatch: image ` + topAbs + ` records backing format "raw", but ` + filepath.Join(dir, "base.raw") + ` was declared as "qcow2"`},
		{name: "itself", backing: "top.qcow2",
			o:    ResizeOptions{Size: 2 * old, Backing: []Backing{{Path: "top.qcow2", Format: "qcow2"}}},
			want: `backing file top.qcow2 is the same file as the image`},
		{name: "none-recorded", backing: "",
			o:    ResizeOptions{Size: 2 * old, Backing: []Backing{{Path: "base.raw", Format: "raw"}}},
			want: `backing chain mismatch: image ` + topAbs + ` has no backing file, but --backing ` + filepath.Join(dir, "base.raw") + ` was declared`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			os.Remove("top.qcow2")
			newQcow2(t, "top.qcow2", old, c.backing, disk.Raw)
			before, err := os.ReadFile("top.qcow2")
			if err != nil {
				t.Fatal(err)
			}
			c.o.Format = "qcow2"
			r, err := selfPlugin(t).Resize(ctx, "top.qcow2", c.o)
			unchanged := func() {
				t.Helper()
				if after, _ := os.ReadFile("top.qcow2"); !bytes.Equal(after, before) {
					t.Error("a refused resize changed the image")
				}
			}
			if c.want != "" {
				if err == nil || err.Error() != c.want {
					t.Errorf("resize: %v\nwant %s", err, c.want)
				}
				unchanged()
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.OldSize != old || r.VirtualSize != 2*old {
				t.Errorf("result %+v, want %d -> %d", r, old, 2*old)
			}
			f, err := os.Open("top.qcow2")
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.Open("base.raw")
			if err != nil {
				t.Fatal(err)
			}
			base := filepath.Join(dir, "base.raw")
			im, err := qcow2.Open(f, qcow2.Options{ReadOnly: true, Path: topAbs, Backing: []qcow2.Layer{{File: b, Format: disk.Raw, Path: base}}})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			got := make([]byte, 2*old)
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:old], bytes.Repeat([]byte{0xbb}, old)) || !bytes.Equal(got[old:], make([]byte, old)) {
				t.Error("want the backing file's 0xbb below the old size and zeros above it")
			}
		})
	}
}

// TestResizeBackingRefusals: what Resize refuses about a declared chain
// before the plugin starts (there is none here), and that a backing file
// is opened under the read lock, so one that another process writes is
// refused.
func TestResizeBackingRefusals(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	base := filepath.Join(dir, "base.raw")
	for _, p := range []string{img, base} {
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	l := &Launcher{PluginPath: filepath.Join(dir, "no-plugin"), SandboxOff: true}
	cases := []struct {
		o    ResizeOptions
		want string // the whole error
	}{
		{ResizeOptions{Format: "raw", Size: 8192, Backing: []Backing{{Path: base, Format: "raw"}}},
			"--backing needs --format qcow2 (a raw image has no backing file)"},
		{ResizeOptions{Format: "qcow2", Size: 8192, Backing: []Backing{{Path: base, Format: "vmdk"}}},
			`--backing-format: unknown format "vmdk"`},
		{ResizeOptions{Format: "qcow2", Size: 8192, Backing: []Backing{{Path: base, Format: ""}}},
			"--backing-format: "},
		{ResizeOptions{Format: "qcow2", Size: 8192, Backing: []Backing{{Path: filepath.Join(dir, "missing"), Format: "raw"}}},
			"backing file: open " + filepath.Join(dir, "missing") + ": no such file or directory"},
		{ResizeOptions{Format: "qcow2", Size: 8192, Backing: []Backing{{Path: dir, Format: "raw"}}},
			"backing file " + dir + " is not a regular file or block device"},
	}
	for _, c := range cases {
		_, err := l.Resize(ctx, img, c.o)
		if err == nil || !strings.HasPrefix(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line starting %q", c.o, err, c.want)
		}
	}
	w, err := openImage("image", base, imagelock.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	want := "backing file " + base + " is in use by another process (write lock): refusing to open it read-only"
	if _, err := l.Resize(ctx, img, ResizeOptions{Format: "qcow2", Size: 8192, Backing: []Backing{{Path: base, Format: "raw"}}}); err == nil || err.Error() != want {
		t.Errorf("a backing file someone writes: %v, want %s", err, want)
	}
	if fi, _ := os.Stat(img); fi.Size() != 4096 {
		t.Errorf("a refused resize changed the size to %d", fi.Size())
	}
}

// TestChainFlags: disk/qcow2's chain errors, worded for --disk, read in
// img's flags for convert and resize alike; other errors pass unchanged.
func TestChainFlags(t *testing.T) {
	cases := []struct{ in, want string }{
		{`backing chain mismatch: image /a names backing file "b", which was not declared (add backing=...)`,
			`backing chain mismatch: image /a names backing file "b", which was not declared (declare it with --backing FILE --backing-format FMT)`},
		{`data file mismatch: image /a names external data file "d", which was not declared (add data-file=...)`,
			`data file mismatch: image /a names external data file "d", which was not declared (declare it with --data-file FILE)`},
		{`backing chain mismatch: image /a has no backing file, but backing=/b was declared`,
			`backing chain mismatch: image /a has no backing file, but --backing /b was declared`},
		{`data file mismatch: image /a has no external data file, but data-file=/d was declared`,
			`data file mismatch: image /a has no external data file, but --data-file /d was declared`},
		{`shrinking a qcow2 image is not supported`, `shrinking a qcow2 image is not supported`},
	}
	for _, c := range cases {
		if got := chainFlags(&OpError{Msg: c.in}).Error(); got != c.want {
			t.Errorf("%q\n -> %q\nwant %q", c.in, got, c.want)
		}
	}
	// Not an operation's error (one of the host's own): left alone.
	own := errors.New("backing=x")
	if got := chainFlags(own); got != own {
		t.Errorf("a host error was changed: %v", got)
	}
}
