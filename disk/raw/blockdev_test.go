package raw

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBlockDeviceMisalignedZeroesNotLatched: on a block device of 4096-byte
// logical sectors, fallocate refuses a range that is not aligned to them
// with EINVAL, which the raw disk took for "this file cannot do that mode"
// and remembered for good: one misaligned write-zeroes (or discard) from
// the guest turned off zero-range and hole punching for the disk's life,
// and every later write-zeroes wrote its zeroes byte by byte. The
// misaligned request falls back alone now.
func TestBlockDeviceMisalignedZeroesNotLatched(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	const size = 4 << 20
	back := filepath.Join(t.TempDir(), "back.raw")
	if err := os.WriteFile(back, bytes.Repeat([]byte{0xaa}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", "--sector-size", "4096", back).CombinedOutput()
	if err != nil {
		t.Skipf("losetup with 4096-byte sectors: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	for _, c := range []struct {
		name      string
		off, n    int64
		unmap     bool
		discard   bool
		wantZeros bool
	}{
		{"zeroes-misaligned", 512, 512, false, false, true},
		{"zeroes-unmap-misaligned", 1536, 1024, true, false, true},
		{"discard-misaligned", 8192 + 512, 512, false, true, false},
		{"zeroes-aligned", 16384, 4096, false, false, true},
		{"zeroes-unmap-aligned", 32768, 8192, true, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.discard {
				err = d.Discard(c.off, c.n)
			} else {
				err = d.WriteZeroes(c.off, c.n, c.unmap)
			}
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, c.n+1024)
			if _, err := d.ReadAt(got, c.off-512); err != nil {
				t.Fatal(err)
			}
			if c.wantZeros && !bytes.Equal(got[512:512+c.n], make([]byte, c.n)) {
				t.Fatal("the range does not read as zeroes")
			}
			if got[0] != 0xaa && c.off%4096 != 0 {
				t.Fatalf("the byte before the range is %#x", got[0])
			}
			if d.noZeroRange.Load() || d.noPunchHole.Load() {
				t.Fatalf("a misaligned range turned a fallocate mode off for good (zero range off %v, punch hole off %v)",
					d.noZeroRange.Load(), d.noPunchHole.Load())
			}
		})
	}
}
