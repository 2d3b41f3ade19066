package qcow2

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// patternCmds returns qemu-io commands that exercise an image with cluster
// size cs and virtual size size: partial clusters, writes crossing cluster
// and L2 boundaries, unaligned writes, zero writes, discards, the last
// bytes of the disk.
func patternCmds(cs, size int64, extL2 bool) []string {
	c := []string{
		"write -P 0x11 0 512",
		fmt.Sprintf("write -P 0x22 %d 1024", cs-512),
		fmt.Sprintf("write -P 0x33 %d 3000", 2*cs+100),
		fmt.Sprintf("write -P 0x44 %d %d", 5*cs, 4*cs),
		fmt.Sprintf("write -z %d %d", 6*cs, cs),
		fmt.Sprintf("write -z -u %d %d", 7*cs, cs),
		fmt.Sprintf("write -z %d 1024", 8*cs+512),
		fmt.Sprintf("discard %d %d", 3*cs, cs),
		fmt.Sprintf("write -P 0x55 %d 4096", size-4096),
		fmt.Sprintf("write -P 0x77 %d %d", size/2, max(cs/2, 512)),
	}
	l2cov := cs * cs / 8
	if extL2 {
		l2cov /= 2
		sc := cs / 32
		c = append(c,
			fmt.Sprintf("write -P 0x88 %d %d", 10*cs+3*sc, sc),
			fmt.Sprintf("write -P 0x99 %d %d", 10*cs+7*sc+100, 2*sc),
			fmt.Sprintf("write -z %d %d", 10*cs+20*sc, 2*sc),
		)
	}
	if l2cov < size-2048 {
		c = append(c, fmt.Sprintf("write -P 0x66 %d 2048", l2cov-1024))
	}
	return c
}

func imageSize(cs int64) int64 { return max(4<<20, 16*cs) }

// corpusCase builds one image (and its chain) in dir. It returns the top
// image and the chain to declare.
type corpusCase struct {
	name  string
	build func(t *testing.T, dir string) (string, []chainEntry)
}

type chainEntry struct {
	path   string
	format disk.Format
}

func qcow2Case(name string, cs int64, createOpts string, extL2 bool) corpusCase {
	return corpusCase{name, func(t *testing.T, dir string) (string, []chainEntry) {
		p := filepath.Join(dir, "img.qcow2")
		size := imageSize(cs)
		o := fmt.Sprintf("cluster_size=%d", cs)
		if createOpts != "" {
			o += "," + createOpts
		}
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", o, p, fmt.Sprint(size))
		qio(t, p, patternCmds(cs, size, extL2)...)
		return p, nil
	}}
}

