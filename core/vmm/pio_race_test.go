package vmm

import (
	"bytes"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/acpi"
	"github.com/krun-core/krun-core/core/serial"
)

// TestPortDispatchManyVCPUs: many vCPUs hit the UART, the PM1 block, the
// status and reset ports at once while the host feeds console input
// (from review, helper-97): no race (-race), no deadlock, every access
// returns within a bound.
func TestPortDispatchManyVCPUs(t *testing.T) {
	var out bytes.Buffer
	m := newTestMachine(&out)
	m.uart = serial.New(&lockedBuf{}, func(bool) {})
	ports := []uint16{serial.COM1Base, serial.COM1Base + 1, serial.COM1Base + 2, serial.COM1Base + 3,
		serial.COM1Base + 4, serial.COM1Base + 5, serial.COM1Base + 6, serial.COM1Base + 7,
		acpi.PM1aEventPort, acpi.PM1aEventPort + 2, acpi.PM1aControlPort, acpi.ResetPort,
		PortMilestone, PortExitStatus, portI8042Command, 0x80}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for v := 0; v < 8; v++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			for {
				select {
				case <-stop:
					return
				default:
				}
				p := ports[r.Intn(len(ports))]
				w := []int{1, 2, 4}[r.Intn(3)]
				data := make([]byte, w)
				r.Read(data)
				m.pio(p, r.Intn(2) == 0, data)
				lastEvent(m)
			}
		}(int64(v))
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			m.uart.Receive([]byte("input"))
		}
	}()
	time.Sleep(2 * time.Second)
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("vCPUs did not finish: a deadlock in the port dispatch")
	}
}

type lockedBuf struct {
	mu sync.Mutex
	n  int
}

func (b *lockedBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.n += len(p)
	return len(p), nil
}
