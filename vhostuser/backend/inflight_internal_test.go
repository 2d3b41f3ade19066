package backend

import (
	"bytes"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// regionBytes maps n zero bytes the way a received region is mapped (page
// aligned, so every field is aligned).
func regionBytes(t testing.TB, n uint64) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// snapshot is the region as a back-end killed right after one of its
// stores leaves it, with what the recovery must find.
type snapshot struct {
	region []byte
	used   uint16   // the used index in guest memory at that moment
	want   []uint16 // heads taken and not completed as the driver sees it, in take order
}

// TestTrackerCrashAfterEveryStore runs random sequences of takes,
// completions (used elements added) and publications against a tracker,
// keeps the region as it is after every single store (a back-end can die
// between any two), and checks that recovering each copy yields exactly
// the heads taken and not yet published, in the order they were taken.
func TestTrackerCrashAfterEveryStore(t *testing.T) {
	const num = 16
	size := InflightQueueBytes(num)
	for seed := range uint64(60) {
		rng := rand.New(rand.NewPCG(seed, 7))
		region := regionBytes(t, size)
		start := uint16(65536 - 40 + rng.IntN(80)) // wraps around in some runs
		tr, heads, err := newTracker(region, num, num, start)
		if err != nil || len(heads) != 0 {
			t.Fatalf("fresh region: heads %v, err %v", heads, err)
		}
		var (
			guestUsed = start
			order     []uint16            // taken and not published, in take order
			marked    = map[uint16]bool{} // mark completed
			completed = map[uint16]bool{} // used element added (in the batch)
			marking   = -1                // head whose mark is under way
			markStore = 0
			snaps     []snapshot
		)
		expected := func() []uint16 {
			var w []uint16
			for _, h := range order {
				if marked[h] || (int(h) == marking && markStore >= 2) {
					w = append(w, h)
				}
			}
			return w
		}
		tr.onStore = func() {
			if marking >= 0 {
				markStore++
			}
			snaps = append(snaps, snapshot{region: slices.Clone(region), used: guestUsed, want: expected()})
		}
		for range 300 {
			switch op := rng.IntN(10); {
			case op < 4 && len(order) < num:
				var free []uint16
				for h := uint16(0); h < num; h++ {
					if !slices.Contains(order, h) {
						free = append(free, h)
					}
				}
				h := free[rng.IntN(len(free))]
				order = append(order, h)
				marking, markStore = int(h), 0
				tr.mark(h)
				marking = -1
				marked[h] = true
			case op < 8:
				var cand []uint16
				for _, h := range order {
					if !completed[h] {
						cand = append(cand, h)
					}
				}
				if len(cand) == 0 {
					continue
				}
				h := cand[rng.IntN(len(cand))]
				completed[h] = true
				tr.used(h)
			default:
				if len(tr.batch) == 0 {
					continue
				}
				// The used index store in guest memory comes first:
				// from then on the driver has the batch.
				guestUsed += uint16(len(tr.batch))
				for _, h := range tr.batch {
					order = slices.DeleteFunc(order, func(x uint16) bool { return x == h })
					delete(marked, h)
					delete(completed, h)
				}
				tr.published(guestUsed)
			}
		}
		for i, s := range snaps {
			r := regionBytes(t, size)
			copy(r, s.region)
			_, got, err := newTracker(r, num, num, s.used)
			if err != nil {
				t.Fatalf("seed %d, crash after store %d: %v", seed, i, err)
			}
			if !slices.Equal(got, s.want) {
				t.Fatalf("seed %d, crash after store %d: resubmits %v, want %v", seed, i, got, s.want)
			}
		}
	}
}

// TestTrackerRecoversTwice checks that a recovered region keeps the order
// across a second crash: the resubmitted heads keep their counters, new
// ones come after.
func TestTrackerRecoversTwice(t *testing.T) {
	const num = 8
	region := regionBytes(t, InflightQueueBytes(num))
	tr, _, err := newTracker(region, num, num, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []uint16{5, 2, 7} {
		tr.mark(h)
	}
	tr.used(2)
	tr.published(1)
	_, heads, err := newTracker(region, num, num, 1)
	if err != nil || !slices.Equal(heads, []uint16{5, 7}) {
		t.Fatalf("first recovery: %v, %v", heads, err)
	}
	tr2, _, err := newTracker(region, num, num, 1)
	if err != nil {
		t.Fatal(err)
	}
	tr2.mark(0)
	_, heads, err = newTracker(region, num, num, 1)
	if err != nil || !slices.Equal(heads, []uint16{5, 7, 0}) {
		t.Fatalf("second recovery: %v, %v", heads, err)
	}
}

// TestTrackerRefusesInconsistentRegions checks the bounds a hostile or
// stale region meets.
func TestTrackerRefusesInconsistentRegions(t *testing.T) {
	const num = 8
	fresh := func() []byte {
		r := regionBytes(t, InflightQueueBytes(num))
		if _, _, err := newTracker(r, num, num, 100); err != nil {
			t.Fatal(err)
		}
		return r
	}
	tests := []struct {
		name  string
		edit  func(r []byte)
		ring  uint16
		used  uint16
		ok    bool
		heads []uint16
	}{
		{"consistent", func([]byte) {}, num, 100, true, nil},
		{"smaller ring", func([]byte) {}, 4, 100, true, nil},
		{"bad version", func(r []byte) { r[inflightOffVersion] = 9 }, num, 100, false, nil},
		{"desc_num below the ring", func(r []byte) { r[inflightOffDescNum] = 4 }, num, 100, false, nil},
		{"desc_num beyond the region", func(r []byte) { r[inflightOffDescNum] = 200 }, num, 100, false, nil},
		{"batch larger than the ring", func([]byte) {}, num, 100 + num + 1, false, nil},
		{"batch head out of range", func(r []byte) { r[inflightOffBatchHead] = 9 }, num, 101, false, nil},
		{"inflight head beyond a smaller ring", func(r []byte) { r[inflightHeaderSize+6*inflightEntrySize] = 1 }, 4, 100, true, nil},
		{"inflight flag not 1", func(r []byte) { r[inflightHeaderSize+3*inflightEntrySize] = 2 }, num, 100, true, nil},
		{"looping batch list", func(r []byte) {
			r[inflightHeaderSize+1*inflightEntrySize] = 1 // head 1 in flight
			r[inflightHeaderSize+1*inflightEntrySize+inflightOffNext] = 1
			r[inflightOffBatchHead] = 1
		}, num, 103, true, nil},
		{"region too small", func([]byte) {}, 64, 100, false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := fresh()
			tt.edit(r)
			queueSize := uint16(num)
			if tt.ring > num {
				queueSize = tt.ring
			}
			_, heads, err := newTracker(r, queueSize, tt.ring, tt.used)
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok %v", err, tt.ok)
			}
			if !slices.Equal(heads, tt.heads) {
				t.Fatalf("heads %v, want %v", heads, tt.heads)
			}
		})
	}
}

