package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/acpi"
	"github.com/krun-core/krun-core/core/boot/boottest"
	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/serial"
	"github.com/krun-core/krun-core/devopts"
)

func newTestMachine(out *bytes.Buffer) *machine {
	m := &machine{log: hclog.NewNullLogger(), events: make(chan event, 1)}
	m.uart = serial.New(out, nil)
	m.power.event = m.event
	return m
}

func lastEvent(m *machine) (event, bool) {
	select {
	case ev := <-m.events:
		return ev, true
	default:
		return event{}, false
	}
}

func TestPortDispatch(t *testing.T) {
	tests := []struct {
		name   string
		port   uint16
		out    bool
		data   []byte
		want   []byte // what an IN reads
		reason ExitReason
	}{
		{name: "UART transmit", port: 0x3f8, out: true, data: []byte{'x'}},
		{name: "UART line status", port: 0x3fd, data: []byte{0}, want: []byte{0x60}},
		{name: "i8042 status reads empty", port: 0x64, data: []byte{0xaa}, want: []byte{0}},
		{name: "i8042 other command", port: 0x64, out: true, data: []byte{0xad}},
		{name: "i8042 reset", port: 0x64, out: true, data: []byte{0xfe}, reason: ExitReboot},
		{name: "ACPI reset register", port: acpi.ResetPort, out: true, data: []byte{acpi.ResetValue}, reason: ExitReboot},
		{name: "ACPI reset register wrong value", port: acpi.ResetPort, out: true, data: []byte{0x06}},
		{name: "CMOS reads zero", port: 0x71, data: []byte{0xaa}, want: []byte{0}},
		{name: "nothing at 0xcfc", port: 0xcfc, data: []byte{0, 0, 0, 0}, want: []byte{0xff, 0xff, 0xff, 0xff}},
		{name: "PM1a control reads SCI_EN", port: acpi.PM1aControlPort, data: []byte{0, 0}, want: []byte{1, 0}},
		{name: "S5 poweroff", port: acpi.PM1aControlPort, out: true, data: le16(acpi.SleepTypeS5<<10 | acpi.PM1SleepEn), reason: ExitPowerOff},
		{name: "S5 type without SLP_EN", port: acpi.PM1aControlPort, out: true, data: le16(acpi.SleepTypeS5 << 10)},
		{name: "other sleep type", port: acpi.PM1aControlPort, out: true, data: le16(3<<10 | acpi.PM1SleepEn)},
	}
	for _, tt := range tests {
		var out bytes.Buffer
		m := newTestMachine(&out)
		m.pio(tt.port, tt.out, tt.data)
		if !tt.out && !bytes.Equal(tt.data, tt.want) {
			t.Errorf("%s: read % x, want % x", tt.name, tt.data, tt.want)
		}
		ev, got := lastEvent(m)
		switch {
		case tt.reason != 0 && (!got || ev.reason != tt.reason):
			t.Errorf("%s: event %+v (%v), want %v", tt.name, ev, got, tt.reason)
		case tt.reason == 0 && got:
			t.Errorf("%s: unexpected event %+v", tt.name, ev)
		}
		if tt.name == "UART transmit" && out.String() != "x" {
			t.Errorf("UART output %q", out.String())
		}
	}
}

func le16(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }

