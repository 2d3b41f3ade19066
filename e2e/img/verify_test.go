package img_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestVerifyPolicies runs img verify over a table of images and policies:
// exit 0 for an image that passes, else exit 1 with one line naming the
// violation.
func TestVerifyPolicies(t *testing.T) {
	qemuTool(t, "qemu-img")
	root := t.TempDir()
	bases := filepath.Join(root, "bases")
	up := filepath.Join(root, "uploads")
	elsewhere := filepath.Join(root, "elsewhere")
	for _, d := range []string{bases, up, elsewhere} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := func(dir, name string) string { return filepath.Join(dir, name) }
	qemuImg(t, "create", "-q", "-f", "raw", p(bases, "base.raw"), "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", p(bases, "base.qcow2"), "16M")
	qemuImg(t, "create", "-q", "-f", "raw", p(elsewhere, "secret.raw"), "16M")
	if err := os.Symlink(p(elsewhere, "secret.raw"), p(bases, "escape.raw")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(p(bases, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	create := func(name, size string, opts ...string) string {
		path := p(up, name)
		qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, opts...), path, size)...)
		return path
	}
	clean := create("clean.qcow2", "1G")
	big := create("big.qcow2", "100G")
	overlayAbs := create("overlay-abs.qcow2", "16M", "-b", p(bases, "base.raw"), "-F", "raw")
	overlayRel := create("overlay-rel.qcow2", "16M", "-b", "../bases/base.qcow2", "-F", "qcow2")
	overlayOut := create("overlay-out.qcow2", "16M", "-b", p(elsewhere, "secret.raw"), "-F", "raw")
	overlayDots := create("overlay-dots.qcow2", "16M", "-b", "../bases/../elsewhere/secret.raw", "-F", "raw")
	overlayLink := create("overlay-link.qcow2", "16M", "-b", p(bases, "escape.raw"), "-F", "raw")
	overlayMissing := create("overlay-missing.qcow2", "16M", "-u", "-b", p(bases, "gone.raw"), "-F", "raw")
	overlayFifo := create("overlay-fifo.qcow2", "16M", "-u", "-b", p(bases, "fifo"), "-F", "raw")
	dataFile := create("datafile.qcow2", "16M", "-o", "data_file="+p(up, "datafile.data"))
	raw := p(up, "disk.raw")
	qemuImg(t, "create", "-q", "-f", "raw", raw, "64M")
	// A raw upload that starts with a qcow2 header is still a valid raw image.
	rawLooksQcow2 := p(up, "looks-qcow2.raw")
	b, err := os.ReadFile(clean)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rawLooksQcow2, b, 0o644); err != nil {
		t.Fatal(err)
	}
	corrupt := create("corrupt.qcow2", "16M")
	qemuIO(t, corrupt, "write -P 1 0 64k")
	q := openQcow(t, corrupt)
	q.setRefcount(q.data(0), 0)
	dirty := create("dirty.qcow2", "16M")
	openQcow(t, dirty).put64(72, 1)
	truncated := p(up, "truncated.qcow2")
	if err := os.WriteFile(truncated, b[:200], 0o644); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		args   []string
		reject string // "" accepts; else a substring of the one-line reason
	}{
		{"clean", []string{"--format", "qcow2", clean}, ""},
		{"clean-all-policies", []string{"--format", "qcow2", "--no-backing", "--max-size", "1G", clean}, ""},
		{"too-large", []string{"--format", "qcow2", "--max-size", "64G", big}, "exceeds --max-size"},
		{"raw-too-large", []string{"--format", "raw", "--max-size", "32M", raw}, "exceeds --max-size"},
		{"raw-claimed-qcow2", []string{"--format", "qcow2", raw}, "not a valid qcow2 image"},
		{"qcow2-claimed-raw", []string{"--format", "raw", clean}, ""},
		{"raw-with-qcow2-header", []string{"--format", "raw", "--no-backing", rawLooksQcow2}, ""},
		{"truncated", []string{"--format", "qcow2", truncated}, "not a valid qcow2 image"},
		{"backing-present", []string{"--format", "qcow2", "--no-backing", overlayAbs}, "has a backing file"},
		{"backing-no-policy", []string{"--format", "qcow2", overlayAbs}, ""},
		{"backing-inside-abs", []string{"--format", "qcow2", "--backing-dir", bases, overlayAbs}, ""},
		{"backing-inside-rel", []string{"--format", "qcow2", "--backing-dir", bases, overlayRel}, ""},
		{"backing-outside", []string{"--format", "qcow2", "--backing-dir", bases, overlayOut}, "outside --backing-dir"},
		{"backing-dotdot", []string{"--format", "qcow2", "--backing-dir", bases, overlayDots}, "outside --backing-dir"},
		{"backing-symlink-out", []string{"--format", "qcow2", "--backing-dir", bases, overlayLink}, "resolves to"},
		{"backing-missing", []string{"--format", "qcow2", "--backing-dir", bases, overlayMissing}, "does not exist"},
		{"backing-fifo", []string{"--format", "qcow2", "--backing-dir", bases, overlayFifo}, "not a regular file"},
		{"corrupt", []string{"--format", "qcow2", corrupt}, "corruption"},
		{"dirty", []string{"--format", "qcow2", dirty}, "dirty"},
		{"data-file", []string{"--format", "qcow2", dataFile}, "external data file"},
		{"missing", []string{"--format", "qcow2", p(up, "nope")}, "no such file"},
	}
	for _, c := range cases {
		r := img(t, append([]string{"verify"}, c.args...)...)
		line := strings.TrimSpace(r.stderr)
		switch {
		case c.reject == "" && r.code != 0:
			t.Errorf("%s: rejected (exit %d): %s", c.name, r.code, line)
		case c.reject != "" && r.code != 1:
			t.Errorf("%s: exit %d, want 1\n%s%s", c.name, r.code, r.stdout, r.stderr)
		case c.reject != "" && (!strings.Contains(line, c.reject) || strings.Contains(line, "\n")):
			t.Errorf("%s: want one line naming %q, got %q", c.name, c.reject, r.stderr)
		}
	}
}

