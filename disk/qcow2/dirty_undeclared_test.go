package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestDirtyImageRefusedBeforeRepair: a read-write open of an image with the
// dirty bit repaired its refcounts and cleared the bit (writing the image)
// before it checked the backing and data files the image names against the
// declared ones; an open refused for an undeclared or mismatched file must
// leave the image's bytes as they were.
func TestDirtyImageRefusedBeforeRepair(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	other := filepath.Join(dir, "other.raw")
	for _, p := range []string{base, other} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		co    CreateOptions
		chain func() []Layer
	}{
		{"undeclared backing", CreateOptions{BackingFile: base, BackingFormat: disk.Raw}, func() []Layer { return nil }},
		{"other backing", CreateOptions{BackingFile: base, BackingFormat: disk.Raw}, func() []Layer { return []Layer{layerOf(t, other, disk.Raw)} }},
		{"backing declared, none named", CreateOptions{}, func() []Layer { return []Layer{layerOf(t, base, disk.Raw)} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, "img.qcow2")
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			tc.co.Size, tc.co.LazyRefcounts = 1<<20, true
			if err := Create(f, tc.co); err != nil {
				t.Fatalf("Create: %v", err)
			}
			// Mark it dirty (incompatible feature bit 0 at offset 72).
			var b [8]byte
			if _, err := f.ReadAt(b[:], 72); err != nil {
				t.Fatal(err)
			}
			binary.BigEndian.PutUint64(b[:], binary.BigEndian.Uint64(b[:])|incompatDirty)
			if _, err := f.WriteAt(b[:], 72); err != nil {
				t.Fatal(err)
			}
			f.Close()
			before, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			im, err := Open(openFile(t, p, false), Options{Path: p, Backing: tc.chain()})
			if err == nil {
				im.Close()
				t.Fatal("Open accepted an image whose chain does not match the declared one")
			}
			if !errors.Is(err, ErrBacking) {
				t.Fatalf("Open: %v, want ErrBacking", err)
			}
			after, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(before, after) {
				t.Fatalf("the refused open changed the image (first difference at byte %d)", firstDiff(before, after))
			}
		})
	}
}
