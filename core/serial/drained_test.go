package serial

import (
	"bytes"
	"testing"
)

// TestFCRClearSignalsDrained (from review): the host's input pump
// (vmm.pumpInput) waits on Drained whenever Receive took fewer bytes than
// offered. A guest that empties the FIFO with an FCR
// write (Linux's 8250 driver does at every open: serial8250_clear_fifos)
// instead of reading RBR must wake it too, or console input stops for the
// rest of the run.
func TestFCRClearSignalsDrained(t *testing.T) {
	u, _, _ := newTest()
	in := bytes.Repeat([]byte{'z'}, RXCapacity+10)
	if n := u.Receive(in); n != RXCapacity {
		t.Fatalf("accepted %d", n)
	}
	// The guest's driver opens the port: FIFOs cleared, then RBR read
	// (serial8250_do_startup), and from then on it reads only when LSR.DR.
	u.Write(regIIR, fcrEnable|fcrClearRX)
	u.Read(regData)
	u.Read(regLSR)
	select {
	case <-u.Drained():
	default:
		t.Fatal("FIFO emptied by FCR, but Drained never signalled: the input pump waits for ever")
	}
}
