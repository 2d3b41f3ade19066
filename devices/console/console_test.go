package console

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// serve runs dev over a vhost-user socket pair and connects a test guest's
// console driver to it.
func serve(t *testing.T, dev *Device) *testguest.Console {
	t.Helper()
	devEnd, drvEnd, err := vhostuser.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- backend.Serve(ctx, devEnd, dev, nil) }()
	fc, err := frontend.NewFromFile(drvEnd)
	drvEnd.Close()
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Start(fc, testguest.Options{NumQueues: 4, QueueSize: 64,
		Features: testguest.ConsoleFMultiport, RequiredFeatures: testguest.ConsoleFMultiport})
	if err != nil {
		t.Fatal(err)
	}
	c, err := testguest.NewConsole(g)
	if err != nil {
		g.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		dev.Close()
	})
	return c
}

func newDevice(t *testing.T) *Device {
	t.Helper()
	d, err := New(Config{Name: "krun.stdio"})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestNew(t *testing.T) {
	for _, name := range []string{"", "has space", "tab\t", string(make([]byte, MaxNameLen+1)), "é"} {
		if _, err := New(Config{Name: name}); err == nil {
			t.Errorf("New(%q) accepted", name)
		}
	}
}

func TestConfigSpace(t *testing.T) {
	d := newDevice(t)
	b := make([]byte, configLen)
	if err := d.ReadConfig(0, b); err != nil {
		t.Fatal(err)
	}
	if n := binary.LittleEndian.Uint32(b[4:]); n != 1 {
		t.Errorf("max_nr_ports %d, want 1", n)
	}
	if err := d.ReadConfig(8, make([]byte, 8)); err == nil {
		t.Error("read past the config space accepted")
	}
	if err := d.WriteConfig(1<<31, make([]byte, 4)); err == nil {
		t.Error("write far past the config space accepted")
	}
}

// The driver's setup sees the port added, named and opened by the host,
// and data flows both ways once the guest opens the port.
func TestPortSetupAndData(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	if c.Name != "krun.stdio" || !c.HostOpen {
		t.Fatalf("port name %q, host open %v", c.Name, c.HostOpen)
	}
	var events []uint16
	for _, m := range c.Controls {
		events = append(events, m.Event)
	}
	want := []uint16{testguest.ConsoleDeviceAdd, testguest.ConsolePortName, testguest.ConsolePortOpen}
	if !bytes.Equal(u16s(events), u16s(want)) {
		t.Errorf("control events %v, want %v", events, want)
	}

	// Host data waits until the guest opens the port.
	if _, err := d.Write([]byte("early ")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	n, err := c.ReadContext(ctx, make([]byte, 16))
	cancel()
	if err == nil {
		t.Fatalf("the guest got %d bytes before it opened the port", n)
	}
	if err := c.Open(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.GuestOpen():
	case <-time.After(5 * time.Second):
		t.Fatal("the device did not see PORT_OPEN")
	}
	d.Write([]byte("and late"))
	got := make([]byte, len("early and late"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "early and late" {
		t.Fatalf("guest read %q, %v", got, err)
	}

	// Guest to host, more than the device buffers, in order.
	big := make([]byte, 3<<20)
	for i := range big {
		big[i] = byte(i * 7 / 5)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Write(big); errc <- err }()
	back := make([]byte, len(big))
	if _, err := io.ReadFull(d, back); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, big) {
		t.Fatal("guest data arrived changed")
	}
	if d.Stats().TxBytes.Load() != uint64(len(big)) {
		t.Errorf("tx_bytes %d", d.Stats().TxBytes.Load())
	}

	// Host to guest, more than one receive buffer.
	go d.Write(big[:1<<20])
	back = back[:1<<20]
	if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, big[:1<<20]) {
		t.Fatalf("host data: %v", err)
	}

	if err := c.CloseGuest(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for d.Stats().GuestCloses.Load() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the device did not see PORT_OPEN 0")
		}
		time.Sleep(time.Millisecond)
	}
}

// A guest writing with nobody reading on the host blocks after a bounded
// amount of buffered data; it is not read into unbounded memory.
func TestGuestWritesAreBounded(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	errc := make(chan error, 1)
	go func() { _, err := c.Write(make([]byte, 8<<20)); errc <- err }()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-errc:
		t.Fatalf("an 8 MiB write finished with nobody reading (%v)", err)
	default:
	}
	if n := d.Stats().TxBytes.Load(); n > (txChunks+2)*chunkSize {
		t.Errorf("the device took %d bytes with nobody reading, bound is about %d", n, txChunks*chunkSize)
	}
	go io.Copy(io.Discard, d)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// Bad control messages are counted and ignored; the device keeps working.
func TestBadControl(t *testing.T) {
	d := newDevice(t)
	c := serve(t, d)
	for _, m := range [][3]uint16{{5, testguest.ConsolePortReady, 1}, {0, 99, 0}, {0, testguest.ConsoleDeviceAdd, 0}, {3, testguest.ConsolePortOpen, 1}} {
		if err := c.SendControl(uint32(m[0]), m[1], m[2]); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for d.Stats().BadControl.Load() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("bad control messages counted: %d, want 4", d.Stats().BadControl.Load())
		}
		time.Sleep(time.Millisecond)
	}
	if err := c.Open(); err != nil {
		t.Fatal(err)
	}
	go c.Write([]byte("still works"))
	got := make([]byte, 11)
	if _, err := io.ReadFull(d, got); err != nil || string(got) != "still works" {
		t.Fatalf("after bad control: %q, %v", got, err)
	}
}

func TestCloseEndsReadAndWrite(t *testing.T) {
	d := newDevice(t)
	errc := make(chan error, 2)
	go func() { _, err := d.Read(make([]byte, 1)); errc <- err }()
	go func() {
		for {
			if _, err := d.Write(make([]byte, chunkSize)); err != nil {
				errc <- err
				return
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	d.Close()
	for i := 0; i < 2; i++ {
		select {
		case err := <-errc:
			if err != io.EOF && err != io.ErrClosedPipe {
				t.Errorf("after Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end a blocked Read or Write")
		}
	}
}

func u16s(v []uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}
