package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// pieceImage creates an image of size bytes with clusters of cs bytes
// (over a raw backing file of 0xb5 bytes covering its first half when
// backing is set), writes pattern data over all of it but its last
// cluster, and opens it with pieces of `pieces` clusters. It returns the
// image, its path, its backing chain's path ("" if none) and its content.
func pieceImage(t *testing.T, cs, size int64, backing bool, pieces uint64) (*Image, string, string, []byte) {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	co := CreateOptions{Size: size, ClusterSize: cs}
	var chain []Layer
	var base string
	want := make([]byte, size)
	if backing {
		base = filepath.Join(dir, "base.raw")
		if err := os.WriteFile(base, bytes.Repeat([]byte{0xb5}, int(size/2)), 0o644); err != nil {
			t.Fatal(err)
		}
		co.BackingFile, co.BackingFormat = base, disk.Raw
		chain = append(chain, layerOf(t, base, disk.Raw))
		copy(want, bytes.Repeat([]byte{0xb5}, int(size/2)))
	}
	if err := Create(f, co); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im, err := Open(openFile(t, p, false), Options{Path: p, Backing: chain})
	if err != nil {
		t.Fatal(err)
	}
	im.pieceClusters = pieces
	buf := make([]byte, size-cs)
	for i := range buf {
		buf[i] = byte(i/int(cs)) | 1
	}
	// Leave a backed cluster unwritten too (it reads backing data).
	if backing {
		clear(buf[cs : 2*cs])
	}
	for off := int64(0); off < int64(len(buf)); off += 1 << 20 {
		end := min(off+1<<20, int64(len(buf)))
		if backing && off == 0 {
			if _, err := im.WriteAt(buf[:cs], 0); err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(buf[2*cs:end], 2*cs); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if _, err := im.WriteAt(buf[off:end], off); err != nil {
			t.Fatal(err)
		}
	}
	copy(want, buf[:cs])
	copy(want[2*cs:], buf[2*cs:])
	if !backing {
		copy(want[cs:], buf[cs:2*cs])
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	return im, p, base, want
}

// checkPiecedImage closes im, checks its file (our checker, and qemu-img
// where installed), reopens it and compares its content with want.
func checkPiecedImage(t *testing.T, im *Image, p, base string, want []byte) {
	t.Helper()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f := openFile(t, p, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil || !res.Clean() {
		t.Fatalf("Check: %v %+v", err, res)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		qemuClean(t, p)
	}
	var chain []Layer
	if base != "" {
		chain = append(chain, layerOf(t, base, disk.Raw))
	}
	again := openImage(t, p, true, chain...)
	defer again.Close()
	compareImage(t, again, want, 2)
}

// TestLongDiscardLetsOthersIn: a DISCARD or WRITE_ZEROES request over a
// long range held the image's lock until it ended, so that every other
// request of the guest's disk, reads of unrelated clusters included,
// waited for all of it (a guest discarding its 1 TiB disk stalled its own
// I/O for as long as that took; found in review). The range is now served
// in pieces, the lock released between them: here the request is stopped
// after its first piece (the hook), and a read and an allocating write of
// other clusters must complete while it waits, a read of the range finds
// each cluster either done (zeroes) or untouched (old data), and the
// request then completes with the whole range done.
func TestLongDiscardLetsOthersIn(t *testing.T) {
	const cs = 4096
	for _, tc := range []struct {
		name    string
		backing bool
		discard bool // partial clusters are left alone
		op      func(im *Image, off, n int64) error
	}{
		{"discard", false, true, func(im *Image, off, n int64) error { return im.Discard(off, n) }},
		{"discard-over-backing", true, true, func(im *Image, off, n int64) error { return im.Discard(off, n) }},
		{"zeroes-unmap", false, false, func(im *Image, off, n int64) error { return im.WriteZeroes(off, n, true) }},
		{"zeroes-keep-over-backing", true, false, func(im *Image, off, n int64) error { return im.WriteZeroes(off, n, false) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 4 << 20
			const pieces = 64
			im, p, base, want := pieceImage(t, cs, size, tc.backing, pieces)
			// The range: all but the first and the last clusters, with
			// a partial cluster at each end.
			off, n := int64(cs+512), int64(size-2*cs-1024)
			released := make(chan int64, 1)
			proceed := make(chan struct{})
			calls := 0
			im.pieceHook = func(next uint64) {
				calls++
				if calls == 1 {
					released <- int64(next)
					<-proceed
				}
			}
			done := make(chan error, 1)
			go func() { done <- tc.op(im, off, n) }()
			var next int64
			select {
			case next = <-released:
			case err := <-done:
				t.Fatalf("the request (err %v) never released the image's lock before it completed", err)
			}
			// Other requests get in while the request waits.
			got := make([]byte, cs)
			if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[:cs]) {
				t.Fatalf("read of an unrelated cluster between two pieces: %v", err)
			}
			data := bytes.Repeat([]byte{0x7e}, cs)
			if _, err := im.WriteAt(data, size-cs); err != nil {
				t.Fatalf("allocating write between two pieces: %v", err)
			}
			copy(want[size-cs:], data)
			// The range reads as done up to next, untouched after.
			if next <= off || next >= off+n || next%cs != 0 {
				t.Fatalf("first piece ends at %d, inside (%d, %d) on a cluster boundary expected", next, off, off+n)
			}
			mid := make([]byte, 4*cs)
			if _, err := im.ReadAt(mid, next-2*cs); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(mid[:2*cs], make([]byte, 2*cs)) || !bytes.Equal(mid[2*cs:], want[next:next+2*cs]) {
				t.Fatalf("the range around the end of the first piece (%d) is neither done nor untouched per cluster", next)
			}
			close(proceed)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if tc.discard {
				clear(want[2*cs : size-2*cs])
			} else {
				clear(want[off : off+n])
			}
			if wantCalls := int(divRoundUp(uint64(n)+cs, pieces*cs)) - 1; calls < wantCalls {
				t.Fatalf("%d lock releases, want %d at least", calls, wantCalls)
			}
			compareImage(t, im, want, 1)
			checkPiecedImage(t, im, p, base, want)
		})
	}
}

// TestPiecedDiscardFailsMidway: a piece after the first fails (its L2
// write returns an error). The request fails (the guest gets IOERR); the
// pieces before it stay done, the clusters after it untouched, the failed
// piece's clusters read either way; metaPending is set, so that the next
// write takes the exclusive path and writes the failed piece's tables
// before it is acknowledged; a retry of the request then completes it.
func TestPiecedDiscardFailsMidway(t *testing.T) {
	const cs, size, pieces = 4096, 4 << 20, 64
	im, p, base, want := pieceImage(t, cs, size, false, pieces)
	fw := &failWrite{ioFile: im.f} // metadata only: im.data keeps the file
	im.f = fw
	var first int64
	im.pieceHook = func(next uint64) {
		if first == 0 {
			first = int64(next)
			fw.armed = true
		}
	}
	off, n := int64(cs), int64(size-2*cs)
	err := im.Discard(off, n)
	if !errors.Is(err, errInjected) {
		t.Fatalf("Discard with its second piece failing: %v, want the injected error", err)
	}
	if fw.armed {
		t.Fatal("the injected failure hit no write")
	}
	if !im.metaPending.Load() {
		t.Fatal("metaPending is clear after a piece failed to write its metadata")
	}
	if first != off+pieces*cs {
		t.Fatalf("first piece ends at %d, want %d", first, off+pieces*cs)
	}
	got := make([]byte, size)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	second := first + pieces*cs
	for c := int64(0); c < size; c += cs {
		g, old := got[c:c+cs], want[c:c+cs]
		zero := bytes.Equal(g, make([]byte, cs))
		switch {
		case c >= off && c < first && !zero:
			t.Fatalf("cluster at %d, of the first piece, does not read zeroes", c)
		case (c < off || c >= second) && !bytes.Equal(g, old):
			t.Fatalf("cluster at %d, outside the pieces served, changed", c)
		case c >= first && c < second && !zero && !bytes.Equal(g, old):
			t.Fatalf("cluster at %d, of the failed piece, reads neither zeroes nor its data", c)
		}
	}
	// A write now (in place otherwise: its cluster is allocated) writes
	// the failed piece's tables before it is acknowledged; a plugin
	// killed then leaves both on the file.
	data := bytes.Repeat([]byte{0x3c}, cs)
	if _, err := im.WriteAt(data, size-cs); err != nil {
		t.Fatal(err)
	}
	if im.metaPending.Load() {
		t.Fatal("metaPending still set after a write's persist")
	}
	after := openKilledCopy(t, p)
	kgot := make([]byte, size)
	if _, err := after.ReadAt(kgot, 0); err != nil {
		t.Fatal(err)
	}
	after.Close()
	if !bytes.Equal(kgot[size-cs:], data) || !bytes.Equal(kgot[off:second], make([]byte, second-off)) {
		t.Fatal("after a kill, the acknowledged write or the pieces the failed request served are lost")
	}
	copy(want[size-cs:], data)
	// The retry completes the request.
	im.pieceHook = nil
	if err := im.Discard(off, n); err != nil {
		t.Fatalf("retried Discard: %v", err)
	}
	clear(want[off : off+n])
	compareImage(t, im, want, 3)
	checkPiecedImage(t, im, p, base, want)
}

// TestImageClosedBetweenPieces: Close may take the lock between two pieces
// of a request (the plugin shutting down); the request then fails with the
// image closed, and the image is consistent with the pieces served.
func TestImageClosedBetweenPieces(t *testing.T) {
	const cs, size, pieces = 4096, 4 << 20, 64
	im, p, base, want := pieceImage(t, cs, size, true, pieces)
	var first int64
	im.pieceHook = func(next uint64) {
		if first == 0 {
			first = int64(next)
			if err := im.Close(); err != nil {
				t.Errorf("Close between two pieces: %v", err)
			}
		}
	}
	off := int64(2 * cs)
	if err := im.WriteZeroes(off, size-off, false); !errors.Is(err, errClosed) {
		t.Fatalf("WriteZeroes with the image closed after its first piece: %v, want %v", err, errClosed)
	}
	clear(want[off:first])
	checkPiecedImage(t, im, p, base, want)
}

// TestHugeSparseDiscardInPieces discards the whole of a 1 TiB image with a
// few clusters allocated far apart, in pieces of a few clusters: every
// allocated cluster is released, the unallocated expanse is skipped a
// whole L2 table's range at a time (each counts towards a piece), and the
// image checks clean.
func TestHugeSparseDiscardInPieces(t *testing.T) {
	const cs = 64 << 10
	const size = 1 << 40
	p := filepath.Join(t.TempDir(), "huge.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: size, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im := openImage(t, p, false)
	im.pieceClusters = 16
	data := bytes.Repeat([]byte{0xa5}, 3*cs)
	at := []int64{0, 7 << 30, 300<<30 + 5*cs, size - 3*cs}
	for _, o := range at {
		if _, err := im.WriteAt(data, o); err != nil {
			t.Fatal(err)
		}
	}
	pieces := 0
	im.pieceHook = func(uint64) { pieces++ }
	if err := im.Discard(0, size); err != nil {
		t.Fatal(err)
	}
	// 2048 L1 entries, most of them empty.
	if pieces < 2048/16 {
		t.Fatalf("%d pieces, want %d at least", pieces, 2048/16)
	}
	got := make([]byte, len(data))
	for _, o := range at {
		if _, err := im.ReadAt(got, o); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
			t.Fatalf("read at %d after the discard: %v (zeroes expected)", o, err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		qemuClean(t, p)
		if out := sh(t, "qemu-img", "map", "--output=json", p); bytes.Contains([]byte(out), []byte(`"data": true`)) {
			t.Fatalf("clusters still allocated after the discard:\n%s", out)
		}
	}
}

// TestZeroDataBoundsAPiece: where zeroes must be written as data (a
// version 2 image over a backing file has no zero flag), a piece also
// ends after pieceZeroBytes of them, however few clusters that is.
func TestZeroDataBoundsAPiece(t *testing.T) {
	const cs, size = 4096, 16 << 20
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0xb5}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "v2.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: size, ClusterSize: cs, Version: 2, BackingFile: base, BackingFormat: disk.Raw}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im := openImage(t, p, false, layerOf(t, base, disk.Raw))
	var ends []uint64
	im.pieceHook = func(next uint64) { ends = append(ends, next) }
	const n = 3*pieceZeroBytes + cs
	if err := im.WriteZeroes(cs, n, true); err != nil {
		t.Fatal(err)
	}
	want := []uint64{cs + pieceZeroBytes, cs + 2*pieceZeroBytes, cs + 3*pieceZeroBytes}
	if fmt.Sprint(ends) != fmt.Sprint(want) {
		t.Fatalf("pieces end at %v, want %v", ends, want)
	}
	wantData := bytes.Repeat([]byte{0xb5}, size)
	clear(wantData[cs : cs+n])
	compareImage(t, im, wantData, 4)
	checkPiecedImage(t, im, p, base, wantData)
}

// TestPiecesUnderConcurrentIO runs long discards and zero writes in
// pieces of two clusters while other goroutines rewrite clusters and read
// the range: every cluster a read finds must hold its data or zeroes,
// never a mix or anything else, and the image must check clean at the
// end. Run it with -race.
func TestPiecesUnderConcurrentIO(t *testing.T) {
	const cs, size = 4096, 2 << 20
	for _, backing := range []bool{false, true} {
		t.Run(fmt.Sprintf("backing=%v", backing), func(t *testing.T) {
			im, p, base, _ := pieceImage(t, cs, size, backing, 2)
			pattern := func(c int64) []byte { return bytes.Repeat([]byte{byte(c) | 1}, cs) }
			for c := int64(0); c < size/cs; c++ {
				if _, err := im.WriteAt(pattern(c), c*cs); err != nil {
					t.Fatal(err)
				}
			}
			var wg sync.WaitGroup
			stop := make(chan struct{})
			errs := make(chan error, 8)
			wg.Add(1)
			go func() { // zeroer
				defer wg.Done()
				defer close(stop)
				for i := 0; i < 12; i++ {
					var err error
					switch i % 3 {
					case 0:
						err = im.Discard(cs, size-2*cs)
					case 1:
						err = im.WriteZeroes(cs, size-2*cs, false)
					default:
						err = im.WriteZeroes(0, size, true)
					}
					if err != nil {
						errs <- fmt.Errorf("zeroer op %d: %w", i, err)
						return
					}
				}
			}()
			wg.Add(1)
			go func() { // writer
				defer wg.Done()
				r := rand.New(rand.NewSource(1))
				for {
					select {
					case <-stop:
						return
					default:
					}
					c := r.Int63n(size / cs)
					if _, err := im.WriteAt(pattern(c), c*cs); err != nil {
						errs <- fmt.Errorf("write of cluster %d: %w", c, err)
						return
					}
				}
			}()
			for rd := 0; rd < 2; rd++ {
				wg.Add(1)
				go func(seed int64) { // reader
					defer wg.Done()
					r := rand.New(rand.NewSource(seed))
					buf := make([]byte, 8*cs)
					zero := make([]byte, cs)
					for {
						select {
						case <-stop:
							return
						default:
						}
						c0 := r.Int63n(size/cs - 8)
						if _, err := im.ReadAt(buf, c0*cs); err != nil {
							errs <- fmt.Errorf("read at cluster %d: %w", c0, err)
							return
						}
						for k := int64(0); k < 8; k++ {
							g := buf[k*cs : (k+1)*cs]
							if !bytes.Equal(g, zero) && !bytes.Equal(g, pattern(c0+k)) {
								errs <- fmt.Errorf("cluster %d reads neither its data nor zeroes (byte 0 %#x)", c0+k, g[0])
								return
							}
						}
					}
				}(int64(rd) + 2)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			checkPiecedImage(t, im, p, base, got)
		})
	}
}
