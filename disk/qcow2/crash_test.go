package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// recorder passes I/O through to the real file and logs every write and
// sync, so that a test can rebuild what the disk may hold after a crash.
type recorder struct {
	ioFile
	mu  sync.Mutex
	log []logEntry
}

type logEntry struct {
	off     int64
	data    []byte // nil marks a completed sync
	durable bool   // a write that was durable when it returned (WriteDurable)
}

func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.log = append(r.log, logEntry{off: off, data: append([]byte(nil), p...)})
	r.mu.Unlock()
	return r.ioFile.WriteAt(p, off)
}

func (r *recorder) WriteDurable(p []byte, off int64) error {
	r.mu.Lock()
	r.log = append(r.log, logEntry{off: off, data: append([]byte(nil), p...), durable: true})
	r.mu.Unlock()
	return r.ioFile.WriteDurable(p, off)
}

func (r *recorder) Sync() error {
	err := r.ioFile.Sync()
	r.mu.Lock()
	r.log = append(r.log, logEntry{})
	r.mu.Unlock()
	return err
}

func (r *recorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.log)
}

// crashState applies to base every write up to the last sync before end
// and every durable write before end, plus those other writes after that
// sync (and before end) that keep says survived.
func crashState(base []byte, log []logEntry, end int, keep func(i int) bool) []byte {
	img := append([]byte(nil), base...)
	lastSync := -1
	for i := 0; i < end; i++ {
		if log[i].data == nil {
			lastSync = i
		}
	}
	for i := 0; i < end; i++ {
		e := log[i]
		if e.data == nil || (i > lastSync && !e.durable && !keep(i)) {
			continue
		}
		if need := int(e.off) + len(e.data); need > len(img) {
			img = append(img, make([]byte, need-len(img))...)
		}
		copy(img[e.off:], e.data)
	}
	return img
}

// TestCrashLeaksAtWorst records every write and sync of a random workload
// and rebuilds the image as a crash could leave it: everything before some
// sync, plus any subset of the writes issued after it. No such image may
// have a corruption (leaked clusters are fine), and the state right after a
// Flush must hold exactly the data written before it.
func TestCrashLeaksAtWorst(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name, opts string
		snapshot   bool
		pieces     uint64 // clusters in a piece of a discard or zero write; 0: the default
	}{
		{"cs4k", "cluster_size=4096", false, 0},
		{"cs512-rc64", "cluster_size=512,refcount_bits=64", false, 0},
		{"snapshot-extl2", "cluster_size=16384,extended_l2=on", true, 0},
		{"cs512-pieces", "cluster_size=512", false, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if testing.Short() && tc.name != "snapshot-extl2" {
				t.Skip("-short runs one crash workload")
			}
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			const size = 4 << 20
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, fmt.Sprint(size))
			qio(t, p, "write -P 0x42 0 1M")
			if tc.snapshot {
				sh(t, "qemu-img", "snapshot", "-c", "s", p)
			}
			im, err := Open(openFile(t, p, false), Options{Path: p, CacheBytes: 1})
			if err != nil {
				t.Fatal(err)
			}
			if tc.pieces != 0 {
				im.pieceClusters = tc.pieces
			}
			base, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			model := qemuRaw(t, p)
			type flushPoint struct {
				end   int
				model []byte
			}
			var flushes []flushPoint
			r := rand.New(rand.NewSource(int64(len(tc.name))))
			for op := 0; op < 150; op++ {
				off := r.Int63n(size)
				n := min(1+r.Int63n(48<<10), size-off)
				switch k := r.Intn(10); {
				case k < 6:
					buf := make([]byte, n)
					r.Read(buf)
					if _, err := im.WriteAt(buf, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], buf)
				case k < 7:
					if err := im.WriteZeroes(off, n, r.Intn(2) == 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k < 8:
					if err := im.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					if err := im.Flush(); err != nil {
						t.Fatal(err)
					}
					// Discard's effect on partial clusters is the
					// image's choice: take the model from it.
					model = readAll(t, im)
					flushes = append(flushes, flushPoint{rec.mark(), append([]byte(nil), model...)})
				default:
					if err := im.Flush(); err != nil {
						t.Fatal(err)
					}
					flushes = append(flushes, flushPoint{rec.mark(), append([]byte(nil), model...)})
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			log := rec.log
			// Crash points: just before each sync or durable write
			// completes (so the writes since the previous sync may or
			// may not have landed), and the end.
			var syncs []int
			for i, e := range log {
				if e.data == nil || e.durable {
					syncs = append(syncs, i)
				}
			}
			syncs = append(syncs, len(log))
			t.Logf("%d writes and syncs, %d syncs, %d flushes", len(log), len(syncs), len(flushes))
			states := 0
			cp := filepath.Join(dir, "crash.qcow2")
			check := func(img []byte, what string, viaQemu bool) {
				states++
				checkCrashImage(t, cp, img, what, viaQemu)
			}
			for si, end := range syncs {
				// A few subsets of the writes after the last sync.
				for trial := 0; trial < 3; trial++ {
					keep := func(i int) bool { return r.Intn(2) == 0 }
					if trial == 0 {
						keep = func(int) bool { return false }
					}
					img := crashState(base, log, end, keep)
					check(img, fmt.Sprintf("crash before log entry %d (trial %d)", end, trial), si%15 == 0 && trial == 1)
				}
			}
			// Right after each Flush the data written before it is there.
			for i, fp := range flushes {
				img := crashState(base, log, fp.end, func(int) bool { return false })
				if err := os.WriteFile(cp, img, 0o644); err != nil {
					t.Fatal(err)
				}
				im := openImage(t, cp, true)
				got := readAll(t, im)
				im.Close()
				if !bytes.Equal(got, fp.model) {
					t.Fatalf("flush %d: content differs at %d", i, firstDiff(got, fp.model))
				}
			}
			t.Logf("checked %d crash states", states)
		})
	}
}

