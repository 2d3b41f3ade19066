package vmm

import (
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/serial"
)

// TestAbandonedPumpFeedsNoReleasedMachine: a pump left in read(2)
// after the run's end (inputPumpGrace) that then gets the user's bytes
// hands them to the machine's UART, whose interrupt goes to the VM that
// Start has closed by then (KVM_IRQ_LINE on m.vm after release: EBADF, a
// data race on its fd, or another file's number). The run ended: the
// bytes must not reach the machine. From review, helper-109; fixed:
// pumpFD drops what a read returns after the run ended.
func TestAbandonedPumpFeedsNoReleasedMachine(t *testing.T) {
	r, w := inputPipe(t)
	var stopped, lateIRQ atomic.Bool
	m := consoleMachine()
	m.uart = serial.New(io.Discard, func(level bool) {
		if stopped.Load() {
			lateIRQ.Store(true)
		}
	})
	m.uart.Write(1, 0x01) // IER: the guest driver enabled receive interrupts
	inRead := make(chan struct{})
	release := make(chan struct{})
	m.readInput = func(fd int, p []byte) (int, error) {
		select {
		case <-inRead:
		default:
			close(inRead)
		}
		<-release // the user types, long after the run ended
		p[0] = 'y'
		return 1, nil
	}
	stop := startPumpUntilRead(t, m, r, w, inRead)
	stop() // Start returns; release() closes the VM after this
	stopped.Store(true)
	close(release)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && !lateIRQ.Load() {
		time.Sleep(10 * time.Millisecond)
	}
	if lateIRQ.Load() {
		t.Fatal("a console input pump left in read after the run's end fed the UART and raised its interrupt on a released machine")
	}
}
