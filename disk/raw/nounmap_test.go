package raw

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestWriteZeroesWithoutUnmapKeepsAllocation: WRITE_ZEROES without the
// unmap flag (Linux's REQ_NOUNMAP: BLKZEROOUT, fallocate ZERO_RANGE in the
// guest) leaves the range allocated, also on a file system without
// FALLOC_FL_ZERO_RANGE (tmpfs), where the range was punched and left a
// hole, so that a later write could fail for want of space (from review).
func TestWriteZeroesWithoutUnmapKeepsAllocation(t *testing.T) {
	f, err := os.CreateTemp("/dev/shm", "krun-raw-nounmap-*")
	if err != nil {
		t.Skipf("no tmpfs at /dev/shm to test on: %v", err)
	}
	defer os.Remove(f.Name())
	const size = 1 << 20
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xaa}, size), 0); err != nil {
		t.Fatal(err)
	}
	d, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.fallocate(unix.FALLOC_FL_ZERO_RANGE, 0, 4096); err == nil {
		t.Skip("/dev/shm takes FALLOC_FL_ZERO_RANGE: the fallback is not reached here")
	}
	var before, after unix.Stat_t
	unix.Fstat(d.fd, &before)
	if err := d.WriteZeroes(0, size, false); err != nil {
		t.Fatal(err)
	}
	unix.Fstat(d.fd, &after)
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, size)) {
		t.Fatal("the range does not read as zeroes")
	}
	if after.Blocks < before.Blocks {
		t.Fatalf("WriteZeroes without unmap deallocated the range: %d -> %d blocks", before.Blocks, after.Blocks)
	}
	// With unmap the hole stays.
	if err := d.WriteZeroes(0, size, true); err != nil {
		t.Fatal(err)
	}
	unix.Fstat(d.fd, &after)
	if after.Blocks != 0 {
		t.Errorf("WriteZeroes with unmap left %d blocks", after.Blocks)
	}
}