// TestInfoFIFOBacking: an image whose backing file is a FIFO (opening it
// would block until a writer came) is inspected at once: nothing the image
// names is opened. The same image cannot be converted without declaring
// its chain, and that refusal is immediate too.
func TestInfoFIFOBacking(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	fifo := filepath.Join(dir, "base.fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qcow2")
	// -u: qemu-img must not open the FIFO either.
	qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", top, "64M")
	for _, args := range [][]string{
		{"info", "--format", "qcow2", top},
		{"info", "--format", "qcow2", "--output", "json", top},
		{"check", "--format", "qcow2", top},
		{"verify", "--format", "qcow2", top},
	} {
		r := img(t, args...)
		if r.code != 0 {
			t.Errorf("img %s: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
		}
		if r.took > 20*time.Second {
			t.Errorf("img %s took %v: did it wait on the FIFO?", strings.Join(args, " "), r.took)
		}
		if args[0] == "info" && !strings.Contains(r.stdout, fifo) {
			t.Errorf("img info does not report the backing name:\n%s", r.stdout)
		}
	}
	r := img(t, "convert", "--format", "qcow2", "-O", "raw", top, filepath.Join(dir, "out.raw"))
	if r.code != 1 || !strings.Contains(r.stderr, "not declared") {
		t.Errorf("convert with an undeclared backing file: exit %d: %s", r.code, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "out.raw")); !os.IsNotExist(err) {
		t.Errorf("failed convert left its output: %v", err)
	}
	// Declaring the FIFO is refused by the host before anything blocks.
	r = img(t, "convert", "--format", "qcow2", "--backing", fifo, "--backing-format", "raw", "-O", "raw", top, filepath.Join(dir, "out.raw"))
	if r.code != 1 || !strings.Contains(r.stderr, "not a regular file") {
		t.Errorf("convert with a FIFO declared: exit %d: %s", r.code, r.stderr)
	}
}

// TestProbe: probe prints its guess on stdout and a warning to record it.
func TestProbe(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	for format, want := range map[string]string{"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vdi": "vdi", "vhdx": "vhdx", "qed": "qed"} {
		p := filepath.Join(dir, "img."+format)
		qemuImg(t, "create", "-q", "-f", format, p, "16M")
		r := img(t, "probe", p)
		if r.code != 0 || strings.TrimSpace(r.stdout) != want || !strings.Contains(r.stderr, "warning") {
			t.Errorf("probe %s: exit %d, stdout %q, stderr %q", format, r.code, r.stdout, r.stderr)
		}
		if want != "raw" && want != "qcow2" && !strings.Contains(r.stderr, "raw and qcow2 only") {
			t.Errorf("probe %s does not say it is unsupported: %q", format, r.stderr)
		}
	}
}

// TestSandboxOff: the explicit opt-out works and warns.
func TestSandboxOff(t *testing.T) {
	qemuTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "a.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", p, "16M")
	r := img(t, "info", "--sandbox", "off", "--format", "qcow2", p)
	if r.code != 0 || !strings.Contains(r.stderr, "unconfined") {
		t.Errorf("--sandbox off: exit %d: %s", r.code, r.stderr)
	}
	r = img(t, "info", "--sandbox-disable", "seccomp", "--format", "qcow2", p)
	if r.code != 0 {
		t.Errorf("--sandbox-disable seccomp: exit %d: %s", r.code, r.stderr)
	}
}
