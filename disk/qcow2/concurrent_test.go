package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"path/filepath"
	"sync"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestConcurrent runs writers, zero writers, discarders, readers and
// flushers at once. Each writer owns a region whose edges share clusters
// with its neighbours; at the end every region must hold what its owner
// wrote, and qemu-img must find the image clean. Run it with -race.
func TestConcurrent(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name, opts string
		cs         int64
		backing    bool
	}{
		{"cs4k", "cluster_size=4096", 4096, false},
		{"cs64k-backing", "cluster_size=65536", 65536, true},
		{"extl2-snapshot", "cluster_size=32768,extended_l2=on", 32768, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			const size = 16 << 20
			opts := tc.opts
			var chain []Layer
			base := filepath.Join(dir, "base.raw")
			if tc.backing {
				rawSource(t, base, size/2, 5)
				opts += ",backing_file=" + base + ",backing_fmt=raw"
			}
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, fmt.Sprint(size))
			qio(t, p, "write -P 0x42 0 4M")
			if tc.name == "extl2-snapshot" {
				sh(t, "qemu-img", "snapshot", "-c", "s", p)
			}
			model := qemuRaw(t, p)
			if tc.backing {
				chain = append(chain, layerOf(t, base, disk.Raw))
			}
			im, err := Open(openFile(t, p, false), Options{Path: p, Backing: chain, CacheBytes: 256 << 10})
			if err != nil {
				t.Fatal(err)
			}
			const workers = 8
			region := int64(size / workers)
			var wg sync.WaitGroup
			var mu sync.Mutex // guards model writes (regions are disjoint, but the slice is shared)
			errs := make(chan error, workers*2)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					r := rand.New(rand.NewSource(int64(w)))
					lo := int64(w)*region + 777 // regions straddle cluster boundaries
					hi := lo + region - 1500
					local := make([]byte, hi-lo)
					mu.Lock()
					copy(local, model[lo:hi])
					mu.Unlock()
					for i := 0; i < 300; i++ {
						off := lo + r.Int63n(hi-lo-1)
						n := min(1+r.Int63n(40<<10), hi-off)
						switch k := r.Intn(10); {
						case k < 5:
							buf := make([]byte, n)
							r.Read(buf)
							if _, err := im.WriteAt(buf, off); err != nil {
								errs <- err
								return
							}
							copy(local[off-lo:], buf)
						case k < 7:
							if err := im.WriteZeroes(off, n, r.Intn(2) == 0); err != nil {
								errs <- err
								return
							}
							clear(local[off-lo : off-lo+n])
						case k < 8:
							if err := im.Discard(off, n); err != nil {
								errs <- err
								return
							}
							// Whole clusters read back as zeroes.
							first := (off + tc.cs - 1) &^ (tc.cs - 1)
							last := (off + n) &^ (tc.cs - 1)
							if first < last {
								clear(local[first-lo : last-lo])
							}
						case k < 9 && i%10 == 0:
							if err := im.Flush(); err != nil {
								errs <- err
								return
							}
						default:
							buf := make([]byte, n)
							if _, err := im.ReadAt(buf, off); err != nil {
								errs <- err
								return
							}
							if !bytes.Equal(buf, local[off-lo:off-lo+n]) {
								errs <- fmt.Errorf("worker %d: read at %d differs", w, off)
								return
							}
						}
					}
					mu.Lock()
					copy(model[lo:hi], local)
					mu.Unlock()
				}(w)
			}
			// A reader of everything (content may be mid-change, so only
			// errors count).
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 1<<20)
				for i := 0; i < 40; i++ {
					if _, err := im.ReadAt(buf, int64(i%16)<<20); err != nil {
						errs <- err
						return
					}
				}
			}()
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			compareImage(t, im, model, 9)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			qemuClean(t, p)
			if got := qemuRaw(t, p); !bytes.Equal(got, model) {
				t.Fatalf("qemu-img reads different content at %d", firstDiff(got, model))
			}
		})
	}
}
