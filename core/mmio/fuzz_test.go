package mmio

import (
	"encoding/binary"
	"testing"
)

// FuzzRegisters drives the transport with arbitrary guest register
// accesses: each 8-byte record is (write?, offset (2 bytes), width, value (4 bytes)). Whatever
// the guest does, the device must not panic, must only hand the back-end
// queues that passed the checks, and must leave no wiring behind after a
// reset.
func FuzzRegisters(f *testing.F) {
	rec := func(write bool, off uint16, width uint8, v uint32) []byte {
		b := []byte{0, 0, 0, width}
		if write {
			b[0] = 1
		}
		binary.LittleEndian.PutUint16(b[1:], off)
		return binary.LittleEndian.AppendUint32(b, v)
	}
	var seed []byte
	for _, r := range [][]byte{
		rec(true, RegStatus, 4, StatusAcknowledge|StatusDriver),
		rec(true, RegDriverFeatSel, 4, 1), rec(true, RegDriverFeatures, 4, 1),
		rec(true, RegStatus, 4, StatusAcknowledge|StatusDriver|StatusFeaturesOK),
		rec(true, RegQueueSel, 4, 0), rec(true, RegQueueNum, 4, 64),
		rec(true, RegQueueDescLow, 4, 0x1000), rec(true, RegQueueDriverLow, 4, 0x2000),
		rec(true, RegQueueDeviceLow, 4, 0x3000), rec(true, RegQueueReady, 4, 1),
		rec(true, RegStatus, 4, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK),
		rec(false, RegInterruptStatus, 4, 0), rec(true, RegQueueNotify, 4, 0),
		rec(false, RegConfig+2, 2, 0), rec(true, RegStatus, 4, 0),
	} {
		seed = append(seed, r...)
	}
	f.Add(seed)
	f.Add([]byte{1, 0x70, 0, 4, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, ops []byte) {
		r := newRig(t, nil)
		for len(ops) >= 8 {
			write := ops[0]&1 == 1
			off := uint64(binary.LittleEndian.Uint16(ops[1:])) % (Size + 16)
			width := []int{1, 2, 4, 8}[ops[3]&3]
			data := append([]byte(nil), ops[4:8]...)
			data = append(data, 0, 0, 0, 0)[:width]
			ops = ops[8:]
			if write {
				r.d.Write(off, data)
			} else {
				r.d.Read(off, data)
			}
		}
		for idx, q := range r.b.queues {
			if q.Size == 0 || q.Size&(q.Size-1) != 0 || q.Size > 256 || idx >= 2 {
				t.Fatalf("back-end got queue %d of size %d", idx, q.Size)
			}
			if q.Desc < testUser || q.Used < testUser || q.Avail < testUser {
				t.Fatalf("back-end got untranslated ring addresses %+v", q)
			}
		}
		r.wr(RegStatus, 0)
		if len(r.w.ioevents) != 0 || len(r.w.irqfds) != 0 {
			t.Fatalf("wiring left after reset: %v %v", r.w.ioevents, r.w.irqfds)
		}
	})
}
