package qcow2

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestLeakedRefcountsPastEndExtData (from review, helper-91; fixed: an
// external data file's clusters are mapped, not refcounted, so refcounts
// past the qcow2 file's end are leaks there too): the same leak as
// TestLeakedRefcountsPastEndIgnored, in an image with an external data
// file. Its L2 tables are still allocated in the qcow2 file through its
// refcounts, so a first refcount block of all ones sends the first new L2
// table 32 GiB out.
func TestLeakedRefcountsPastEndExtData(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("no qemu-img")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "leak.qcow2")
	dp := filepath.Join(dir, "leak.data")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o",
		"refcount_bits=1,cluster_size=65536,data_file="+dp, p, "1G").CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	f := openFile(t, p, false)
	fillFirstRefblock(t, f, 64<<10)
	st, _ := f.Stat()
	small := st.Size()
	f.Close()
	res, cerr := Check(openFile(t, p, true), RepairNone)
	t.Logf("check of the prepared image: corruptions %d, check errors %d, leaks %d, %v", res.Corruptions, res.CheckErrors, res.Leaks, cerr)

	im, err := Open(openFile(t, p, false), Options{Path: p,
		DataFile: &Layer{File: openFile(t, dp, false), Format: disk.Raw, Path: dp}})
	if err != nil {
		t.Fatal(err)
	}
	// A write in the second L2 table's range needs a new L2 table.
	writeStaysSmall(t, im, p, small, bytes.Repeat([]byte{0x5a}, 64<<10), 600<<20)
}
