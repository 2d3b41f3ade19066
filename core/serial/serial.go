// Package serial emulates the 16550A UART the core puts at COM1 (I/O ports
// 0x3f8-0x3ff, IRQ 4): what the guest transmits goes to an io.Writer, and
// bytes the host feeds in arrive in the receive FIFO.
//
// The model covers what Linux's 8250 driver uses: divisor latch, FIFO
// control, line and modem control including loopback (its autoconfig test),
// line status, scratch register, and the received-data and
// transmitter-empty interrupts, which drive one interrupt line.
package serial

import (
	"io"
	"sync"
	"sync/atomic"
)

// COM1 resources.
const (
	COM1Base = 0x3f8
	COM1IRQ  = 4
	NumPorts = 8
)

// Register offsets.
const (
	regData = 0 // RBR (read) / THR (write) / DLL (DLAB)
	regIER  = 1 // IER / DLM (DLAB)
	regIIR  = 2 // IIR (read) / FCR (write)
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7
)

// Register bits.
const (
	ierRDI  = 1 << 0 // received data available
	ierTHRI = 1 << 1 // transmitter holding register empty
	ierRLSI = 1 << 2
	ierMSI  = 1 << 3
	ierMask = 0x0f

	iirNoInt   = 0x01
	iirTHRI    = 0x02
	iirRDI     = 0x04
	iirFIFOsOn = 0xc0

	fcrEnable  = 1 << 0
	fcrClearRX = 1 << 1

	lcrDLAB = 1 << 7

	mcrDTR  = 1 << 0
	mcrRTS  = 1 << 1
	mcrOUT1 = 1 << 2
	mcrOUT2 = 1 << 3
	mcrLoop = 1 << 4

	lsrDR   = 1 << 0
	lsrOE   = 1 << 1
	lsrTHRE = 1 << 5
	lsrTEMT = 1 << 6

	msrCTS = 1 << 4
	msrDSR = 1 << 5
	msrRI  = 1 << 6
	msrDCD = 1 << 7
)

// RXCapacity is how many received bytes the UART buffers before the host
// side has to wait for the guest to read.
const RXCapacity = 64

// UART is one 16550A. It is safe for concurrent use: vCPU threads access
// registers while a host goroutine feeds input.
type UART struct {
	mu  sync.Mutex
	irq func(level bool)

	// outMu serializes the transmitted bytes' writes, outside mu: a
	// write that blocks (a console whose reader stopped reading) holds
	// only the vCPU that transmits, not every access to the UART, the
	// input pump, nor OutputError (found in review, helper-105).
	outMu  sync.Mutex
	out    io.Writer             // guarded by outMu
	outErr atomic.Pointer[error] // the first failed write

	ier, lcr, mcr, scr, fcr uint8
	dll, dlm                uint8
	lsrOverrun              bool
	thrPending              bool // THR-empty interrupt not yet acknowledged
	level                   bool // current interrupt line level
	rx                      []byte
	drained                 chan struct{}
}

// New returns a UART that writes transmitted bytes to out and reports its
// interrupt line level through irq (called with the UART's lock held, only
// when the level changes).
func New(out io.Writer, irq func(level bool)) *UART {
	if out == nil {
		out = io.Discard
	}
	if irq == nil {
		irq = func(bool) {}
	}
	return &UART{
		out:     out,
		irq:     irq,
		mcr:     mcrOUT2,
		dll:     0x0c, // 9600 baud
		drained: make(chan struct{}, 1),
	}
}

// Read returns the register at offset (0..7).
func (u *UART) Read(offset uint8) uint8 {
	u.mu.Lock()
	defer u.mu.Unlock()
	var v uint8
	switch offset {
	case regData:
		if u.lcr&lcrDLAB != 0 {
			return u.dll
		}
		if len(u.rx) > 0 {
			v = u.rx[0]
			u.rx = u.rx[1:]
			if len(u.rx) < RXCapacity {
				u.signalDrained()
			}
		}
	case regIER:
		if u.lcr&lcrDLAB != 0 {
			return u.dlm
		}
		v = u.ier
	case regIIR:
		v = u.iir()
		if v&0x0f == iirTHRI {
			// Reading IIR while it reports THR empty acknowledges it.
			u.thrPending = false
		}
		if u.fcr&fcrEnable != 0 {
			v |= iirFIFOsOn
		}
	case regLCR:
		v = u.lcr
	case regMCR:
		v = u.mcr
	case regLSR:
		v = lsrTHRE | lsrTEMT
		if len(u.rx) > 0 {
			v |= lsrDR
		}
		if u.lsrOverrun {
			v |= lsrOE
			u.lsrOverrun = false
		}
	case regMSR:
		if u.mcr&mcrLoop != 0 {
			if u.mcr&mcrRTS != 0 {
				v |= msrCTS
			}
			if u.mcr&mcrDTR != 0 {
				v |= msrDSR
			}
			if u.mcr&mcrOUT1 != 0 {
				v |= msrRI
			}
			if u.mcr&mcrOUT2 != 0 {
				v |= msrDCD
			}
		} else {
			v = msrDCD | msrDSR | msrCTS // a terminal is always there
		}
	case regSCR:
		v = u.scr
	default:
		v = 0xff
	}
	u.update()
	return v
}

