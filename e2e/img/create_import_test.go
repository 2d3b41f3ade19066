package img_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCreate: img create output passes qemu-img check, reads back through
// qemu-img with what it was asked for, and compares equal to what it
// should hold (zeroes, or its backing file's content).
func TestCreate(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	t.Chdir(dir)
	rawSource(t, "base.raw", 5<<20, 3)
	qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2")
	if err := os.Mkdir("sub", 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		args    []string
		compare string // image (and format) the result must equal; "" zeroes
		cmpFmt  string
		want    map[string]any // qemu-img info keys
		data    map[string]any // qemu-img info format-specific.data keys
	}{
		{"plain", []string{"--size", "1G"}, "", "", map[string]any{"virtual-size": float64(1 << 30), "cluster-size": 65536.0}, map[string]any{"compat": "1.1"}},
		{"odd-size", []string{"--size", "1000001"}, "", "", map[string]any{"virtual-size": 1000448.0}, nil},
		{"cluster-512", []string{"--size", "64M", "--cluster-size", "512"}, "", "", map[string]any{"cluster-size": 512.0}, nil},
		{"cluster-2M", []string{"--size", "3T", "--cluster-size", "2M"}, "", "", map[string]any{"cluster-size": float64(2 << 20), "virtual-size": float64(3 << 40)}, nil},
		{"zstd", []string{"--size", "1G", "--compression", "zstd"}, "", "", nil, map[string]any{"compression-type": "zstd"}},
		{"backing-raw", []string{"--backing", "base.raw", "--backing-format", "raw"}, "base.raw", "raw",
			map[string]any{"virtual-size": float64(5 << 20), "backing-filename": "base.raw", "backing-filename-format": "raw"}, nil},
		{"backing-qcow2-larger", []string{"--size", "8M", "--backing", "base.qcow2", "--backing-format", "qcow2"}, "base.qcow2", "qcow2",
			map[string]any{"virtual-size": float64(8 << 20), "backing-filename": "base.qcow2", "backing-filename-format": "qcow2"}, nil},
		{"backing-relative-to-image", []string{"--backing", "../base.qcow2", "--backing-format", "qcow2"}, "base.qcow2", "qcow2",
			map[string]any{"backing-filename": "../base.qcow2"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := c.name + ".qcow2"
			if strings.Contains(c.name, "relative-to-image") {
				out = filepath.Join("sub", out)
			}
			mustImg(t, append(append([]string{"create", "--format", "qcow2"}, c.args...), out)...)
			qemuImg(t, "check", "-f", "qcow2", out)
			info := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", out))
			for k, v := range c.want {
				if info[k] != v {
					t.Errorf("qemu-img info %s = %v, want %v", k, info[k], v)
				}
			}
			data := info["format-specific"].(map[string]any)["data"].(map[string]any)
			for k, v := range c.data {
				if data[k] != v {
					t.Errorf("qemu-img info data %s = %v, want %v", k, data[k], v)
				}
			}
			if c.compare != "" {
				qemuImg(t, "compare", "-f", "qcow2", "-F", c.cmpFmt, out, c.compare)
			} else if vs, _ := info["virtual-size"].(float64); vs <= 1<<30 {
				zero := c.name + ".zero"
				qemuImg(t, "create", "-q", "-f", "raw", zero, fmt.Sprint(int64(vs)))
				qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", out, zero)
			}
		})
	}
	for _, bad := range [][]string{
		{"--size", "1G", "--cluster-size", "3000"},
		{"--size", "1G", "--compression", "lz4"},
		{"--backing", "base.raw", "--backing-format", "qcow2"},
		{"--backing", "missing.raw", "--backing-format", "raw"},
	} {
		r := img(t, append(append([]string{"create", "--format", "qcow2"}, bad...), "bad.qcow2")...)
		if r.code != 1 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("create %v: exit %d, %q", bad, r.code, r.stderr)
		}
		if _, err := os.Stat("bad.qcow2"); !os.IsNotExist(err) {
			t.Errorf("create %v left its output: %v", bad, err)
			os.Remove("bad.qcow2")
		}
	}
}

