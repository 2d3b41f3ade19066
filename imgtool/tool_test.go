package imgtool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/proto/imagepb"
)

func TestCheckBacking(t *testing.T) {
	root := t.TempDir()
	bdir := filepath.Join(root, "bases")
	other := filepath.Join(root, "other")
	for _, d := range []string{bdir, other, filepath.Join(bdir, "sub")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(bdir, "base.raw"), filepath.Join(bdir, "sub", "b.qcow2"), filepath.Join(other, "secret")} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(other, "secret"), filepath.Join(bdir, "link-out")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("base.raw", filepath.Join(bdir, "link-in")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, filepath.Join(bdir, "dir-out")); err != nil {
		t.Fatal(err)
	}
	// A link inside the directory to a directory outside it: "s/../x"
	// is x beside that directory for the kernel (and QEMU), not bdir/x.
	if err := os.MkdirAll(filepath.Join(other, "a"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(other, "a"), filepath.Join(bdir, "s")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, "base.raw"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(bdir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The image under test lives in bdir; some also in other.
	img := filepath.Join(bdir, "top.qcow2")
	imgOther := filepath.Join(other, "top.qcow2")
	dirPol := Policy{BackingDir: bdir}
	cases := []struct {
		name, path, backing, format string
		p                           Policy
		want                        string // substring of the violation, "" for none
	}{
		{"no-backing-ok", img, "", "", Policy{NoBacking: true}, ""},
		{"no-backing", img, "base.raw", "raw", Policy{NoBacking: true}, "--no-backing"},
		{"no-policy", img, "/etc/passwd", "raw", Policy{}, ""},
		{"relative-inside", img, "base.raw", "raw", dirPol, ""},
		{"relative-sub", img, "sub/b.qcow2", "qcow2", dirPol, ""},
		{"absolute-inside", imgOther, filepath.Join(bdir, "base.raw"), "raw", dirPol, ""},
		{"relative-from-elsewhere", imgOther, "../bases/base.raw", "raw", dirPol, ""},
		{"dotdot-out", img, "../other/secret", "raw", dirPol, "outside"},
		{"absolute-out", img, "/etc/passwd", "raw", dirPol, "outside"},
		{"relative-from-other-dir", imgOther, "secret", "raw", dirPol, "outside"},
		{"dir-itself", img, ".", "raw", dirPol, "outside"},
		{"symlink-out", img, "link-out", "raw", dirPol, "resolves to"},
		{"symlink-in", img, "link-in", "raw", dirPol, ""},
		{"dir-symlink-out", img, "dir-out/secret", "raw", dirPol, "resolves to"},
		{"missing", img, "nope.raw", "raw", dirPol, "does not exist"},
		{"fifo", img, "fifo", "raw", dirPol, "not a regular file"},
		{"directory", img, "sub", "raw", dirPol, "not a regular file"},
		{"no-format", img, "base.raw", "", dirPol, "does not record the format"},
		{"unprintable", img, "base?.raw", "raw", dirPol, "cannot be checked"},
		{"replacement-char", img, "base\uFFFD.raw", "raw", dirPol, "cannot be checked"},
		{"dotdot-in-and-back", img, "../bases/base.raw", "raw", dirPol, ""},
		// From review: cleaned lexically, "s/../secret" was bdir/secret
		// (and "s/../base.raw" bdir/base.raw); the kernel opens
		// other/secret and other/base.raw.
		{"dotdot-after-link-out", img, "s/../secret", "raw", dirPol, "resolves to"},
		{"dotdot-after-link-lexically-inside", img, "s/../base.raw", "raw", dirPol, "resolves to"},
		{"protocol", img, "file:base.raw", "raw", dirPol, "protocol"},
		{"json", img, `json:{"file":{"driver":"file","filename":"/etc/passwd"}}`, "raw", dirPol, "protocol"},
		{"colon-after-slash", img, "sub/b:c", "raw", dirPol, "does not exist"},
	}
	for _, c := range cases {
		got := CheckBacking(c.path, c.backing, c.format, c.p)
		if c.want == "" && got != "" || c.want != "" && !strings.Contains(got, c.want) {
			t.Errorf("%s: violation %q, want %q", c.name, got, c.want)
		}
	}
}

func TestCheckPolicyOrder(t *testing.T) {
	in := &Info{VirtualSize: 2 << 30, BackingFilename: "b", BackingFilenameFormat: "raw"}
	if v := CheckPolicy("x", in, Policy{MaxSize: 1 << 30, NoBacking: true}); !strings.Contains(v, "max-size") {
		t.Errorf("size is checked first: %q", v)
	}
	if v := CheckPolicy("x", in, Policy{MaxSize: 2 << 30, NoBacking: true}); !strings.Contains(v, "no-backing") {
		t.Errorf("size at the limit passes: %q", v)
	}
	if v := CheckPolicy("x", nil, Policy{}); v == "" {
		t.Error("no facts passes")
	}
	if err := (Policy{NoBacking: true, BackingDir: "/"}).Validate(); err == nil {
		t.Error("--no-backing with --backing-dir accepted")
	}
	if err := (Policy{BackingDir: "/nonexistent/dir"}).Validate(); err == nil {
		t.Error("missing --backing-dir accepted")
	}
}

func TestNewInfoJSON(t *testing.T) {
	r := &imagepb.InfoResponse{
		Format: "qcow2", VirtualSize: 1 << 20, ActualSize: 4096, FileSize: 196608, ClusterSize: 65536, Version: 3,
		RefcountBits: 16, BackingFile: "base.raw", BackingFormat: "raw", CompressionType: "zlib", Dirty: true,
		Snapshots: []*imagepb.Snapshot{{Id: "1", Name: "s", DateSec: 100, DateNsec: 5, VmClockNsec: 3_500_000_000, Icount: -1}},
	}
	in := newInfo("dir/top.qcow2", r)
	var buf bytes.Buffer
	if err := in.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"format": "qcow2", "virtual-size": 1048576.0, "actual-size": 4096.0, "cluster-size": 65536.0,
		"backing-filename": "base.raw", "backing-filename-format": "raw", "full-backing-filename": "dir/base.raw",
		"dirty-flag": true, "filename": "dir/top.qcow2",
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	data := m["format-specific"].(map[string]any)["data"].(map[string]any)
	for k, v := range map[string]any{"compat": "1.1", "refcount-bits": 16.0, "compression-type": "zlib", "lazy-refcounts": false, "corrupt": false, "extended-l2": false} {
		if data[k] != v {
			t.Errorf("data.%s = %v, want %v", k, data[k], v)
		}
	}
	snap := m["snapshots"].([]any)[0].(map[string]any)
	if snap["vm-clock-sec"] != 3.0 || snap["vm-clock-nsec"] != 5e8 || snap["icount"] != nil {
		t.Errorf("snapshot %v", snap)
	}
	// Version 2 has no lazy-refcounts, corrupt or extended-l2.
	r.Version = 2
	in = newInfo("top.qcow2", r)
	if d := in.FormatSpecific.Data; d.Compat != "0.10" || d.LazyRefcounts != nil || d.Corrupt != nil || d.ExtendedL2 != nil {
		t.Errorf("v2 data %+v", d)
	}
	if in.FullBackingFilename != "base.raw" {
		t.Errorf("full backing name %q", in.FullBackingFilename)
	}
	raw := newInfo("r", &imagepb.InfoResponse{Format: "raw", VirtualSize: 5})
	buf.Reset()
	raw.WriteJSON(&buf)
	if strings.Contains(buf.String(), "cluster-size") || strings.Contains(buf.String(), "format-specific") {
		t.Errorf("raw info: %s", buf.String())
	}
	buf.Reset()
	if err := in.WriteHuman(&buf); err != nil || !strings.Contains(buf.String(), "virtual size: 1 MiB (1048576 bytes)") {
		t.Errorf("human: %s", buf.String())
	}
}

func TestCheckResultExit(t *testing.T) {
	cases := []struct {
		r    CheckResult
		code int
		text string
	}{
		{CheckResult{Supported: true}, 0, "No errors were found"},
		{CheckResult{Supported: true, Leaks: 2}, 3, "2 leaked clusters"},
		{CheckResult{Supported: true, Leaks: 2, Corruptions: 1}, 2, "1 errors were found"},
		{CheckResult{Supported: true, CheckErrors: 1, Corruptions: 1}, 1, "internal errors"},
		{CheckResult{Supported: false}, 63, "does not support checks"},
		{CheckResult{Supported: true, LeaksFixed: 3}, 0, "3 leaked clusters\n"},
	}
	for _, c := range cases {
		if got := c.r.ExitCode(); got != c.code {
			t.Errorf("%+v: exit %d, want %d", c.r, got, c.code)
		}
		var b bytes.Buffer
		c.r.WriteHuman(&b)
		if !strings.Contains(b.String(), c.text) {
			t.Errorf("%+v: output %q lacks %q", c.r, b.String(), c.text)
		}
	}
}

func TestHumanSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1000: "0.977 KiB", 999: "999 B", 1024: "1 KiB", 208896: "204 KiB", 1 << 30: "1 GiB", 1536 << 20: "1.5 GiB", 3 << 40: "3 TiB"} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestBarLine(t *testing.T) {
	if l := barLine(50, 100, time.Second); !strings.Contains(l, " 50.00%") || strings.Count(l, "=") != 20 {
		t.Errorf("half: %q", l)
	}
	if l := barLine(200, 100, 0); !strings.Contains(l, "100.00%") {
		t.Errorf("over: %q", l)
	}
	if l := barLine(5<<20, 0, 2*time.Second); !strings.Contains(l, "5 MiB") || !strings.Contains(l, "2.5 MiB/s") {
		t.Errorf("unknown total: %q", l)
	}
}

func TestFiles(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	o, err := createOutput(out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := createOutput(out); err == nil || !strings.Contains(err.Error(), "never overwrites") {
		t.Errorf("second create: %v", err)
	}
	// remove deletes only the file this process created.
	if err := os.Remove(out); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(out, []byte("someone else's"), 0o644)
	o.remove()
	if _, err := os.Stat(out); err != nil {
		t.Errorf("remove deleted a file it did not create: %v", err)
	}
	o2, err := createOutput(filepath.Join(dir, "out2"))
	if err != nil {
		t.Fatal(err)
	}
	o2.remove()
	if _, err := os.Stat(filepath.Join(dir, "out2")); !os.IsNotExist(err) {
		t.Errorf("remove kept its own file: %v", err)
	}

	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := openImage("image", fifo, imagelock.ReadOnly)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("opening a FIFO blocked")
	}
	if _, err := openImage("image", dir, imagelock.ReadOnly); err == nil {
		t.Error("directory accepted as an image")
	}
}

func TestLaunchFailures(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	os.WriteFile(img, make([]byte, 4096), 0o644)
	ctx := context.Background()
	if _, err := (&Launcher{PluginPath: "/bin/true"}).Info(ctx, img, "raw"); err == nil || !strings.Contains(err.Error(), "sandbox") {
		t.Errorf("no sandbox configured: %v", err)
	}
	tr, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true(1) to stand in for a broken plugin")
	}
	_, err = (&Launcher{PluginPath: tr, SandboxOff: true, HandshakeTimeout: 5 * time.Second}).Info(ctx, img, "raw")
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("a plugin that exits at once: %v", err)
	}
	_, err = (&Launcher{PluginPath: filepath.Join(t.TempDir(), "missing"), SandboxOff: true}).Info(ctx, img, "raw")
	if err == nil || !strings.Contains(err.Error(), "start") {
		t.Errorf("a missing plugin: %v", err)
	}
	_, err = (&Launcher{PluginDir: t.TempDir(), SandboxOff: true}).Info(ctx, img, "qcow2")
	if err == nil {
		t.Errorf("plugin found where there is none")
	}
	if _, err := (&Launcher{SandboxOff: true}).Info(ctx, img, "vmdk"); err == nil || !strings.Contains(err.Error(), "unknown format") {
		t.Errorf("unknown format: %v", err)
	}
}

