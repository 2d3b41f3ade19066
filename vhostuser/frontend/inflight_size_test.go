package frontend

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestInflightOversizedRegionRefused: a hostile plugin answers
// GET_INFLIGHT_FD for 1 queue of 128 descriptors (a few KiB of
// bookkeeping) with a sparse 1 TiB memfd. The core refuses it: it zeroes
// the whole region at every device reset (Linux resets every virtio device
// when it probes it), and would allocate and write 1 TiB. (From review.)
func TestInflightOversizedRegionRefused(t *testing.T) {
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	const huge = 1 << 40
	go func() {
		m, err := b.Recv()
		if err != nil {
			return
		}
		req, _ := vhostuser.DecodeInflight(m.Payload)
		fd, err := unix.MemfdCreate("evil-inflight", unix.MFD_CLOEXEC)
		if err != nil {
			return
		}
		f := os.NewFile(uintptr(fd), "evil")
		defer f.Close()
		if err := f.Truncate(huge); err != nil {
			return
		}
		out := vhostuser.Inflight{MmapSize: huge, NumQueues: req.NumQueues, QueueSize: req.QueueSize}
		b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, out.Encode(), []*os.File{f})
	}()
	in, err := New(a).GetInflightFD(1, 128)
	if err == nil {
		defer in.Close()
		t.Fatalf("inflight region of %d bytes for 1 queue of 128 accepted", in.MmapSize)
	}
	if !strings.Contains(err.Error(), "at most") {
		t.Errorf("refusal %q does not say the limit", err)
	}
}

// TestInflightBoundFitsBackends: the bound leaves room for the regions
// back-ends make: our own (vhostuser/backend, the split-ring layout of
// QEMU's libvhost-user) for every queue count and size.
func TestInflightBoundFitsBackends(t *testing.T) {
	for _, nq := range []uint16{1, 2, 8, vhostuser.MaxQueues} {
		for _, qs := range []uint16{1, 64, 128, 256, 1024, 32768} {
			need := uint64(nq) * backend.InflightQueueBytes(qs)
			if most := maxInflightBytes(nq, qs); need > most {
				t.Errorf("%d queues of %d: a back-end's region is %d bytes, the bound %d", nq, qs, need, most)
			}
		}
	}
}

// TestInflightRegionIsTheFrontEnds: a compromised plugin answers
// GET_INFLIGHT_FD with a file it holds that is not its region: here a file
// on disk standing in for the guest's disk image (a blk plugin holds it
// read-write; it could as well hand back the guest RAM memfd). The core
// keeps the region for the life of the device, zeroes it at every device
// reset and gives it to every later plugin, so it must be a memfd of the
// core's own, sealed, and the plugin's file must never be written. (From
// review.)
func TestInflightRegionIsTheFrontEnds(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	data := bytes.Repeat([]byte("GUESTDATA"), 8192/9+1)[:8192]
	if err := os.WriteFile(disk, data, 0o600); err != nil {
		t.Fatal(err)
	}
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	go func() {
		m, err := b.Recv()
		if err != nil {
			return
		}
		req, _ := vhostuser.DecodeInflight(m.Payload)
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			return
		}
		defer f.Close()
		// One queue of 64 needs 1088 bytes: inside the bound.
		out := vhostuser.Inflight{MmapSize: 1088, MmapOffset: 4096, NumQueues: req.NumQueues, QueueSize: req.QueueSize}
		b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, out.Encode(), []*os.File{f})
	}()
	c := New(a)
	c.SetTimeout(5 * time.Second)
	in, err := c.GetInflightFD(1, 64)
	if err != nil {
		t.Fatalf("GetInflightFD: %v", err)
	}
	defer in.Close()
	if in.MmapSize != 1088 || in.MmapOffset != 0 {
		t.Errorf("region %#x+%d, want 0+1088 of the front-end's own file", in.MmapOffset, in.MmapSize)
	}
	if err := in.Reset(); err != nil {
		t.Fatalf("Reset: %v", err)
	}
	if got, _ := os.ReadFile(disk); !bytes.Equal(got, data) {
		t.Fatal("the device reset wrote into the file the plugin handed back (the guest's disk, in a real attack)")
	}
	var st, dst unix.Stat_t
	if err := unix.Fstat(int(in.File.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(disk, &dst); err != nil {
		t.Fatal(err)
	}
	if st.Dev == dst.Dev && st.Ino == dst.Ino {
		t.Fatal("the region is the plugin's file")
	}
	if st.Size != 1088 {
		t.Errorf("region file of %d bytes, want 1088", st.Size)
	}
	seals, err := unix.FcntlInt(in.File.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatalf("F_GET_SEALS: %v (not a memfd?)", err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; seals&want != want {
		t.Errorf("seals %#x, want %#x: a plugin could truncate the region under the core", seals, want)
	}
}