// FuzzTrackerRecover gives recovery arbitrary region contents, ring sizes
// and used indexes: it must never panic, and what it resubmits must be
// distinct heads of the ring, at most the ring's size of them.
func FuzzTrackerRecover(f *testing.F) {
	f.Add([]byte{}, uint8(3), uint16(0))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 3, 0, 5, 0, 1}, uint8(3), uint16(7))
	const queueSize = 32
	f.Fuzz(func(t *testing.T, data []byte, order uint8, used uint16) {
		num := uint16(1) << (order % 6)
		r := regionBytes(t, InflightQueueBytes(queueSize))
		copy(r, data)
		_, heads, err := newTracker(r, queueSize, num, used)
		if err != nil {
			return
		}
		if len(heads) > int(num) {
			t.Fatalf("%d heads on a ring of %d", len(heads), num)
		}
		seen := map[uint16]bool{}
		for _, h := range heads {
			if h >= num || seen[h] {
				t.Fatalf("heads %v on a ring of %d", heads, num)
			}
			seen[h] = true
		}
	})
}

// The device state's flags are taken from a region only behind this
// framework's mark: a zeroed region, or bytes of another back-end's layout
// at that offset, start with no flags (a stray bit would fail every FLUSH
// of a virtio-blk device; found in review, helper-105).
func TestDeviceStateMark(t *testing.T) {
	garbage := bytes.Repeat([]byte{0xff}, 16)
	if f := newDeviceState(garbage).Flags(); f != 0 {
		t.Errorf("flags %#x from bytes without the mark, want none", f)
	}
	s := newDeviceState(garbage) // the mark is there now
	s.Set(5)
	if f := newDeviceState(garbage).Flags(); f != 5 {
		t.Errorf("flags %#x behind the mark, want 5", f)
	}
	if f := newDeviceState(make([]byte, 16)).Flags(); f != 0 {
		t.Errorf("flags %#x from a zeroed region", f)
	}
}