func readAll(t *testing.T, im *Image) []byte {
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// killState is the image a process killed right after log entry end-1
// leaves: every write before end, then, of log entry end, the bytes up to
// the first pages page boundaries of the file (a write cut short by
// SIGKILL stops at a page boundary). Syncs play no part: the page cache
// survives the process.
func killState(base []byte, log []logEntry, end, pages int) []byte {
	img := append([]byte(nil), base...)
	apply := func(off int64, data []byte) {
		if need := int(off) + len(data); need > len(img) {
			img = append(img, make([]byte, need-len(img))...)
		}
		copy(img[off:], data)
	}
	for i := 0; i < end; i++ {
		if e := log[i]; e.data != nil {
			apply(e.off, e.data)
		}
	}
	if end < len(log) && pages > 0 && log[end].data != nil {
		e := log[end]
		cut := (e.off/4096+int64(pages))*4096 - e.off
		if cut < int64(len(e.data)) {
			apply(e.off, e.data[:cut])
		}
	}
	return img
}

// TestKillKeepsAcknowledgedWrites kills the image's process (in the model:
// keeps a prefix of its writes, the last one maybe cut on a page boundary)
// at every point of a random workload that never flushes, the way a
// restarted plugin finds the image: no such image has a corruption (leaks
// are fine), and every write, write-zeroes and discard that completed
// before the kill reads back, whatever was under way.
func TestKillKeepsAcknowledgedWrites(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name, opts string
		pieces     uint64 // clusters in a piece of a discard or zero write; 0: the default
	}{
		{"cs64k", "cluster_size=65536", 0},
		{"cs4k", "cluster_size=4096", 0},
		{"extl2", "cluster_size=32768,extended_l2=on", 0},
		{"cs4k-pieces", "cluster_size=4096", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if testing.Short() && tc.name != "cs4k" {
				t.Skip("-short runs one workload")
			}
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			const size = 4 << 20
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, fmt.Sprint(size))
			qio(t, p, "write -P 0x42 0 512k")
			base, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			im, err := Open(openFile(t, p, false), Options{Path: p, CacheBytes: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			if tc.pieces != 0 {
				im.pieceClusters = tc.pieces
			}
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			model := qemuRaw(t, p)
			type done struct {
				end    int    // log entries once the operation completed
				model  []byte // the disk as the guest knows it then
				off, n int64  // the operation that follows
			}
			points := []done{{end: 0, model: append([]byte(nil), model...)}}
			r := rand.New(rand.NewSource(int64(len(tc.name)) + 7))
			for op := 0; op < 60; op++ {
				off := r.Int63n(size)
				n := min(1+r.Int63n(96<<10), size-off)
				points[len(points)-1].off, points[len(points)-1].n = off, n
				switch k := r.Intn(10); {
				case k < 7:
					buf := make([]byte, n)
					r.Read(buf)
					if _, err := im.WriteAt(buf, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], buf)
				case k < 9:
					if err := im.WriteZeroes(off, n, r.Intn(2) == 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				default:
					if err := im.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					model = readAll(t, im)
				}
				points = append(points, done{end: rec.mark(), model: append([]byte(nil), model...)})
			}
			log := rec.log
			cp := filepath.Join(dir, "killed.qcow2")
			states := 0
			check := func(img []byte, what string, want []byte, off, n int64, viaQemu bool) {
				states++
				checkCrashImage(t, cp, img, what, viaQemu)
				im := openImage(t, cp, true)
				got := readAll(t, im)
				im.Close()
				// The operation under way may have landed in part; the
				// rest of the disk is what the completed ones made it.
				copy(got[off:off+n], want[off:off+n])
				if i := firstDiff(got, want); i < len(want) || len(got) != len(want) {
					t.Fatalf("%s: acknowledged data differs at %d", what, i)
				}
			}
			for i, pt := range points {
				next := len(log)
				if i+1 < len(points) {
					next = points[i+1].end
				}
				// At the point the operation completed, and at a few
				// points (some inside a write) before the next one did.
				ends := []int{pt.end}
				for k := 0; k < 3 && next > pt.end; k++ {
					ends = append(ends, pt.end+r.Intn(next-pt.end))
				}
				for j, end := range ends {
					pages := 0
					if j > 0 {
						pages = r.Intn(4)
					}
					img := killState(base, log, end, pages)
					check(img, fmt.Sprintf("killed at log entry %d (+%d pages), after operation %d", end, pages, i), pt.model,
						pt.off, pt.n, i%20 == 0 && j == 1)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if q := qemuCheck(t, p); q.Corruptions != 0 || q.CheckErrors != 0 || q.Leaks != 0 {
				t.Fatalf("after Close: qemu-img check: %s", q.Output)
			}
			t.Logf("%d log entries, %d states checked", len(log), states)
		})
	}
}

// TestNewL2TablesDurableBeforeL1: a new L2 table may land on a cluster
// that held other data (here, guest data discarded earlier), so its
// content must be on stable storage before the L1 entry that points to
// it. The crash this checks keeps the L1 writes and loses every other
// write not made durable: the image must still be free of corruption.
// Cases: one new table (written durably); more new tables in one request
// than the cache holds (512-byte clusters, a 1-byte cache), so that
// trimCaches writes the oldest out early and the L1 entries wait for a
// sync.
func TestNewL2TablesDurableBeforeL1(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name, opts, size string
		freed            int64 // bytes written and discarded first, from 0
		cacheBytes       int64 // 0: the default
		off, n           int64 // the write that makes the new tables
	}{
		// 4 KiB clusters: an L2 table covers 2 MiB; 4 MiB is under an
		// L1 entry of its own.
		{"one table", "cluster_size=4096", "8M", 1 << 20, 0, 4 << 20, 4096},
		{"tables evicted early", "cluster_size=512", "4M", 256 << 10, 1, 2 << 20, 256 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, tc.size)
			im := openImage(t, p, false)
			if _, err := im.WriteAt(bytes.Repeat([]byte{0xC3}, int(tc.freed)), 0); err != nil {
				t.Fatal(err)
			}
			if err := im.Discard(0, tc.freed); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil { // frees the discarded clusters
				t.Fatal(err)
			}
			base, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			im, err = Open(openFile(t, p, false), Options{Path: p, CacheBytes: tc.cacheBytes})
			if err != nil {
				t.Fatal(err)
			}
			l1 := [2]int64{int64(im.h.l1Off), int64(im.h.l1Off) + int64(im.h.l1Size)*8}
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			if _, err := im.WriteAt(bytes.Repeat([]byte{0x5A}, int(tc.n)), tc.off); err != nil {
				t.Fatal(err)
			}
			log := rec.log
			im.f, im.data = rec.ioFile, rec.ioFile
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			inL1 := func(i int) bool { return log[i].data != nil && log[i].off >= l1[0] && log[i].off < l1[1] }
			if !slices.ContainsFunc(log, func(e logEntry) bool { return e.data != nil && e.off >= l1[0] && e.off < l1[1] }) {
				t.Fatal("the write allocated no L2 table (no L1 write); the test's set-up is wrong")
			}
			img := crashState(base, log, len(log), inL1)
			checkCrashImage(t, filepath.Join(t.TempDir(), "crash.qcow2"), img, "the L1 entries landed, nothing else that was not durable", true)
		})
	}
}

// checkCrashImage writes img to path and fails the test if Check (and,
// with viaQemu, qemu-img check) finds a corruption in it; leaks are fine.
func checkCrashImage(t *testing.T, path string, img []byte, what string, viaQemu bool) {
	t.Helper()
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	f := openFile(t, path, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("%s: Check: %v corruptions %d errors %d\n%s", what, err, res.Corruptions, res.CheckErrors, joinLines(res.Messages))
	}
	if viaQemu {
		if q := qemuCheck(t, path); q.Corruptions != 0 || q.CheckErrors != 0 {
			t.Fatalf("%s: qemu-img check: %s", what, q.Output)
		}
	}
}
