package virtq

import (
	"errors"
	"testing"
)

// TestPeekReportsChangedChain: a chain the guest rewrites after Pop (a
// readable data descriptor turned writable) cannot be peeked whole, and
// the chain says so through Err, as for Read and Write; a device then
// refuses it instead of serving it cut short. (From review: peek walked
// a copy of the cursor and dropped the error.)
func TestPeekReportsChangedChain(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write bool // peek the writable side first
	}{
		{"readable", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, q := newPair(t, 8, false, false)
			d.setDesc(tDesc, 0, tDataStart, 16, DescFNext, 1)        // header
			d.setDesc(tDesc, 1, tDataStart+0x100, 512, DescFNext, 2) // data (readable)
			d.setDesc(tDesc, 2, tDataStart+0x400, 1, DescFWrite, 0)  // status
			d.offer(0)
			var c Chain
			if ok, err := q.Pop(&c); !ok || err != nil {
				t.Fatal(ok, err)
			}
			// The guest flips the data descriptor to device-writable.
			d.setDesc(tDesc, 1, tDataStart+0x100, 512, DescFNext|DescFWrite, 2)
			var got uint64
			if tc.write {
				got = segLen(c.PeekWritable(nil, c.WritableLen()))
			} else {
				got = segLen(c.PeekReadable(nil, c.ReadableLen()))
			}
			if !errors.Is(c.Err(), ErrMalformedChain) {
				t.Fatalf("peek returned %d bytes of a changed chain, Err() = %v, want ErrMalformedChain", got, c.Err())
			}
		})
	}
}
