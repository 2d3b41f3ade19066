package devspec

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// sparseFile makes a file of size bytes (a hole) in dir.
func sparseFile(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDiskFileBytes: the RLIMIT_FSIZE a disk's plugin is launched with
// (sandbox.Limits.FileBytes) is a raw image's size, a qcow2 image's size
// plus its worst-case growth to max-size=, and none for a writable qcow2
// image without max-size= (lowered later, from its capacity); never below
// MinFileBytes, which the plugin's inflight memfd needs. The core reads no
// image byte: the qcow2 "images" here are files of zeros.
func TestDiskFileBytes(t *testing.T) {
	dir := t.TempDir()
	const big = 3 << 30 // above MinFileBytes
	bigRaw := sparseFile(t, dir, "big.raw", big)
	smallRaw := sparseFile(t, dir, "small.raw", 1<<20)
	q := sparseFile(t, dir, "d.qcow2", 320<<10)
	data := sparseFile(t, dir, "d.data", big)
	back := sparseFile(t, dir, "b.raw", 8*big) // read-only: never counts
	for _, c := range []struct {
		spec string
		want uint64
	}{
		{"path=" + bigRaw + ",format=raw", big},
		{"path=" + smallRaw + ",format=raw", MinFileBytes},
		{"path=" + bigRaw + ",format=raw,readonly=on", MinFileBytes},
		{"path=" + q + ",format=qcow2,max-size=10G", 320<<10 + 10<<30 + 10<<30/8 + qcow2GrowthSlack},
		{"path=" + q + ",format=qcow2,max-size=1M", MinFileBytes},
		{"path=" + q + ",format=qcow2,max-size=10G,data-file=" + data, big + 10<<30 + 10<<30/8 + qcow2GrowthSlack},
		{"path=" + q + ",format=qcow2,max-size=10G,backing=" + back + ",backing-format=raw", 320<<10 + 10<<30 + 10<<30/8 + qcow2GrowthSlack},
		{"path=" + q + ",format=qcow2", 0},
		{"path=" + q + ",format=qcow2,readonly=on", MinFileBytes},
	} {
		t.Run(c.spec[strings.LastIndex(c.spec[:strings.Index(c.spec, ",")], "/")+1:], func(t *testing.T) {
			o := openDisk(t, c.spec)
			got, err := o.FileBytes()
			if err != nil || got != c.want {
				t.Errorf("%s: FileBytes %d (%v), want %d", c.spec, got, err, c.want)
			}
			// The plugin has its own copies by now: the bound is worked
			// out from the device's.
			o.CloseFiles()
			if again, err := o.FileBytes(); err != nil || again != got {
				t.Errorf("%s: after CloseFiles, FileBytes %d (%v), want %d", c.spec, again, err, got)
			}
		})
	}
	var none Opened
	if n, err := none.FileBytes(); n != 0 || err != nil {
		t.Errorf("a device that is no disk: FileBytes %d %v, want 0", n, err)
	}
}

// TestDiskFileBytesRestart: a restarted plugin's bound starts from what
// the previous one left, so that a plugin killed mid-allocation (leaked
// clusters, at most one pool) does not make the next one's writes fail,
// however often that happens.
func TestDiskFileBytesRestart(t *testing.T) {
	dir := t.TempDir()
	q := sparseFile(t, dir, "d.qcow2", 1<<20)
	o := openDisk(t, "path="+q+",format=qcow2,max-size=1G")
	first, _ := o.FileBytes()
	if err := os.Truncate(q, int64(first)); err != nil { // a plugin grew it to its limit
		t.Fatal(err)
	}
	second, err := o.FileBytes()
	if want := first + QCOW2Growth(1<<30); err != nil || second != want {
		t.Errorf("after the image grew to %d: FileBytes %d (%v), want %d", first, second, err, want)
	}
}

func TestQCOW2Growth(t *testing.T) {
	for _, c := range []struct{ v, want uint64 }{
		{0, qcow2GrowthSlack},
		{8 << 30, 9<<30 + qcow2GrowthSlack},
		{math.MaxUint64 / 2, math.MaxUint64/2 + math.MaxUint64/16 + qcow2GrowthSlack},
		{math.MaxUint64 - qcow2GrowthSlack, math.MaxUint64},
		{math.MaxUint64, math.MaxUint64},
	} {
		if got := QCOW2Growth(c.v); got != c.want {
			t.Errorf("QCOW2Growth(%d) = %d, want %d", c.v, got, c.want)
		}
	}
}

// maxFileSize reads a process's RLIMIT_FSIZE (soft, hard) from
// /proc/PID/limits.
func maxFileSize(t *testing.T, pid int) (string, string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range strings.Split(string(b), "\n") {
		if f := strings.Fields(strings.TrimPrefix(ln, "Max file size")); len(f) >= 2 && strings.HasPrefix(ln, "Max file size") {
			return f[0], f[1]
		}
	}
	t.Fatalf("no Max file size in /proc/%d/limits", pid)
	return "", ""
}

// TestLimitFileBytes: a qcow2 disk without max-size= gets its plugin's
// bound once the plugin has said the capacity (its virtio-blk config):
// the image's size plus QCOW2Growth of it, set on the running process, and
// only ever lowered. A config too short to state a capacity states 0.
// Other disks keep the bound they were launched with.
func TestLimitFileBytes(t *testing.T) {
	dir := t.TempDir()
	q := sparseFile(t, dir, "d.qcow2", 1<<20)
	config := func(sectors uint64) []byte {
		c := make([]byte, 60)
		binary.LittleEndian.PutUint64(c, sectors)
		return c
	}
	for _, c := range []struct {
		name   string
		spec   string
		config []byte
		start  uint64 // the process's limit before; 0: unlimited
		want   string
	}{
		{"capacity", "format=qcow2", config(8 << 21), 0, strconv.FormatUint(1<<20+QCOW2Growth(8<<30), 10)},
		{"short config", "format=qcow2", []byte{1, 2, 3}, 0, strconv.FormatUint(MinFileBytes, 10)}, // 1 MiB + the slack is less
		{"huge capacity", "format=qcow2", config(math.MaxUint64), 0, "unlimited"},
		{"never raised", "format=qcow2", config(8 << 21), 100 << 10, ""},
		{"max-size", "format=qcow2,max-size=1G", config(8 << 21), 0, "unlimited"}, // launched with FileBytes
		{"raw", "format=raw", config(8 << 21), 0, "unlimited"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := openDisk(t, "path="+q+","+c.spec)
			// A child that stands for the plugin, with a lower limit
			// of its own for "never raised" (sh's ulimit counts blocks
			// of 512 or 1024 bytes: the limit is read back).
			cmd := exec.Command("sh", "-c", "exec sleep 60")
			if c.start != 0 {
				cmd = exec.Command("sh", "-c", "ulimit -f "+strconv.FormatUint(c.start, 10)+" && exec sleep 60")
			}
			if err := cmd.Start(); err != nil {
				t.Skipf("no sh to stand for the plugin: %v", err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			want := c.want
			if c.start != 0 {
				for i := 0; ; i++ {
					if soft, _ := maxFileSize(t, cmd.Process.Pid); soft != "unlimited" {
						want = soft
						break
					}
					if i == 500 {
						t.Fatal("the child's ulimit -f never took")
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
			if err := o.LimitFileBytes(cmd.Process.Pid, c.config, hclog.NewNullLogger()); err != nil {
				t.Fatal(err)
			}
			if soft, hard := maxFileSize(t, cmd.Process.Pid); soft != want || hard != want {
				t.Errorf("Max file size %s/%s, want %s", soft, hard, want)
			}
		})
	}
}

// openDisk parses and opens disk spec, closed when t ends.
func openDisk(t *testing.T, spec string) *Opened {
	t.Helper()
	d, err := ParseDisk(spec)
	if err != nil {
		t.Fatal(err)
	}
	o, err := d.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}
