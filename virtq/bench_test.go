package virtq

import (
	"fmt"
	"testing"
)

// BenchmarkRing measures the device-side hot path: pop a chain, touch its
// header, write a status byte, push, check for notification. The driver side
// is reduced to publishing one available entry per request, so the figure is
// the ring layer's own cost. It reports descriptors processed per second.
func BenchmarkRing(b *testing.B) {
	for _, descs := range []int{1, 3} {
		for _, eventIdx := range []bool{false, true} {
			b.Run(fmt.Sprintf("descs=%d/event_idx=%v", descs, eventIdx), func(b *testing.B) {
				d, q := newPair(b, 256, eventIdx, false)
				switch descs {
				case 1:
					d.setDesc(tDesc, 0, tDataStart, 512, DescFWrite, 0)
				case 3:
					d.setDesc(tDesc, 0, tDataStart, 16, DescFNext, 1)
					d.setDesc(tDesc, 1, tDataStart+0x1000, 4096, DescFNext|DescFWrite, 2)
					d.setDesc(tDesc, 2, tDataStart+0x3000, 1, DescFWrite, 0)
				}
				var c Chain
				status := []byte{0}
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					store16(q.avail, 4+2*uint32(d.availIdx%d.size), 0)
					d.availIdx++
					store16(q.avail, 2, d.availIdx)
					ok, err := q.Pop(&c)
					if !ok || err != nil {
						b.Fatal(ok, err)
					}
					c.Write(status)
					if err := q.Push(c.Head, c.Written()); err != nil {
						b.Fatal(err)
					}
					q.NeedsNotify()
				}
				b.ReportMetric(float64(b.N*descs)/b.Elapsed().Seconds(), "descs/s")
			})
		}
	}
}