// TestLocking: every command locks what it opens before any plugin starts,
// so an image another process writes is refused at once (the plugin path
// here would fail if it were reached), and --force-share is for reads only.
func TestLocking(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	os.WriteFile(img, make([]byte, 4096), 0o644)
	w, err := openImage("image", img, imagelock.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx := context.Background()
	l := &Launcher{PluginPath: filepath.Join(dir, "no-plugin"), SandboxOff: true}
	inUse := func(mode string) string {
		return "image " + img + " is in use by another process (write lock): refusing to open it " + mode
	}
	for name, call := range map[string]func() error{
		"info":   func() error { _, err := l.Info(ctx, img, "raw"); return err },
		"probe":  func() error { _, err := l.Probe(ctx, img); return err },
		"check":  func() error { _, err := l.Check(ctx, img, "qcow2", RepairNone); return err },
		"verify": func() error { _, err := l.Verify(ctx, img, "raw", Policy{}); return err },
	} {
		if err := call(); err == nil || err.Error() != inUse("read-only") {
			t.Errorf("%s: %v, want %s", name, err, inUse("read-only"))
		}
	}
	if _, err := l.Check(ctx, img, "qcow2", RepairAll); err == nil || err.Error() != inUse("read-write") {
		t.Errorf("check --repair: %v", err)
	}
	if _, err := l.Resize(ctx, img, ResizeOptions{Format: "raw", Size: 8192}); err == nil || err.Error() != inUse("read-write") {
		t.Errorf("resize: %v", err)
	}
	out := filepath.Join(dir, "out")
	_, err = l.Convert(ctx, ConvertOptions{Input: img, Format: "raw", Output: out, OutputFormat: "raw"}, nil)
	if want := "input " + img + " is in use by another process (write lock): refusing to open it read-only"; err == nil || err.Error() != want {
		t.Errorf("convert: %v, want %s", err, want)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("convert left an output behind: %v", err)
	}

	// With force-share the lock passes and the (missing) plugin is reached.
	l.ForceShare = true
	if _, err := l.Info(ctx, img, "raw"); err == nil || strings.Contains(err.Error(), "in use") {
		t.Errorf("info --force-share: %v, want the missing plugin's error", err)
	}
	if _, err := l.Check(ctx, img, "qcow2", RepairLeaks); err == nil || !strings.Contains(err.Error(), "--force-share is for read-only opens") {
		t.Errorf("check --repair --force-share: %v", err)
	}
	if _, err := l.Resize(ctx, img, ResizeOptions{Format: "raw", Size: 8192}); err == nil || !strings.Contains(err.Error(), "--force-share is for read-only opens") {
		t.Errorf("resize --force-share: %v", err)
	}

	// An output is locked as a writer while it is written.
	o, err := createOutput(filepath.Join(dir, "new"))
	if err != nil {
		t.Fatal(err)
	}
	defer o.remove()
	if _, err := openImage("image", o.path, imagelock.ForceShare); err != nil {
		t.Errorf("force-share read of an output being written: %v", err)
	}
	if _, err := openImage("image", o.path, imagelock.ReadOnly); err == nil {
		t.Error("an output being written opened read-only without force-share")
	}
}

// TestResizeRefusals: what Resize refuses before it opens the image or
// starts the plugin (neither exists here), and that a reader of the image
// is enough to refuse it.
func TestResizeRefusals(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	os.WriteFile(img, make([]byte, 4096), 0o644)
	ctx := context.Background()
	l := &Launcher{PluginPath: filepath.Join(dir, "no-plugin"), SandboxOff: true}
	cases := []struct {
		path string
		o    ResizeOptions
		want string
	}{
		{img, ResizeOptions{Format: "", Size: 8192}, "--format"},
		{img, ResizeOptions{Format: "vmdk", Size: 8192}, "unknown format"},
		{img, ResizeOptions{Format: "raw", Size: 0}, "must be positive"},
		{img, ResizeOptions{Format: "raw", Size: -512}, "must be positive"},
		{img, ResizeOptions{Format: "raw", Size: 1000}, "not a multiple of 512"},
		{filepath.Join(dir, "missing"), ResizeOptions{Format: "raw", Size: 8192}, "no such file"},
		{dir, ResizeOptions{Format: "raw", Size: 8192}, "not a regular file"},
	}
	for _, c := range cases {
		if _, err := l.Resize(ctx, c.path, c.o); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s %+v: %v, want %q", c.path, c.o, err, c.want)
		}
	}
	// A relative size is checked in the plugin, once added: here the
	// (missing) plugin is reached.
	if _, err := l.Resize(ctx, img, ResizeOptions{Format: "raw", Size: -8192, Relative: true}); err == nil || !strings.Contains(err.Error(), "no-plugin") {
		t.Errorf("relative: %v, want the missing plugin's error", err)
	}
	// Resize takes the exclusive lock: a reader is enough to refuse it.
	r, err := openImage("image", img, imagelock.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	want := "image " + img + " is in use by another process (lock that does not share write): refusing to open it read-write"
	if _, err := l.Resize(ctx, img, ResizeOptions{Format: "raw", Size: 8192}); err == nil || err.Error() != want {
		t.Errorf("resize of an image being read: %v, want %s", err, want)
	}
	if fi, _ := os.Stat(img); fi.Size() != 4096 {
		t.Errorf("a refused resize changed the size to %d", fi.Size())
	}
}

// TestImportDirectoryInput: `img import ... OUT < DIR` is one line, before
// OUT is made. It handed the plugin the directory, logged a warning about
// the plugin's ids not being able to write to "/dev/stdin", then failed
// with "read input: is a directory" (from review, helper-114).
func TestImportDirectoryInput(t *testing.T) {
	dir := t.TempDir()
	in, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out := filepath.Join(dir, "out.raw")
	l := &Launcher{PluginPath: filepath.Join(dir, "no-plugin"), SandboxOff: true}
	_, err = l.Import(context.Background(), ImportOptions{Input: in, InputFormat: "raw", Output: out, OutputFormat: "raw", MaxSize: 1 << 20}, nil)
	if err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("import from a directory: %v, want it refused as a directory", err)
	}
	if _, err := os.Lstat(out); err == nil {
		t.Errorf("import from a directory left %s behind", out)
	}
}

