package imgtool

import (
	"fmt"
	"math"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// qemuSizeToStr is qemu's util/cutils.c size_to_str (7.2): the unit
// switches up once the value reaches 1000 of the current unit (>= 1000 *
// 1024^i / 1024), printed with %0.3g.
func qemuSizeToStr(val uint64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	_, e := math.Frexp(float64(val) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	if i < 0 {
		i = 0
	}
	div := uint64(1) << (uint(i) * 10)
	return fmt.Sprintf("%0.3g %sB", float64(val)/float64(div), suffixes[i])
}

// TestHumanSizeAsQemu (from review, helper-92): img info's human output "follows qemu-img
// info's layout", and prints "virtual size: X (N bytes)" and "disk size:
// X" with X in qemu-img's style. Sizes from 1000 to 1023 of a unit print
// differently: qemu-img says "0.977 KiB" for 1000 bytes and "1 MiB" for
// 1048064 bytes (an image of 1 MiB less one sector), krun-core "1000 B"
// and "1.02e+03 KiB". When qemu-img is on PATH, the virtual size line of
// a real qcow2 image of that size is compared too.
func TestHumanSizeAsQemu(t *testing.T) {
	sizes := []int64{512, 1000, 1023, 1536, 1024000, 1023488, 1048064, 1048576, 1073217536, 1073741312, 5000000000000}
	for _, n := range sizes {
		if got, want := humanSize(n), qemuSizeToStr(uint64(n)); got != want {
			t.Errorf("humanSize(%d) = %q, qemu-img prints %q", n, got, want)
		}
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return
	}
	dir := t.TempDir()
	for _, n := range []int64{1048064, 1073741312} {
		p := filepath.Join(dir, fmt.Sprint(n)+".qcow2")
		if exec.Command("qemu-img", "create", "-q", "-f", "qcow2", p, fmt.Sprint(n)).Run() != nil {
			continue
		}
		out, err := exec.Command("qemu-img", "info", p).Output()
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "virtual size: ") {
				mine := fmt.Sprintf("virtual size: %s (%d bytes)", humanSize(n), n)
				if l != mine {
					t.Errorf("qemu-img: %q, krun-core: %q", l, mine)
				}
			}
		}
	}
}
