package img_test

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// A corpus of qcow2 images made with qemu-img and qemu-io at test time, the
// same kinds the qcow2 plugin is tested with: every cluster size, version
// 2, odd refcount widths, lazy refcounts, extended L2, preallocation,
// compressed clusters (zlib, zstd), internal snapshots, raw and qcow2
// backing chains, external data files and persistent bitmaps.

// patternCmds returns qemu-io commands that touch partial clusters,
// cluster and L2 boundaries, zero writes, discards and the disk's end.
func patternCmds(cs, size int64) []string {
	c := []string{
		"write -P 0x11 0 512",
		fmt.Sprintf("write -P 0x22 %d 1024", cs-512),
		fmt.Sprintf("write -P 0x33 %d 3000", 2*cs+100),
		fmt.Sprintf("write -P 0x44 %d %d", 5*cs, 4*cs),
		fmt.Sprintf("write -z %d %d", 6*cs, cs),
		fmt.Sprintf("discard %d %d", 3*cs, cs),
		fmt.Sprintf("write -P 0x55 %d 4096", size-4096),
		fmt.Sprintf("write -P 0x77 %d %d", size/2, max(cs/2, 512)),
	}
	if l2cov := cs * cs / 8; l2cov < size-2048 {
		c = append(c, fmt.Sprintf("write -P 0x66 %d 2048", l2cov-1024))
	}
	return c
}

func imageSize(cs int64) int64 { return max(4<<20, 16*cs) }

// rawSource writes a raw file mixing random, repetitive, zero and sparse
// 64 KiB blocks.
func rawSource(t *testing.T, path string, size int64, seed int64) {
	t.Helper()
	b := make([]byte, size)
	r := rand.New(rand.NewSource(seed))
	for off := int64(0); off < size; off += 64 << 10 {
		end := min(off+64<<10, size)
		switch r.Intn(4) {
		case 0:
			r.Read(b[off:end])
		case 1:
			for i := off; i < end; i++ {
				b[i] = "krun-core img "[i%14]
			}
		case 2:
		default:
			for i := off; i < end; i += 977 {
				b[i] = byte(i)
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// layer is one declared file of a chain.
type layer struct {
	path, format string
}

// corpusImage is a built corpus image: the top image, its declared
// backing chain and data file.
type corpusImage struct {
	path     string
	backing  []layer
	dataFile string
}

// declare returns the img flags that declare the image's chain.
func (c corpusImage) declare() []string {
	var a []string
	for _, b := range c.backing {
		a = append(a, "--backing", b.path, "--backing-format", b.format)
	}
	if c.dataFile != "" {
		a = append(a, "--data-file", c.dataFile)
	}
	return a
}

type corpusCase struct {
	name  string
	build func(t *testing.T, dir string) corpusImage
}

func plainCase(name string, cs int64, opts string) corpusCase {
	return corpusCase{name, func(t *testing.T, dir string) corpusImage {
		p := filepath.Join(dir, "img.qcow2")
		size := imageSize(cs)
		o := fmt.Sprintf("cluster_size=%d", cs)
		if opts != "" {
			o += "," + opts
		}
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", o, p, fmt.Sprint(size))
		qemuIO(t, p, patternCmds(cs, size)...)
		return corpusImage{path: p}
	}}
}

func compressedCase(name string, cs int64, ctype string) corpusCase {
	return corpusCase{name, func(t *testing.T, dir string) corpusImage {
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, 6<<20+12345&^511, cs)
		p := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", fmt.Sprintf("cluster_size=%d,compression_type=%s", cs, ctype), src, p)
		qemuIO(t, p, fmt.Sprintf("write -P 0x5a %d 4096", cs+512), fmt.Sprintf("write -z %d %d", 2*cs, cs))
		return corpusImage{path: p}
	}}
}

func corpusCases() []corpusCase {
	var cases []corpusCase
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		cases = append(cases, plainCase(fmt.Sprintf("v3-cs%d", cs), cs, ""))
	}
	cases = append(cases,
		plainCase("v2-cs65536", 65536, "compat=0.10"),
		plainCase("v2-cs4096", 4096, "compat=0.10"),
		plainCase("refcount1", 4096, "refcount_bits=1"),
		plainCase("refcount64", 65536, "refcount_bits=64"),
		plainCase("lazy-refcounts", 65536, "lazy_refcounts=on"),
		plainCase("extl2", 65536, "extended_l2=on"),
		plainCase("prealloc-metadata", 65536, "preallocation=metadata"),
		plainCase("prealloc-full", 65536, "preallocation=full"),
		compressedCase("zlib-cs4096", 4096, "zlib"),
		compressedCase("zlib-cs65536", 65536, "zlib"),
		compressedCase("zstd-cs65536", 65536, "zstd"),
		compressedCase("zstd-cs2M", 2<<20, "zstd"),
	)
	cases = append(cases, corpusCase{"snapshots", func(t *testing.T, dir string) corpusImage {
		p := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "8M")
		qemuIO(t, p, "write -P 0x01 0 1M", "write -P 0x02 3M 64k")
		qemuImg(t, "snapshot", "-c", "one", p)
		qemuIO(t, p, "write -P 0x03 512k 8k", "write -z 3M 4k", "discard 0 64k")
		qemuImg(t, "snapshot", "-c", "two", p)
		qemuIO(t, p, "write -P 0x04 700k 100k")
		return corpusImage{path: p}
	}})
	cases = append(cases, corpusCase{"raw-backing", func(t *testing.T, dir string) corpusImage {
		base := filepath.Join(dir, "base.raw")
		rawSource(t, base, 3<<20+4096, 7) // smaller than the top image
		p := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p, "8M")
		qemuIO(t, p, patternCmds(65536, 8<<20)...)
		return corpusImage{path: p, backing: []layer{{base, "raw"}}}
	}})
	cases = append(cases, corpusCase{"qcow2-chain", func(t *testing.T, dir string) corpusImage {
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, 4<<20, 11)
		base := filepath.Join(dir, "base.qcow2")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, base)
		mid := filepath.Join(dir, "mid.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "extended_l2=on", mid, "6M")
		qemuIO(t, mid, patternCmds(65536, 6<<20)...)
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=16384", top, "8M")
		qemuIO(t, top, patternCmds(16384, 8<<20)...)
		return corpusImage{path: top, backing: []layer{{mid, "qcow2"}, {base, "qcow2"}}}
	}})
	cases = append(cases, corpusCase{"v2-backing", func(t *testing.T, dir string) corpusImage {
		base := filepath.Join(dir, "base.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", base, "2M")
		qemuIO(t, base, "write -P 0x31 0 2M")
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "compat=0.10", top, "4M")
		qemuIO(t, top, patternCmds(65536, 4<<20)...)
		return corpusImage{path: top, backing: []layer{{base, "qcow2"}}}
	}})
	cases = append(cases, corpusCase{"data-file", func(t *testing.T, dir string) corpusImage {
		p := filepath.Join(dir, "img.qcow2")
		data := filepath.Join(dir, "img.data")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+data, p, "4M")
		qemuIO(t, p, patternCmds(65536, 4<<20)...)
		return corpusImage{path: p, dataFile: data}
	}})
	cases = append(cases, corpusCase{"bitmaps", func(t *testing.T, dir string) corpusImage {
		p := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", p, "4M")
		qemuImg(t, "bitmap", "--add", p, "b0")
		qemuIO(t, p, patternCmds(65536, 4<<20)...)
		return corpusImage{path: p}
	}})
	return cases
}

