package serial

import (
	"bytes"
	"errors"
	"testing"
)

type irqLog struct{ levels []bool }

func (l *irqLog) set(level bool) { l.levels = append(l.levels, level) }
func (l *irqLog) high() bool     { return len(l.levels) > 0 && l.levels[len(l.levels)-1] }

func newTest() (*UART, *bytes.Buffer, *irqLog) {
	var out bytes.Buffer
	var log irqLog
	return New(&out, log.set), &out, &log
}

func TestTransmit(t *testing.T) {
	u, out, log := newTest()
	for _, c := range []byte("hello\n") {
		u.Write(regData, c)
	}
	if out.String() != "hello\n" {
		t.Errorf("output %q", out.String())
	}
	if log.high() {
		t.Error("interrupt raised with IER = 0")
	}
	if lsr := u.Read(regLSR); lsr&(lsrTHRE|lsrTEMT) != lsrTHRE|lsrTEMT || lsr&lsrDR != 0 {
		t.Errorf("LSR %#x", lsr)
	}
	// Divisor latch writes are not output.
	u.Write(regLCR, lcrDLAB|3)
	u.Write(regData, 0x01)
	u.Write(regIER, 0x00)
	if got := u.Read(regData); got != 0x01 {
		t.Errorf("DLL %#x", got)
	}
	if got := u.Read(regIER); got != 0 {
		t.Errorf("DLM %#x", got)
	}
	u.Write(regLCR, 3)
	if out.String() != "hello\n" {
		t.Errorf("DLAB write reached output: %q", out.String())
	}
}

func TestRegisters(t *testing.T) {
	tests := []struct {
		name  string
		do    func(u *UART)
		reg   uint8
		want  uint8
		maskd uint8
	}{
		{"scratch", func(u *UART) { u.Write(regSCR, 0x5a) }, regSCR, 0x5a, 0xff},
		{"IER keeps four bits", func(u *UART) { u.Write(regIER, 0xff) }, regIER, 0x0f, 0xff},
		{"LCR", func(u *UART) { u.Write(regLCR, 0x1b) }, regLCR, 0x1b, 0xff},
		{"loopback modem status (8250 autoconfig)", func(u *UART) { u.Write(regMCR, mcrLoop|0x0a) }, regMSR, 0x90, 0xf0},
		{"loopback all lines", func(u *UART) { u.Write(regMCR, mcrLoop|0x0f) }, regMSR, 0xf0, 0xf0},
		{"FIFOs reported in IIR", func(u *UART) { u.Write(regIIR, fcrEnable) }, regIIR, 0xc1, 0xff},
		{"no FIFOs", func(u *UART) { u.Write(regIIR, 0) }, regIIR, 0x01, 0xff},
		{"idle LSR", func(u *UART) {}, regLSR, 0x60, 0xff},
		{"out of range", func(u *UART) {}, 9, 0xff, 0xff},
	}
	for _, tt := range tests {
		u, _, _ := newTest()
		tt.do(u)
		if got := u.Read(tt.reg) & tt.maskd; got != tt.want {
			t.Errorf("%s: register %d = %#x, want %#x", tt.name, tt.reg, got, tt.want)
		}
	}
}

func TestLoopbackData(t *testing.T) {
	u, out, _ := newTest()
	u.Write(regMCR, mcrLoop)
	u.Write(regData, 'x')
	if out.Len() != 0 {
		t.Error("loopback byte reached output")
	}
	if u.Read(regLSR)&lsrDR == 0 || u.Read(regData) != 'x' {
		t.Error("loopback byte not received")
	}
}

func TestTHREInterrupt(t *testing.T) {
	u, _, log := newTest()
	u.Write(regIER, ierTHRI)
	if !log.high() {
		t.Fatal("enabling THRI with an empty THR did not raise the line")
	}
	if iir := u.Read(regIIR); iir&0x0f != iirTHRI {
		t.Fatalf("IIR %#x, want THRI", iir)
	}
	if log.high() {
		t.Fatal("line still high after IIR acknowledged THRE")
	}
	if iir := u.Read(regIIR); iir&1 == 0 {
		t.Fatalf("IIR %#x after ack, want no interrupt", iir)
	}
	u.Write(regData, 'a')
	if !log.high() {
		t.Fatal("transmit did not re-raise THRE")
	}
	u.Write(regIER, 0)
	if log.high() {
		t.Fatal("disabling interrupts left the line high")
	}
	// Linux's UART_BUG_THRE probe: THRE must re-assert when THRI is
	// enabled again, even after it was acknowledged.
	u.Write(regIER, ierTHRI)
	iir1 := u.Read(regIIR)
	u.Write(regIER, 0)
	u.Write(regIER, ierTHRI)
	iir2 := u.Read(regIIR)
	u.Write(regIER, 0)
	if iir1&1 != 0 || iir2&1 != 0 {
		t.Errorf("THRE probe: IIR %#x then %#x, want an interrupt both times", iir1, iir2)
	}
}

func TestReceive(t *testing.T) {
	u, _, log := newTest()
	if n := u.Receive([]byte("ab")); n != 2 {
		t.Fatalf("accepted %d", n)
	}
	if log.high() {
		t.Fatal("line raised with RDI disabled")
	}
	u.Write(regIER, ierRDI|ierTHRI)
	if !log.high() {
		t.Fatal("pending data did not raise the line")
	}
	// Received data outranks THR empty.
	if iir := u.Read(regIIR); iir&0x0f != iirRDI {
		t.Fatalf("IIR %#x, want RDI", iir)
	}
	if u.Read(regLSR)&lsrDR == 0 {
		t.Fatal("LSR.DR clear with data queued")
	}
	if a, b := u.Read(regData), u.Read(regData); a != 'a' || b != 'b' {
		t.Fatalf("read %q %q", a, b)
	}
	if u.Read(regLSR)&lsrDR != 0 {
		t.Fatal("LSR.DR set with nothing queued")
	}
	// THRE is still pending (never acknowledged).
	if iir := u.Read(regIIR); iir&0x0f != iirTHRI {
		t.Fatalf("IIR %#x, want THRI next", iir)
	}
	if log.high() {
		t.Fatal("line high with nothing pending")
	}
	if u.Read(regData) != 0 {
		t.Error("empty RBR not zero")
	}
}

func TestReceiveCapacity(t *testing.T) {
	u, _, _ := newTest()
	in := bytes.Repeat([]byte{'z'}, RXCapacity+10)
	if n := u.Receive(in); n != RXCapacity {
		t.Fatalf("accepted %d, want %d", n, RXCapacity)
	}
	if n := u.Receive(in); n != 0 {
		t.Fatalf("full buffer accepted %d", n)
	}
	select {
	case <-u.Drained():
		t.Fatal("Drained before any read")
	default:
	}
	u.Read(regData)
	select {
	case <-u.Drained():
	default:
		t.Fatal("no Drained signal after a read")
	}
	if n := u.Receive(in); n != 1 {
		t.Fatalf("accepted %d after one read", n)
	}
	u.Write(regIIR, fcrEnable|fcrClearRX)
	if u.Read(regLSR)&lsrDR != 0 {
		t.Error("FCR clear left data")
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	f.n++
	return 0, errors.New("broken pipe")
}

func TestOutputError(t *testing.T) {
	fw := &failWriter{}
	u := New(fw, nil)
	u.Write(regData, 'a')
	u.Write(regData, 'b')
	if u.OutputError() == nil || fw.n != 1 {
		t.Errorf("error %v after %d writes", u.OutputError(), fw.n)
	}
}