func TestPM1Registers(t *testing.T) {
	var p power
	var events []event
	p.event = func(e event) { events = append(events, e) }
	// Enable register holds its value; status is write-1-to-clear.
	p.access(acpi.PM1aEventPort+2, true, le16(0x0120))
	got := make([]byte, 4)
	p.access(acpi.PM1aEventPort, false, got)
	if binary.LittleEndian.Uint16(got[2:]) != 0x0120 || binary.LittleEndian.Uint16(got) != 0 {
		t.Errorf("PM1 event block % x", got)
	}
	p.regs[0] = 0x11
	p.access(acpi.PM1aEventPort, true, []byte{0x01})
	if p.regs[0] != 0x10 {
		t.Errorf("status after W1C %#x", p.regs[0])
	}
	// SLP_EN never reads back; SLP_TYP does.
	p.access(acpi.PM1aControlPort, true, le16(2<<10|acpi.PM1SleepEn))
	ctl := make([]byte, 2)
	p.access(acpi.PM1aControlPort, false, ctl)
	if v := binary.LittleEndian.Uint16(ctl); v != 2<<10|acpi.PM1SCIEn {
		t.Errorf("control reads %#x", v)
	}
	if len(events) != 0 {
		t.Errorf("S2 request powered off: %v", events)
	}
	// Byte-wise write of S5|SLP_EN, as a 32-bit access spanning the block.
	p.access(acpi.PM1aControlPort+1, true, []byte{byte((acpi.SleepTypeS5<<10 | acpi.PM1SleepEn) >> 8)})
	if len(events) != 1 || events[0].reason != ExitPowerOff {
		t.Errorf("events %v", events)
	}
	// Out of the block: ignored, reads zero.
	b := []byte{9, 9}
	p.access(acpi.PM1aControlPort+1, false, b)
	if b[1] != 0 {
		t.Errorf("read past the block % x", b)
	}
}

func TestMMIOOutsideDevices(t *testing.T) {
	m := newTestMachine(&bytes.Buffer{})
	b := []byte{1, 2, 3, 4}
	m.mmio(MMIOBase, false, b)
	if !bytes.Equal(b, []byte{0, 0, 0, 0}) {
		t.Errorf("read of an empty slot % x", b)
	}
	m.mmio(0xfed00000, true, b) // no crash, no effect
}

func TestMarkerWriter(t *testing.T) {
	var out bytes.Buffer
	w := &markerWriter{w: &out, marker: []byte("INIT-GO")}
	for _, c := range []byte("boot INIT-G INIT-GO more") {
		w.Write([]byte{c})
		if c == 'G' && !w.seenAt().IsZero() {
			t.Fatal("marker seen too early")
		}
	}
	if w.seenAt().IsZero() {
		t.Error("marker not seen")
	}
	if out.String() != "boot INIT-G INIT-GO more" {
		t.Errorf("output %q", out.String())
	}
	w2 := &markerWriter{w: &out}
	w2.Write([]byte("anything"))
	if !w2.seenAt().IsZero() {
		t.Error("empty marker matched")
	}
}

func TestHasParam(t *testing.T) {
	for _, tt := range []struct {
		cmdline string
		want    bool
	}{
		{"console=ttyS0 pci=off", true}, {"pci", true}, {"console=ttyS0 apci=on", false},
		{"foo=pci=off", false}, {"", false},
	} {
		if got := hasParam(tt.cmdline, "pci"); got != tt.want {
			t.Errorf("hasParam(%q) = %v", tt.cmdline, got)
		}
	}
}

