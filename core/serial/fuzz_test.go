package serial

import (
	"bytes"
	"testing"
)

// FuzzUART drives the UART with what a hostile guest (register reads and
// writes at any offset, divisor latch, loopback, FIFO clears, interrupt
// enables) and the host (input) can do, against a model of its receive
// FIFO (from review, helper-97). Each 3-byte record is (op, offset,
// value). It checks: no panic; the receive buffer never exceeds
// RXCapacity; the guest reads exactly the bytes the host and its own
// loopback queued, in order, and nothing is read that was not queued;
// Receive reports what it took; the interrupt line the UART last reported
// is the level its pending interrupts call for; transmitted bytes reach
// the output only outside loopback and the divisor latch.
func FuzzUART(f *testing.F) {
	f.Add([]byte{1, regIER, ierRDI | ierTHRI, 2, 0, 'a', 0, regData, 0, 0, regIIR, 0})
	f.Add([]byte{1, regMCR, mcrLoop, 1, regData, 'x', 0, regLSR, 0, 0, regData, 0, 1, regIIR, fcrClearRX | fcrEnable})
	f.Add([]byte{1, regLCR, lcrDLAB, 1, regData, 1, 1, regIER, 0, 0, regData, 0, 1, regLCR, 3, 1, regData, 'y'})
	f.Fuzz(func(t *testing.T, ops []byte) {
		var out bytes.Buffer
		var level, reported bool
		u := New(&out, func(l bool) {
			if l == level && reported {
				t.Fatalf("irq callback with an unchanged level %v", l)
			}
			level, reported = l, true
		})
		var model []byte // the receive FIFO as the guest should see it
		var sent []byte  // what should have reached the output
		var in byte
		for len(ops) >= 3 {
			op, off, v := ops[0]%4, ops[1]%10, ops[2]
			ops = ops[3:]
			switch op {
			case 0: // guest read
				dlab := u.lcr&lcrDLAB != 0
				got := u.Read(off)
				if off == regData && !dlab {
					want := byte(0)
					if len(model) > 0 {
						want, model = model[0], model[1:]
					}
					if got != want {
						t.Fatalf("RBR read %#x, want %#x", got, want)
					}
				}
			case 1: // guest write
				dlab := u.lcr&lcrDLAB != 0
				loop := u.mcr&mcrLoop != 0
				u.Write(off, v)
				switch {
				case off == regData && !dlab && loop:
					if len(model) < RXCapacity {
						model = append(model, v)
					}
				case off == regData && !dlab:
					sent = append(sent, v)
				case off == regIIR && v&fcrClearRX != 0:
					model = model[:0]
				}
			case 2: // host input
				n := int(v % 80)
				p := make([]byte, n)
				for i := range p {
					in++
					p[i] = in
				}
				k := u.Receive(p)
				want := min(n, RXCapacity-len(model))
				if k != want {
					t.Fatalf("Receive of %d with %d queued took %d, want %d", n, len(model), k, want)
				}
				model = append(model, p[:k]...)
			case 3: // host reads the registers' effect: LSR without side effect on data
				lsr := u.Read(regLSR)
				if (lsr&lsrDR != 0) != (len(model) > 0) {
					t.Fatalf("LSR %#x with %d bytes queued", lsr, len(model))
				}
			}
			u.mu.Lock()
			n, want := len(u.rx), u.iir() != iirNoInt
			u.mu.Unlock()
			if n > RXCapacity {
				t.Fatalf("receive buffer holds %d bytes (capacity %d)", n, RXCapacity)
			}
			if n != len(model) {
				t.Fatalf("receive buffer holds %d bytes, model %d", n, len(model))
			}
			if level != want {
				t.Fatalf("interrupt line %v, pending interrupts call for %v", level, want)
			}
		}
		if !bytes.Equal(out.Bytes(), sent) {
			t.Fatalf("output %q, want %q", out.Bytes(), sent)
		}
	})
}