// contentChunk fills b with MiB chunk i of the import test content: random
// bytes in every fourth chunk, a few bytes in every seventh, zeroes
// elsewhere.
func contentChunk(b []byte, i int64) {
	clear(b)
	switch {
	case i%4 == 0:
		rand.New(rand.NewSource(i)).Read(b)
	case i%7 == 0:
		copy(b[len(b)-9:], fmt.Sprintf("chunk%04d", i%10000))
	}
}

// writeSparse writes the content of n MiB chunks to path, skipping zero
// chunks (the file stays sparse).
func writeSparse(t *testing.T, path string, n int64) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1<<20)
	for i := range n {
		if i%4 == 0 || i%7 == 0 {
			contentChunk(b, i)
			if _, err := f.WriteAt(b, i<<20); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Truncate(n << 20); err != nil {
		t.Fatal(err)
	}
}

// feed writes n MiB chunks of content into w, returning the bytes written
// before the reader went away.
func feed(w io.WriteCloser, n int64) (int64, error) {
	defer w.Close()
	b := make([]byte, 1<<20)
	var total int64
	for i := range n {
		contentChunk(b, i)
		m, err := w.Write(b)
		total += int64(m)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// importPipe runs `krun-core img import ARGS` with n MiB of content on a
// pipe and returns the result and the bytes the command consumed.
func importPipe(t *testing.T, n int64, args ...string) (result, int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, krunCore(t), append([]string{"img", "import"}, args...)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdin = pr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	fed := make(chan int64, 1)
	go func() {
		n, _ := feed(pw, n)
		fed <- n
	}()
	err = cmd.Wait()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return r, <-fed
}

// TestImport1GiB streams 1 GiB through a pipe into a new qcow2 image that
// qemu-img compare finds equal to the input, then streams it again with a
// smaller --max-size: exit 1, no output left, and the input is not read to
// its end.
func TestImport1GiB(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	const mib = 1024
	ref := filepath.Join(dir, "ref.raw")
	writeSparse(t, ref, mib)

	out := filepath.Join(dir, "imported.qcow2")
	r, fed := importPipe(t, mib, "--from-format", "raw", "--format", "qcow2", "--max-size", "1G", out)
	if r.code != 0 {
		t.Fatalf("import: exit %d\n%s", r.code, r.stderr)
	}
	if fed != mib<<20 {
		t.Errorf("import consumed %d bytes, fed %d", fed, int64(mib)<<20)
	}
	qemuImg(t, "check", "-f", "qcow2", out)
	qemuImg(t, "compare", "-f", "raw", "-F", "qcow2", ref, out)
	info := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", out))
	if info["virtual-size"] != float64(1<<30) {
		t.Errorf("virtual size %v", info["virtual-size"])
	}
	if as, _ := info["actual-size"].(float64); as > 600<<20 {
		t.Errorf("zero chunks were stored: the image occupies %v bytes", as)
	}

	over := filepath.Join(dir, "over.qcow2")
	r, fed = importPipe(t, mib, "--format", "qcow2", "--max-size", "300M", over)
	if r.code != 1 || !strings.Contains(r.stderr, "exceeds --max-size") {
		t.Errorf("import over the limit: exit %d: %s", r.code, r.stderr)
	}
	if fed >= 400<<20 {
		t.Errorf("import over a 300 MiB limit consumed %d bytes", fed)
	}
	if _, err := os.Stat(over); !os.IsNotExist(err) {
		t.Errorf("import over the limit left its output: %v", err)
	}

	// Raw output and compression, smaller.
	small := filepath.Join(dir, "small.ref")
	writeSparse(t, small, 64)
	for _, v := range [][]string{
		{"--format", "raw", "--max-size", "64M"},
		{"--format", "qcow2", "--max-size", "64M", "--compress", "--compression", "zstd"},
	} {
		o := filepath.Join(dir, "small-"+v[1]+".img")
		r, _ := importPipe(t, 64, append(v, o)...)
		if r.code != 0 {
			t.Fatalf("import %v: exit %d\n%s", v, r.code, r.stderr)
		}
		qemuImg(t, "compare", "-f", "raw", "-F", v[1], small, o)
	}
}
