package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestCorruptBackingLeavesOverlayWritable (from review): corruption found
// in a backing layer (a hostile or damaged base image, shared read-only by
// many overlays) comes back wrapped in backingError, which exists "so that
// it is not taken for corruption of this image". Nothing looked at it, and
// it unwraps to ErrCorrupt, so markCorrupt took it for the overlay's own:
// the overlay's corrupt bit was written, every later write of the guest
// failed, and the overlay no longer opened read-write (a restarted plugin
// could not serve it) although nothing in it was wrong.
func TestCorruptBackingLeavesOverlayWritable(t *testing.T) {
	dir := t.TempDir()
	const cs = 64 << 10
	base := filepath.Join(dir, "base.qcow2")
	f, err := os.Create(base)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 4 << 20, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	bim := openImage(t, base, false)
	if _, err := bim.WriteAt(bytes.Repeat([]byte{0x11}, cs), 0); err != nil {
		t.Fatal(err)
	}
	l2 := bim.l1[0] & l1OffsetMask
	ci, err := bim.lookup(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := bim.Close(); err != nil {
		t.Fatal(err)
	}
	// Damage the base: a reserved bit in guest cluster 0's L2 entry.
	var e [8]byte
	be.PutUint64(e[:], ci.host|flagCopied|1<<1)
	wf := openFile(t, base, false)
	if _, err := wf.WriteAt(e[:], int64(l2)); err != nil {
		t.Fatal(err)
	}
	wf.Close()

	ov := filepath.Join(dir, "overlay.qcow2")
	f, err = os.Create(ov)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 4 << 20, ClusterSize: cs, BackingFile: base, BackingFormat: disk.QCOW2}); err != nil {
		t.Fatal(err)
	}
	f.Close()

	im := openImage(t, ov, false, layerOf(t, base, disk.QCOW2))
	buf := make([]byte, 4096)
	if _, err := im.ReadAt(buf, 0); err == nil || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("read over the damaged base: %v, want an error", err)
	}
	// The overlay itself is fine: writing elsewhere must still work.
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x22}, 4096), 1<<20); err != nil {
		t.Errorf("write to the overlay after a backing read failed: %v", err)
	}
	im.Close()
	im2, err := Open(openFile(t, ov, false), Options{Path: ov, Backing: []Layer{layerOf(t, base, disk.QCOW2)}})
	if err != nil {
		t.Fatalf("the overlay no longer opens read-write: %v", err)
	}
	im2.Close()
}