// sharedKeys are the keys `img info --output json` shares with qemu-img.
var sharedKeys = []string{"filename", "format", "virtual-size", "actual-size", "cluster-size",
	"backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag", "snapshots"}

var sharedDataKeys = []string{"compat", "refcount-bits", "compression-type", "lazy-refcounts", "corrupt",
	"extended-l2", "data-file", "data-file-raw"}

// TestCorpus builds each corpus image, then checks that img info agrees
// with qemu-img info on every shared key, that img convert -O raw writes
// exactly what qemu-img convert -O raw writes, and that img convert -O
// qcow2 (plain and compressed) passes qemu-img check and compare.
func TestCorpus(t *testing.T) {
	qemuTool(t, "qemu-img")
	for _, c := range corpusCases() {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			ci := c.build(t, dir)
			// Relative names, as a user in the image's directory types them.
			t.Chdir(dir)
			rel := filepath.Base(ci.path)

			ours := decodeJSON(t, mustImg(t, "info", "--format", "qcow2", "--output", "json", rel))
			theirs := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", rel))
			for _, k := range sharedKeys {
				if !reflect.DeepEqual(ours[k], theirs[k]) {
					t.Errorf("info key %q: img %v, qemu-img %v", k, ours[k], theirs[k])
				}
			}
			od := ours["format-specific"].(map[string]any)["data"].(map[string]any)
			td := theirs["format-specific"].(map[string]any)["data"].(map[string]any)
			for _, k := range sharedDataKeys {
				if !reflect.DeepEqual(od[k], td[k]) {
					t.Errorf("info format-specific.data key %q: img %v, qemu-img %v", k, od[k], td[k])
				}
			}

			args := append([]string{"convert", "--format", "qcow2"}, ci.declare()...)
			mustImg(t, append(args, "-O", "raw", rel, "ours.raw")...)
			qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", rel, "qemu.raw")
			if !sameFile(t, "ours.raw", "qemu.raw") {
				t.Errorf("img convert -O raw differs from qemu-img convert -O raw")
			}
			for _, v := range []struct {
				name  string
				extra []string
			}{
				{"plain", nil},
				{"zlib", []string{"--compress"}},
				{"zstd-4k", []string{"--compress", "--compression", "zstd", "--cluster-size", "4K"}},
			} {
				out := "ours-" + v.name + ".qcow2"
				a := append(append(append([]string(nil), args...), v.extra...), "-O", "qcow2", rel, out)
				mustImg(t, a...)
				qemuImg(t, "check", "-f", "qcow2", out)
				qemuImg(t, "compare", "-f", "qcow2", "-F", "qcow2", rel, out)
				// And back through krun-core: the raw content is the same.
				back := "back-" + v.name + ".raw"
				mustImg(t, "convert", "--format", "qcow2", "-O", "raw", out, back)
				if !sameFile(t, back, "qemu.raw") {
					t.Errorf("%s: qcow2 output converted back to raw differs", v.name)
				}
			}
			if strings.HasPrefix(c.name, "zlib") || strings.HasPrefix(c.name, "zstd") {
				// qemu-img reports compressed clusters; so must a flattened
				// recompression.
				r := qemuImg(t, "check", "--output", "json", "ours-zlib.qcow2")
				if m := decodeJSON(t, r); m["compressed-clusters"] == nil {
					t.Errorf("--compress output has no compressed clusters: %s", r)
				}
			}
		})
	}
}
