package guestmem

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"testing"
	"unsafe"
)

// TestGuestMemoryNotDumped: every mapping of guest memory is marked
// MADV_DONTDUMP ("dd" in /proc/self/smaps), so that a core dump of the
// core or of a plugin, which a pipe core_pattern takes whatever
// RLIMIT_CORE says, does not carry the guest's memory.
func TestGuestMemoryNotDumped(t *testing.T) {
	m := twoRegions(t)
	if len(m.regions) != 2 {
		t.Fatalf("%d regions mapped", len(m.regions))
	}
	for i, r := range m.regions {
		start := uintptr(unsafe.Pointer(&r.mapping[0]))
		flags, err := vmFlags(start)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(" "+flags+" ", " dd ") {
			t.Errorf("region %d at %#x: VmFlags %q, without dd (MADV_DONTDUMP)", i, start, flags)
		}
	}
}

// vmFlags returns the VmFlags line of the mapping that holds addr (two
// mappings of one file next to each other may be one).
func vmFlags(addr uintptr) (string, error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return "", err
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var lo, hi uintptr
		if n, _ := fmt.Sscanf(line, "%x-%x ", &lo, &hi); n == 2 {
			in = lo <= addr && addr < hi
		}
		if in && strings.HasPrefix(line, "VmFlags:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "VmFlags:")), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("no mapping holds %#x in /proc/self/smaps", addr)
}
