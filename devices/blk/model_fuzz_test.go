package blk_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/disk/raw"
)

// modelDisk opens the disk kind k (0 raw, 1 qcow2 v3, 2 qcow2 v3 with
// extended L2, 3 qcow2 v2) of size bytes on a memfd.
func modelDisk(t *testing.T, k byte, size int64) disk.Disk {
	t.Helper()
	fd, err := unix.MemfdCreate("blk-model", 0)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	f := os.NewFile(uintptr(fd), "blk-model")
	var d disk.Disk
	switch k % 4 {
	case 0:
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		d, err = raw.Open(f, raw.Options{})
	default:
		o := qcow2.CreateOptions{Size: size, ClusterSize: 4096}
		switch k % 4 {
		case 2:
			o.ClusterSize, o.ExtendedL2 = 32768, true
		case 3:
			o.Version = 2
		}
		if err := qcow2.Create(f, o); err != nil {
			t.Fatal(err)
		}
		d, err = qcow2.Open(f, qcow2.Options{})
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// FuzzDiskModel drives the device over real raw and qcow2 disks with a
// stream of requests decoded from the input, cut into arbitrary descriptor
// layouts, and compares every read with a model of the disk. Invariants:
// a request inside the disk succeeds, one that reaches past it fails and
// changes nothing, a read returns what was written (write-zeroes reads as
// zeroes; a discarded sector reads as zeroes or as what it held), and the
// device never panics.
func FuzzDiskModel(f *testing.F) {
	f.Add(byte(0), []byte{1, 0, 4, 3, 0, 0, 4, 0, 2, 1, 2, 0, 0, 0, 4, 0})
	f.Add(byte(1), []byte{1, 3, 16, 9, 3, 2, 8, 1, 0, 0, 32, 5, 2, 4, 4, 0, 0, 0, 32, 7})
	f.Add(byte(2), []byte{1, 0, 64, 0, 4, 8, 40, 0, 0, 0, 64, 3, 2, 63, 2, 0, 0, 60, 8, 1})
	f.Add(byte(3), []byte{1, 1, 9, 2, 3, 0, 16, 1, 5, 0, 0, 0, 0, 0, 16, 3})
	f.Fuzz(func(t *testing.T, kind byte, ops []byte) {
		const sectors = 128
		const size = sectors * blk.SectorSize
		d := modelDisk(t, kind, size)
		dev, err := blk.New(blk.Config{Disk: d, Serial: "model"})
		if err != nil {
			t.Fatal(err)
		}
		dev.SetFeatures(1<<blk.FeatureFlush | 1<<blk.FeatureDiscard | 1<<blk.FeatureWriteZeroes)
		h := dev.NewHandler()
		model := make([]byte, size)
		discarded := make([]bool, sectors) // may read as zeroes or the model
		hdr := func(typ uint32, sector uint64) []byte {
			b := make([]byte, blk.HeaderSize)
			binary.LittleEndian.PutUint32(b, typ)
			binary.LittleEndian.PutUint64(b[8:], sector)
			return b
		}
		cut := func(b []byte, at byte) [][]byte {
			k := int(at) % (len(b) + 1)
			return [][]byte{b[:k:k], b[k:]}
		}
		for i := 0; len(ops) >= 4 && i < 64; i++ {
			op, sec, n, c := ops[0], uint64(ops[1]), uint64(ops[2]), ops[3]
			ops = ops[4:]
			inside := sec+n <= sectors
			st := []byte{0xff}
			switch op % 6 {
			case 0: // read
				buf := bytes.Repeat([]byte{0xee}, int(n*blk.SectorSize))
				wr := append(cut(buf, c), st)
				h.Handle([][]byte{hdr(blk.TypeIn, sec)}, wr)
				if !inside {
					if st[0] != blk.StatusIOErr {
						t.Fatalf("op %d: read [%d,+%d) past the end: status %d", i, sec, n, st[0])
					}
					continue
				}
				if st[0] != blk.StatusOK {
					t.Fatalf("op %d: read [%d,+%d): status %d", i, sec, n, st[0])
				}
				for s := uint64(0); s < n; s++ {
					got := buf[s*blk.SectorSize : (s+1)*blk.SectorSize]
					want := model[(sec+s)*blk.SectorSize : (sec+s+1)*blk.SectorSize]
					if bytes.Equal(got, want) {
						continue
					}
					if discarded[sec+s] && bytes.Equal(got, make([]byte, blk.SectorSize)) {
						continue
					}
					t.Fatalf("op %d: sector %d reads %x..., want %x...", i, sec+s, got[:8], want[:8])
				}
			case 1: // write
				data := make([]byte, n*blk.SectorSize)
				for j := range data {
					data[j] = byte(i*7+j/blk.SectorSize) | 1
				}
				rd := append([][]byte{hdr(blk.TypeOut, sec)}, cut(data, c)...)
				h.Handle(rd, [][]byte{st})
				if !inside {
					if st[0] != blk.StatusIOErr {
						t.Fatalf("op %d: write past the end: status %d", i, st[0])
					}
					continue
				}
				if st[0] != blk.StatusOK {
					t.Fatalf("op %d: write [%d,+%d): status %d", i, sec, n, st[0])
				}
				copy(model[sec*blk.SectorSize:], data)
				for s := sec; s < sec+n; s++ {
					discarded[s] = false
				}
			case 2, 3: // discard, write zeroes (c&1: unmap)
				typ, flags := uint32(blk.TypeDiscard), uint32(0)
				if op%6 == 3 {
					typ, flags = blk.TypeWriteZeroes, uint32(c&1)
				}
				seg := make([]byte, blk.SegmentSize)
				binary.LittleEndian.PutUint64(seg, sec)
				binary.LittleEndian.PutUint32(seg[8:], uint32(n))
				binary.LittleEndian.PutUint32(seg[12:], flags)
				rd := append([][]byte{hdr(typ, 0)}, cut(seg, c>>1)...)
				h.Handle(rd, [][]byte{st})
				if !inside {
					if st[0] != blk.StatusIOErr {
						t.Fatalf("op %d: discard/zero past the end: status %d", i, st[0])
					}
					continue
				}
				if st[0] != blk.StatusOK {
					t.Fatalf("op %d: type %d [%d,+%d): status %d", i, typ, sec, n, st[0])
				}
				for s := sec; s < sec+n; s++ {
					if typ == blk.TypeDiscard {
						discarded[s] = true
						continue
					}
					clear(model[s*blk.SectorSize : (s+1)*blk.SectorSize])
					discarded[s] = false
				}
			case 4:
				h.Handle([][]byte{hdr(blk.TypeFlush, 0)}, [][]byte{st})
				if st[0] != blk.StatusOK {
					t.Fatalf("op %d: flush: status %d", i, st[0])
				}
			case 5:
				id := make([]byte, blk.IDBytes+1)
				h.Handle([][]byte{hdr(blk.TypeGetID, sec)}, cut(id, c))
				if id[blk.IDBytes] != blk.StatusOK || string(id[:5]) != "model" {
					t.Fatalf("op %d: get id %q", i, id)
				}
			}
		}
	})
}
