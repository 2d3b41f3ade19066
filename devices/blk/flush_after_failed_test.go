package blk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestFlushAfterFailedFlushFails (from review, helper-87; fixed: the
// failure sticks, disk.ErrSyncFailed): the guest writes a sector, then
// sends FLUSH while the host's fdatasync fails (on Linux a writeback error
// is reported by one fdatasync only: the failed pages are marked clean and
// the next fdatasync succeeds without writing them). The first FLUSH gets
// IOERR; the guest retries and the second FLUSH gets OK although the write
// was never made durable. QEMU's file-posix fails every flush after a
// failed fdatasync (page_cache_inconsistent); the device must not report
// a later FLUSH as OK.
//
// The failing fdatasync is simulated by dup2-ing a pipe over the image's
// fd for the first FLUSH (fdatasync on a pipe fails with EINVAL) and
// putting the image back for the second (which then succeeds, as Linux's
// second fdatasync does).
func TestFlushAfterFailedFlushFails(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name string
		open func(t *testing.T, dir string) (disk.Disk, *os.File)
	}{
		{"raw", func(t *testing.T, dir string) (disk.Disk, *os.File) {
			p := filepath.Join(dir, "img.raw")
			if err := os.WriteFile(p, make([]byte, size), 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			d, err := raw.Open(f, raw.Options{})
			if err != nil {
				t.Fatal(err)
			}
			return d, f
		}},
		{"qcow2", func(t *testing.T, dir string) (disk.Disk, *os.File) {
			if _, err := exec.LookPath("qemu-img"); err != nil {
				t.Skip("no qemu-img")
			}
			p := filepath.Join(dir, "img.qcow2")
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", p, fmt.Sprint(size)).CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			im, err := qcow2.Open(f, qcow2.Options{Path: p})
			if err != nil {
				t.Fatal(err)
			}
			return im, f
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dsk, f := tc.open(t, t.TempDir())
			defer dsk.Close()
			d := newTestDevice(t, dsk, allFeatures)
			h := d.NewHandler()
			st := []byte{0xff}
			// Make the image's metadata clean and durable first.
			if h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st}); st[0] != StatusOK {
				t.Fatalf("initial flush: status %d", st[0])
			}
			// A guest write (in place: no metadata changes).
			if h.Handle([][]byte{header(TypeOut, 8), patternBytes(4096, 7)}, [][]byte{st}); st[0] != StatusOK {
				t.Fatalf("write: status %d", st[0])
			}

			restore := failSyncs(t, f)
			h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
			first := st[0]
			restore()
			if first != StatusIOErr {
				t.Fatalf("flush with failing fdatasync: status %d, want IOERR", first)
			}
			st[0] = 0xff
			h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
			if st[0] == StatusOK {
				t.Fatalf("FLUSH after a failed FLUSH (nothing written since) returned OK: the write before the failed fdatasync is reported durable (want IOERR, as QEMU after a failed fdatasync)")
			}
			if err := dsk.Flush(); !errors.Is(err, disk.ErrSyncFailed) {
				t.Errorf("Flush after a failed one: %v, want disk.ErrSyncFailed", err)
			}
			// A qcow2 image takes no more writes: metadata written now
			// could point at tables the kernel dropped. Raw takes them,
			// as QEMU's file-posix does; its flushes keep failing.
			st[0] = 0xff
			h.Handle([][]byte{header(TypeOut, 16), patternBytes(4096, 9)}, [][]byte{st})
			if want := map[string]byte{"raw": StatusOK, "qcow2": StatusIOErr}[tc.name]; st[0] != want {
				t.Errorf("write after the failed flush: status %d, want %d", st[0], want)
			}
		})
	}
}

// A failed sync outlives the plugin process: the device records it in its
// state (the front-end's inflight region, backend.DeviceState) before the
// FLUSH completes, and a restarted plugin's device that gets that state
// fails every FLUSH, where it acknowledged the next one: the kernel had
// reported the lost writeback to the dead process (from review,
// helper-101: end to end in cmd/krun-core, TestFailedFlushSurvivesRestart).
// A device whose state was zeroed (a device reset) records it again when
// its rings start.
func TestSyncFailureOutlivesPlugin(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	open := func() (disk.Disk, *os.File) {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		d, err := raw.Open(f, raw.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return d, f
	}
	state := backend.NewDeviceState()
	dsk, f := open()
	d := newTestDevice(t, dsk, allFeatures)
	d.UseState(state)
	h := d.NewHandler()
	st := []byte{0xff}
	if h.Handle([][]byte{header(TypeOut, 8), patternBytes(4096, 7)}, [][]byte{st}); st[0] != StatusOK {
		t.Fatalf("write: status %d", st[0])
	}
	restore := failSyncs(t, f)
	h.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
	restore()
	if st[0] != StatusIOErr {
		t.Fatalf("flush with failing fdatasync: status %d, want IOERR", st[0])
	}
	if state.Flags()&StateSyncFailed == 0 {
		t.Fatal("the failed sync is not in the device state when its FLUSH completes")
	}
	dsk.Close() // the plugin is killed

	// The restarted plugin: the same image, the state the front-end kept.
	dsk2, _ := open()
	defer dsk2.Close()
	d2 := newTestDevice(t, dsk2, allFeatures)
	d2.UseState(state)
	h2 := d2.NewHandler()
	st[0] = 0xff
	h2.Handle([][]byte{header(TypeFlush, 0)}, [][]byte{st})
	if st[0] != StatusIOErr {
		t.Fatalf("FLUSH on the restarted plugin: status %d, want IOERR (a sync failed in the one before)", st[0])
	}

	// A device reset zeroes the region; the disk remembers, and the
	// next ring start records it again.
	zeroed := backend.NewDeviceState()
	d2.UseState(zeroed)
	if _, err := d2.Queue(context.Background(), 0); err != nil {
		t.Fatal(err)
	}
	if zeroed.Flags()&StateSyncFailed == 0 {
		t.Error("a ring start after the state was zeroed did not record the failed sync again")
	}
}

// failSyncs makes the image's fdatasync fail, as a lost writeback makes
// it (the kernel reports it once): a pipe is dup2-ed over f's descriptor
// (fdatasync on a pipe fails with EINVAL) until restore puts the image
// back.
func failSyncs(t *testing.T, f *os.File) (restore func()) {
	t.Helper()
	fd := int(f.Fd())
	saved, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	var pfd [2]int
	if err := unix.Pipe(pfd[:]); err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup2(pfd[1], fd); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := unix.Dup2(saved, fd); err != nil {
			t.Fatal(err)
		}
		unix.Close(saved)
		unix.Close(pfd[0])
		unix.Close(pfd[1])
	}
}
