package frontend

import (
	"os"
	"strings"
	"testing"

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