// rawSource writes a raw file with compressible and incompressible data.
func rawSource(t *testing.T, path string, size int64, seed int64) {
	b := make([]byte, size)
	r := rand.New(rand.NewSource(seed))
	for off := int64(0); off < size; off += 64 << 10 {
		switch r.Intn(4) {
		case 0: // random
			r.Read(b[off:min(off+64<<10, size)])
		case 1: // repetitive text
			for i := off; i < min(off+64<<10, size); i++ {
				b[i] = "krun-core qcow2 "[i%16]
			}
		case 2: // zeroes
		default: // sparse bytes
			for i := off; i < min(off+64<<10, size); i += 977 {
				b[i] = byte(i)
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func compressedCase(name string, cs int64, ctype string, extra ...string) corpusCase {
	return corpusCase{name, func(t *testing.T, dir string) (string, []chainEntry) {
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, 6<<20+12345&^511, cs)
		p := filepath.Join(dir, "img.qcow2")
		o := fmt.Sprintf("cluster_size=%d,compression_type=%s", cs, ctype)
		for _, e := range extra {
			o += "," + e
		}
		sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, src, p)
		// Some uncompressed writes on top of compressed clusters.
		qio(t, p, fmt.Sprintf("write -P 0x5a %d 4096", cs+512), fmt.Sprintf("write -z %d %d", 2*cs, cs))
		return p, nil
	}}
}

func corpusCases(short bool) []corpusCase {
	var cases []corpusCase
	for cb := 9; cb <= 21; cb++ {
		if short && cb%3 != 0 {
			continue // -short: 512 B, 4 KiB, 32 KiB, 256 KiB, 2 MiB
		}
		cs := int64(1) << cb
		cases = append(cases, qcow2Case(fmt.Sprintf("v3-cs%d", cs), cs, "", false))
	}
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		cases = append(cases, qcow2Case(fmt.Sprintf("v2-cs%d", cs), cs, "compat=0.10", false))
	}
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		if short && bits != 1 && bits != 64 {
			continue
		}
		cases = append(cases, qcow2Case(fmt.Sprintf("refcount%d-cs512", bits), 512, fmt.Sprintf("refcount_bits=%d", bits), false))
		cases = append(cases, qcow2Case(fmt.Sprintf("refcount%d-cs64k", bits), 65536, fmt.Sprintf("refcount_bits=%d", bits), false))
	}
	cases = append(cases, qcow2Case("lazy-refcounts", 65536, "lazy_refcounts=on", false))
	for _, cs := range []int64{16384, 65536, 2 << 20} {
		cases = append(cases, qcow2Case(fmt.Sprintf("extl2-cs%d", cs), cs, "extended_l2=on", true))
	}
	for _, p := range []string{"off", "metadata", "falloc", "full"} {
		cases = append(cases, qcow2Case("prealloc-"+p, 65536, "preallocation="+p, false))
	}
	cases = append(cases, qcow2Case("prealloc-metadata-cs4k", 4096, "preallocation=metadata", false))
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		cases = append(cases, compressedCase(fmt.Sprintf("zlib-cs%d", cs), cs, "zlib"))
		cases = append(cases, compressedCase(fmt.Sprintf("zstd-cs%d", cs), cs, "zstd"))
	}
	cases = append(cases, compressedCase("zlib-extl2-cs64k", 65536, "zlib", "extended_l2=on"))
	cases = append(cases, compressedCase("zstd-extl2-cs32k", 32768, "zstd", "extended_l2=on"))
	cases = append(cases, corpusCase{"data-file-relative-with-backing", func(t *testing.T, dir string) (string, []chainEntry) {
		base := filepath.Join(dir, "base.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
		qio(t, base, "write -P 0x61 0 4M")
		p := filepath.Join(dir, "img.qcow2")
		// Run from the image's directory so that the recorded data file
		// name is relative.
		shDir(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "data_file=img.data", "img.qcow2", "4M")
		qio(t, p, patternCmds(65536, 4<<20, false)...)
		f := openFile(t, p, true)
		info, err := ReadInfo(f)
		f.Close()
		if err != nil || info.DataFile != "img.data" {
			t.Fatalf("data file name %q, %v", info.DataFile, err)
		}
		return p, []chainEntry{{base, disk.QCOW2}}
	}})
	cases = append(cases, corpusCase{"snapshots", func(t *testing.T, dir string) (string, []chainEntry) {
		p := filepath.Join(dir, "img.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "8M")
		qio(t, p, "write -P 0x01 0 1M", "write -P 0x02 3M 64k")
		sh(t, "qemu-img", "snapshot", "-c", "one", p)
		qio(t, p, "write -P 0x03 512k 8k", "write -z 3M 4k", "discard 0 64k")
		sh(t, "qemu-img", "snapshot", "-c", "two", p)
		qio(t, p, "write -P 0x04 700k 100k", "write -P 0x05 7M 1M")
		return p, nil
	}})
	cases = append(cases, corpusCase{"raw-backing", func(t *testing.T, dir string) (string, []chainEntry) {
		base := filepath.Join(dir, "base.raw")
		rawSource(t, base, 3<<20+4096, 7) // smaller than the top image
		p := filepath.Join(dir, "top.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=65536", p, "8M")
		qio(t, p, patternCmds(65536, 8<<20, false)...)
		return p, []chainEntry{{base, disk.Raw}}
	}})
	cases = append(cases, corpusCase{"qcow2-chain-compressed-base", func(t *testing.T, dir string) (string, []chainEntry) {
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, 4<<20, 11)
		base := filepath.Join(dir, "base.qcow2")
		sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, base)
		mid := filepath.Join(dir, "mid.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "cluster_size=65536,extended_l2=on", mid, "6M")
		qio(t, mid, patternCmds(65536, 6<<20, true)...)
		top := filepath.Join(dir, "top.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=16384", top, "8M")
		qio(t, top, patternCmds(16384, 8<<20, false)...)
		return top, []chainEntry{{mid, disk.QCOW2}, {base, disk.QCOW2}}
	}})
	cases = append(cases, corpusCase{"v2-backing", func(t *testing.T, dir string) (string, []chainEntry) {
		base := filepath.Join(dir, "base.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", base, "2M")
		qio(t, base, "write -P 0x31 0 2M")
		top := filepath.Join(dir, "top.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "compat=0.10", top, "4M")
		qio(t, top, patternCmds(65536, 4<<20, false)...)
		return top, []chainEntry{{base, disk.QCOW2}}
	}})
	cases = append(cases, corpusCase{"data-file", func(t *testing.T, dir string) (string, []chainEntry) {
		p := filepath.Join(dir, "img.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "img.data"), p, "4M")
		qio(t, p, patternCmds(65536, 4<<20, false)...)
		return p, nil
	}})
	cases = append(cases, corpusCase{"data-file-raw", func(t *testing.T, dir string) (string, []chainEntry) {
		p := filepath.Join(dir, "img.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "img.data")+",data_file_raw=on", p, "4M")
		qio(t, p, patternCmds(65536, 4<<20, false)...)
		return p, nil
	}})
	cases = append(cases, corpusCase{"bitmaps", func(t *testing.T, dir string) (string, []chainEntry) {
		p := filepath.Join(dir, "img.qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
		sh(t, "qemu-img", "bitmap", "--add", p, "b0")
		qio(t, p, patternCmds(65536, 4<<20, false)...)
		return p, nil
	}})
	return cases
}

// TestCorpusMatchesQemu reads every image of the corpus through Open and
// compares each byte with `qemu-img convert -O raw`.
func TestCorpusMatchesQemu(t *testing.T) {
	needQemu(t)
	for i, c := range corpusCases(testing.Short()) {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			top, chain := c.build(t, dir)
			want := qemuRaw(t, top)
			for _, ro := range []bool{true, false} {
				var layers []Layer
				for _, e := range chain {
					layers = append(layers, layerOf(t, e.path, e.format))
				}
				opts := Options{ReadOnly: ro, Path: top, Backing: layers}
				if df := filepath.Join(dir, "img.data"); fileExists(df) {
					l := Layer{File: openFile(t, df, ro), Format: disk.Raw, Path: df}
					opts.DataFile = &l
				}
				im, err := Open(openFile(t, top, ro), opts)
				if err != nil {
					t.Fatalf("Open(ro=%v): %v", ro, err)
				}
				compareImage(t, im, want, int64(i))
				if err := im.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
			}
			// Opening read-write must leave the image clean for QEMU.
			qemuClean(t, top)
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