func TestContextConfig(t *testing.T) {
	c := NewContext(nil)
	for _, tt := range []struct {
		cpus int
		mem  uint64
		ok   bool
	}{{1, 64, true}, {8, 4096, true}, {0, 512, false}, {256, 512, false}, {1, 63, false}, {1, MaxMemoryMiB + 1, false}} {
		err := c.SetVMConfig(tt.cpus, tt.mem)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrConfig)) {
			t.Errorf("SetVMConfig(%d, %d) = %v", tt.cpus, tt.mem, err)
		}
	}
	if err := c.AddDisk("/x.img", devopts.Format("vmdk"), false); !errors.Is(err, ErrConfig) {
		t.Errorf("AddDisk with an unknown format: %v", err)
	}
	if err := c.AddDisk("", devopts.Raw, false); !errors.Is(err, ErrConfig) {
		t.Errorf("AddDisk without a path: %v", err)
	}
	if err := c.AddDiskSpec("path=/x.img"); err == nil {
		t.Error("AddDiskSpec without format accepted")
	}
	for i := 0; i < MaxDevices; i++ {
		if err := c.AddDisk("/x.img", devopts.Raw, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.AddDisk("/x.img", devopts.Raw, true); !errors.Is(err, ErrConfig) {
		t.Errorf("device %d accepted", MaxDevices+1)
	}
	if err := c.SetKernel("", "", ""); !errors.Is(err, ErrConfig) {
		t.Errorf("SetKernel without a kernel: %v", err)
	}
	t.Setenv(KernelEnv, filepath.Join(t.TempDir(), "missing-vmlinuz"))
	if _, err := NewContext(nil).Start(context.Background()); !errors.Is(err, ErrNoKernel) {
		t.Errorf("Start without a kernel: %v", err)
	}
}

// TestStartWithoutKVM checks the error a host without a usable KVM (no
// /dev/kvm, or a PVM one) gets.
func TestStartWithoutKVM(t *testing.T) {
	if kvm.CheckHost() == nil {
		t.Skip("this host's KVM boots stock kernels; the no-KVM path is not reachable")
	}
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	c := NewContext(nil)
	if err := c.SetKernel(k, "", ""); err != nil {
		t.Fatal(err)
	}
	_, err := c.Start(context.Background())
	if !errors.Is(err, kvm.ErrNoKVM) {
		t.Fatalf("Start = %v, want ErrNoKVM", err)
	}
	if _, err := c.Start(context.Background()); err == nil {
		t.Error("a Context started twice")
	}
}

func TestCoreRSS(t *testing.T) {
	if rss := coreRSS(); rss < 1<<20 || rss > 1<<32 {
		t.Errorf("coreRSS = %d bytes", rss)
	}
}

// TestBootWatchdog checks the watchdog's decision: a guest with no sign of
// life is ended with ErrBootTimeout; one that has touched a device is
// left alone until its own event; 0 turns the watchdog off.
func TestBootWatchdog(t *testing.T) {
	const short = 20 * time.Millisecond
	tests := []struct {
		name    string
		alive   bool
		timeout time.Duration
		want    error // nil: the guest's own event (poweroff) ends the run
	}{
		{"silent guest", false, short, ErrBootTimeout},
		{"guest touched a device", true, short, nil},
		{"watchdog off", false, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &machine{events: make(chan event, 1)}
			m.alive.Store(tt.alive)
			if tt.want == nil {
				// The guest's own event comes well after the timeout.
				time.AfterFunc(5*short, func() { m.event(event{reason: ExitPowerOff}) })
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ev := m.wait(ctx, tt.timeout)
			if tt.want != nil {
				if !errors.Is(ev.err, tt.want) {
					t.Fatalf("wait = %+v, want %v", ev, tt.want)
				}
				if strings.Contains(ev.err.Error(), "\n") || !strings.Contains(ev.err.Error(), "--boot-timeout") {
					t.Errorf("watchdog error %q: want one line naming --boot-timeout", ev.err)
				}
				return
			}
			if ev.err != nil || ev.reason != ExitPowerOff {
				t.Fatalf("wait = %+v, want the guest's poweroff", ev)
			}
		})
	}
}

func TestSetBootTimeout(t *testing.T) {
	c := NewContext(nil)
	if c.bootTimeout != DefaultBootTimeout {
		t.Errorf("default boot timeout %v", c.bootTimeout)
	}
	if err := c.SetBootTimeout(-time.Second); !errors.Is(err, ErrConfig) {
		t.Errorf("negative timeout: %v", err)
	}
	if err := c.SetBootTimeout(0); err != nil || c.bootTimeout != 0 {
		t.Errorf("SetBootTimeout(0) = %v, %v", err, c.bootTimeout)
	}
}

// TestTripleFaultEndsTheVCPU: a triple fault is the guest's reboot, sent
// once, and the vCPU goes back into the guest no more (errVCPUDone, which
// runVCPU takes as the end of its loop, not as an error): entered again it
// faulted again at once, a log line an exit, until the machine stopped it
// (from review, helper-97).
func TestTripleFaultEndsTheVCPU(t *testing.T) {
	m := newTestMachine(&bytes.Buffer{})
	err := m.handleExit(&kvm.VCPU{}, kvm.ExitShutdown)
	if !errors.Is(err, errVCPUDone) {
		t.Fatalf("handleExit after a triple fault: %v, want errVCPUDone", err)
	}
	if ev, ok := lastEvent(m); !ok || ev.reason != ExitReboot || ev.err != nil {
		t.Fatalf("event %+v (%v), want a reboot", ev, ok)
	}
}
