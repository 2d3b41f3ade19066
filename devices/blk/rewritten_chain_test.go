package blk

import (
	"encoding/binary"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/guestmem/guestmemtest"
	"github.com/krun-core/krun-core/virtq"
)

// TestRewrittenChainRefused: the guest makes an OUT request available
// (header, 512 data bytes, status) and flips the data descriptor to
// device-writable before the device walks it: the chain is malformed and
// completed with nothing written. (The peeks used to stop early without
// c.Err() noticing: the request was served as a 0-byte write and the guest
// got VIRTIO_BLK_S_OK for data that never reached the disk.)
func TestRewrittenChainRefused(t *testing.T) {
	const memSize = 1 << 20
	mem := guestmemtest.Memory(t, "blk-test", memSize)
	const desc, avail, used, data = 0x0, 0x1000, 0x2000, 0x10000
	q, err := virtq.NewQueue(mem, virtq.Config{Size: 8, DescTable: desc, AvailRing: avail, UsedRing: used})
	if err != nil {
		t.Fatal(err)
	}
	put := func(a guestmem.Addr, b []byte) {
		if err := mem.Write(a, b); err != nil {
			t.Fatal(err)
		}
	}
	setDesc := func(i uint16, addr uint64, n uint32, flags, next uint16) {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[0:], addr)
		binary.LittleEndian.PutUint32(b[8:], n)
		binary.LittleEndian.PutUint16(b[12:], flags)
		binary.LittleEndian.PutUint16(b[14:], next)
		put(desc+guestmem.Addr(16*uint64(i)), b[:])
	}
	put(data, header(TypeOut, 0))
	put(data+0x100, patternBytes(512, 7))
	put(data+0x400, []byte{0xee})
	setDesc(0, data, 16, virtq.DescFNext, 1)
	setDesc(1, data+0x100, 512, virtq.DescFNext, 2)
	setDesc(2, data+0x400, 1, virtq.DescFWrite, 0)
	put(avail+4, []byte{0, 0})
	put(avail+2, []byte{1, 0})

	var c virtq.Chain
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
	setDesc(1, data+0x100, 512, virtq.DescFNext|virtq.DescFWrite, 2) // the guest's rewrite

	md := newMemDisk(64 << 10)
	d := newTestDevice(t, md, allFeatures)
	w := d.newWorker()
	written, bad := w.handleChain(&c)
	var st [1]byte
	mem.Read(data+0x400, st[:])
	if bad == nil || md.data[0] != 0 {
		t.Fatalf("rewritten chain served as a valid request: used %d, status %d, disk sector 0 first byte %#x (want malformed, nothing written)",
			written, st[0], md.data[0])
	}
}
