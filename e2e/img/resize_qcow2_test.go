package img_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestResizeQcow2 grows qcow2 images made by qemu-img through the
// sandboxed plugin: what qemu-io wrote before reads back after, the new
// area reads as zeros and takes writes, qemu-img info shows the new size
// and qemu-img check finds nothing. A smaller size is refused with one
// line, with or without --shrink.
func TestResizeQcow2(t *testing.T) {
	krunCore(t)
	qemuTool(t, "qemu-img")
	qemuTool(t, "qemu-io")
	dir := t.TempDir()
	for _, c := range []struct {
		name, cluster string
		to            string // the SIZE argument
		want          int64
	}{
		{"64k-absolute", "65536", "64G", 64 << 30},
		{"64k-relative", "65536", "+10G", 10<<30 + 4<<20},
		// 512-byte clusters: 1 GiB needs a larger L1 table, written
		// after the end of the file, and the refcounts rebuilt.
		{"512-new-l1", "512", "1G", 1 << 30},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size="+c.cluster, p, "4M")
			qemuIO(t, p, "write -P 0x11 0 64k", "write -P 0x22 3M 1M")
			if out := mustImg(t, "resize", "-f", "qcow2", p, c.to); out != "Image resized.\n" {
				t.Errorf("stdout %q", out)
			}
			m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", p))
			if m["virtual-size"] != float64(c.want) || m["dirty-flag"] != false {
				t.Errorf("qemu-img info: virtual-size %v dirty %v, want %d, clean", m["virtual-size"], m["dirty-flag"], c.want)
			}
			// Exit 0: no errors, no leaks.
			qemuImg(t, "check", "-f", "qcow2", p)
			end := strconv.FormatInt(c.want-64<<10, 10) // the last 64 KiB
			qemuIO(t, p, "read -P 0x11 0 64k", "read -P 0x22 3M 1M", "read -P 0 4M 1M",
				"read -P 0 "+end+" 64k", "write -P 0x33 "+end+" 64k", "read -P 0x33 "+end+" 64k")
			qemuImg(t, "check", "-f", "qcow2", p)
			if out := mustImg(t, "info", "-f", "qcow2", p); !strings.Contains(out, "("+strconv.FormatInt(c.want, 10)+" bytes)") {
				t.Errorf("img info after: %s", out)
			}
		})
	}

	p := filepath.Join(dir, "shrink.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", p, "4M")
	for _, args := range [][]string{{"-f", "qcow2", p, "-1M"}, {"-f", "qcow2", "--shrink", p, "-1M"}, {"-f", "qcow2", "--shrink", p, "1M"}} {
		r := img(t, append([]string{"resize"}, args...)...)
		want := "krun-core img resize: " + p + ": shrinking a qcow2 image is not supported (the image has 4194304 bytes, asked for "
		if r.code != 1 || !strings.HasPrefix(r.stderr, want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("img resize %s: exit %d, stderr %q; want exit 1 and one line %q...", strings.Join(args, " "), r.code, r.stderr, want)
		}
	}
	if m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", p)); m["virtual-size"] != float64(4<<20) {
		t.Errorf("a refused shrink changed the size to %v", m["virtual-size"])
	}

	// Straight from qemu-img create, the file ends after the L1 table's
	// entries: the grown table must still be in the file (from review).
	fresh := filepath.Join(dir, "fresh.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", fresh, "1M")
	mustImg(t, "resize", "-f", "qcow2", fresh, "10G")
	qemuImg(t, "check", "-f", "qcow2", fresh)
	if out := mustImg(t, "check", "-f", "qcow2", fresh); !strings.Contains(out, "No errors") {
		t.Errorf("img check after growing a fresh image: %s", out)
	}

	// Internal snapshots are refused (as by disk/qcow2), in one line.
	s := filepath.Join(dir, "snap.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", s, "4M")
	qemuImg(t, "snapshot", "-c", "s1", s)
	r := img(t, "resize", "-f", "qcow2", s, "8M")
	if r.code != 1 || !strings.Contains(r.stderr, "snapshot") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("resize with a snapshot: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestResizeQcow2Backing grows qcow2 images made by qemu-img over a qcow2
// and a raw backing file (8 MiB of 0xbb, twice the image's size) through
// the sandboxed plugin, with the chain declared by -b/--backing-format
// after the file: qemu-img info shows the new size, qemu-io reads the new
// area as zeros and the old content as before (the image's own and the
// backing file's), the backing file is unchanged and qemu-img check finds
// nothing. Without the chain the refusal is one line naming --backing,
// and the image is unchanged. A version 2 image grows only where its
// backing file has no data.
func TestResizeQcow2Backing(t *testing.T) {
	krunCore(t)
	qemuTool(t, "qemu-img")
	qemuTool(t, "qemu-io")
	oneLine := func(r result) bool { return r.code == 1 && r.stdout == "" && strings.Count(r.stderr, "\n") == 1 }
	for _, baseFormat := range []string{"qcow2", "raw"} {
		t.Run(baseFormat, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base."+baseFormat)
			top := filepath.Join(dir, "top.qcow2")
			qemuImg(t, "create", "-q", "-f", baseFormat, base, "8M")
			sh(t, qemuTool(t, "qemu-io"), "-f", baseFormat, "-c", "write -P 0xbb 0 8M", base)
			qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base."+baseFormat, "-F", baseFormat, top, "4M")
			qemuIO(t, top, "write -P 0x11 0 64k")
			before, err := os.ReadFile(top)
			if err != nil {
				t.Fatal(err)
			}
			unchanged := func() {
				t.Helper()
				if after, _ := os.ReadFile(top); !bytes.Equal(after, before) {
					t.Error("a refused resize changed the image")
				}
			}

			r := img(t, "resize", "-f", "qcow2", top, "+4M")
			want := "krun-core img resize: backing chain mismatch: image " + top + ` names backing file "base.` + baseFormat +
				`", which was not declared (declare it with --backing FILE --backing-format FMT)` + "\n"
			if r.code != 1 || r.stderr != want || r.stdout != "" {
				t.Errorf("without the chain: exit %d, stdout %q, stderr %q; want exit 1 and %q", r.code, r.stdout, r.stderr, want)
			}
			unchanged()

			r = img(t, "resize", "-f", "qcow2", top, "-b", base, "--backing-format", baseFormat, "+4M")
			if r.code != 0 || r.stdout != "Image resized.\n" || r.stderr != "" {
				t.Fatalf("with the chain: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
			}
			m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", top))
			if m["virtual-size"] != float64(8<<20) || m["dirty-flag"] != false {
				t.Errorf("qemu-img info: virtual-size %v dirty %v, want %d, clean", m["virtual-size"], m["dirty-flag"], 8<<20)
			}
			qemuImg(t, "check", "-f", "qcow2", top)
			qemuIO(t, top, "read -P 0x11 0 64k", "read -P 0xbb 64k 4032k", "read -P 0 4M 4M")
			sh(t, qemuTool(t, "qemu-io"), "-f", baseFormat, "-r", "-c", "read -P 0xbb 0 8M", base)
			if out := mustImg(t, "check", "-f", "qcow2", top); !strings.Contains(out, "No errors") {
				t.Errorf("img check after: %s", out)
			}
		})
	}

	// Version 2 has no zero clusters: over a backing file with data
	// beyond the old size it is refused, unchanged; over one without
	// (as large as the image) it grows, and the new area reads as zeros.
	dir := t.TempDir()
	for _, c := range []struct {
		name, baseSize string
		ok             bool
	}{{"v2-over-data", "8M", false}, {"v2-no-data-beyond", "4M", true}} {
		base := filepath.Join(dir, c.name+".raw")
		top := filepath.Join(dir, c.name+".qcow2")
		qemuImg(t, "create", "-q", "-f", "raw", base, c.baseSize)
		sh(t, qemuTool(t, "qemu-io"), "-f", "raw", "-c", "write -P 0xbb 0 "+c.baseSize, base)
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", base, "-F", "raw", top, "4M")
		r := img(t, "resize", "-f", "qcow2", "--backing", base, "--backing-format", "raw", top, "8M")
		if !c.ok {
			if !oneLine(r) || !strings.Contains(r.stderr, "version 2") {
				t.Errorf("%s: exit %d, stderr %q; want one line on version 2", c.name, r.code, r.stderr)
			}
			if m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", top)); m["virtual-size"] != float64(4<<20) {
				t.Errorf("%s: a refused resize changed the size to %v", c.name, m["virtual-size"])
			}
			continue
		}
		if r.code != 0 {
			t.Errorf("%s: exit %d, stderr %q", c.name, r.code, r.stderr)
			continue
		}
		qemuImg(t, "check", "-f", "qcow2", top)
		qemuIO(t, top, "read -P 0xbb 0 4M", "read -P 0 4M 4M")
	}
}