// TestImportEmptyInput: an import whose input ends at once (a download that
// failed in a pipe) made an image of size 0 and exited 0; it is refused in
// one line and leaves no output, for both formats (from review,
// helper-114).
func TestImportEmptyInput(t *testing.T) {
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			empty := filepath.Join(dir, "empty")
			if err := os.WriteFile(empty, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			in, err := os.Open(empty)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			out := filepath.Join(dir, "out."+format)
			_, err = selfPlugin(t).Import(context.Background(), ImportOptions{Input: in, InputFormat: "raw", Output: out, OutputFormat: format, MaxSize: 1 << 20}, nil)
			if !errors.Is(err, ErrEmptyInput) {
				t.Errorf("import of empty input: %v, want %v", err, ErrEmptyInput)
			}
			if _, err := os.Lstat(out); err == nil {
				t.Errorf("import of empty input left %s behind", out)
			}
		})
	}
}

// TestCheckMessagesApart (from review, helper-125): qemu-img check writes
// each finding on stderr and the summary on stdout; img wrote the findings
// into the summary, so a script reading qemu-img's stdout got extra lines.
func TestCheckMessagesApart(t *testing.T) {
	r := CheckResult{Supported: true, Leaks: 1, Messages: []string{"Leaked cluster 7 refcount=1 reference=0"}}
	var sum, msgs bytes.Buffer
	if err := r.WriteHuman(&sum); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteMessages(&msgs); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, out, has, hasNot string
	}{
		{"summary", sum.String(), "1 leaked clusters were found", "Leaked cluster 7"},
		{"messages", msgs.String(), "Leaked cluster 7 refcount=1 reference=0\n", "leaked clusters were found"},
	} {
		if !strings.Contains(c.out, c.has) || strings.Contains(c.out, c.hasNot) {
			t.Errorf("%s: %q, want %q and not %q", c.name, c.out, c.has, c.hasNot)
		}
	}
}