// Write sets the register at offset (0..7).
func (u *UART) Write(offset uint8, v uint8) {
	if u.write(offset, v) {
		u.transmit(v)
	}
}

// transmit writes a transmitted byte to the output; after a failed write
// the console stops, the guest runs on.
func (u *UART) transmit(v uint8) {
	u.outMu.Lock()
	defer u.outMu.Unlock()
	if u.outErr.Load() != nil {
		return
	}
	if _, err := u.out.Write([]byte{v}); err != nil {
		u.outErr.CompareAndSwap(nil, &err)
	}
}

// write sets the register under mu and reports whether v is a byte to
// transmit.
func (u *UART) write(offset uint8, v uint8) (send bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch offset {
	case regData:
		if u.lcr&lcrDLAB != 0 {
			u.dll = v
			return false
		}
		if u.mcr&mcrLoop != 0 {
			u.receiveLocked([]byte{v})
		} else {
			send = u.outErr.Load() == nil
		}
		// The byte leaves at once, so the holding register is empty again.
		u.thrPending = true
	case regIER:
		if u.lcr&lcrDLAB != 0 {
			u.dlm = v
			return false
		}
		old := u.ier
		u.ier = v & ierMask
		if u.ier&ierTHRI != 0 && old&ierTHRI == 0 {
			u.thrPending = true
		}
	case regIIR: // FCR
		u.fcr = v & fcrEnable
		if v&fcrClearRX != 0 {
			// Linux's 8250 driver clears the FIFOs at every open:
			// there is room again for input waiting on Drained.
			u.rx = u.rx[:0]
			u.signalDrained()
		}
	case regLCR:
		u.lcr = v
	case regMCR:
		u.mcr = v & 0x1f
	case regSCR:
		u.scr = v
	}
	u.update()
	return send
}

// iir computes the pending interrupt of highest priority.
func (u *UART) iir() uint8 {
	switch {
	case u.ier&ierRDI != 0 && len(u.rx) > 0:
		return iirRDI
	case u.ier&ierTHRI != 0 && u.thrPending:
		return iirTHRI
	}
	return iirNoInt
}

// update drives the interrupt line from the pending state.
func (u *UART) update() {
	level := u.iir() != iirNoInt
	if level != u.level {
		u.level = level
		u.irq(level)
	}
}

func (u *UART) receiveLocked(p []byte) int {
	n := min(len(p), RXCapacity-len(u.rx))
	if n < len(p) && u.mcr&mcrLoop != 0 {
		u.lsrOverrun = true
	}
	u.rx = append(u.rx, p[:n]...)
	return n
}

// Receive queues host input for the guest and returns how many bytes fit;
// when fewer than len(p), wait on Drained and try again.
func (u *UART) Receive(p []byte) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := u.receiveLocked(p)
	u.update()
	return n
}

// signalDrained tells a waiting input pump there is room (Drained).
func (u *UART) signalDrained() {
	select {
	case u.drained <- struct{}{}:
	default:
	}
}

// Drained is signalled when the guest has read from a full receive buffer
// or cleared it.
func (u *UART) Drained() <-chan struct{} { return u.drained }

// OutputError returns the first error writing guest output, if any.
func (u *UART) OutputError() error {
	if e := u.outErr.Load(); e != nil {
		return *e
	}
	return nil
}

// SetOutput replaces the writer transmitted bytes go to.
func (u *UART) SetOutput(out io.Writer) {
	if out == nil {
		out = io.Discard
	}
	u.outMu.Lock()
	defer u.outMu.Unlock()
	u.out = out
}
