package main

import (
	"fmt"
	"os"
	"sync"
)

// statusPorts writes krun-init's status bytes: milestones and the exit
// status, one byte each on their own I/O port.
//
// The write is an OUTB instruction (a few lines of Go assembly) after
// ioperm(2): it needs no device node, works before /dev is mounted and
// only needs CONFIG_X86_IOPL_IOPERM (default y). Where ioperm fails, the
// byte goes through /dev/port (CONFIG_DEVPORT, which Debian has) instead.
type statusPorts struct {
	milestonePort, exitPort uint16

	mu      sync.Mutex
	devPort *os.File // fallback, opened on first need
	err     error    // the first failure, for the log
}

func openStatusPorts(milestone, exit uint16) *statusPorts {
	return &statusPorts{milestonePort: milestone, exitPort: exit}
}

func (p *statusPorts) write(port uint16, val uint8) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ioErr := ioportWrite(port, val)
	if ioErr == nil {
		return nil
	}
	if p.devPort == nil {
		f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0)
		if err != nil {
			err = fmt.Errorf("port %#x: ioperm: %v; /dev/port: %w", port, ioErr, err)
			if p.err == nil {
				p.err = err
			}
			return err
		}
		p.devPort = f
	}
	if _, err := p.devPort.WriteAt([]byte{val}, int64(port)); err != nil {
		return fmt.Errorf("port %#x: ioperm: %v; /dev/port: %w", port, ioErr, err)
	}
	return nil
}

// milestone reports progress; failures are only logged by the caller's
// first look at p.err (the host's timing is optional).
func (p *statusPorts) milestone(m uint8) { _ = p.write(p.milestonePort, m) }

// exit reports the command's exit status.
func (p *statusPorts) exit(status uint8) error { return p.write(p.exitPort, status) }
