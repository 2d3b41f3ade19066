package vmm

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// testServer is one back-end process's worth of serving: a listening
// socket at a path and backend.Serve on it, stopped as a daemon that exits
// would be (its connection closed, its socket file left behind).
type testServer struct {
	f      *os.File
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

func startTestServer(t *testing.T, sock string, dev backend.Device) *testServer {
	t.Helper()
	os.Remove(sock) // the previous server's
	s := &testServer{f: backendtest.Listen(t, sock), done: make(chan struct{})}
	var ctx context.Context
	ctx, s.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(s.done)
		backend.Serve(ctx, s.f, dev, nil)
	}()
	t.Cleanup(s.stop)
	return s
}

func (s *testServer) stop() {
	s.once.Do(func() {
		s.cancel()
		s.f.Close()
		<-s.done
	})
}

// reconnectRig attaches spec (its socket given) to a machine without KVM,
// with the monitor running, and returns the device, a driver and the
// core's log.
func reconnectRig(t *testing.T, spec string) (*pluginDevice, *ringDriver, *syncbuf.Buffer) {
	t.Helper()
	d, drv, logs, _, _ := reconnectMachine(t, spec)
	return d, drv, logs
}

// waitLog waits until the log holds want n times (the device must not fail
// meanwhile).
func waitLog(t *testing.T, d *pluginDevice, logs *syncbuf.Buffer, want string, n int) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); strings.Count(logs.String(), want) < n; time.Sleep(5 * time.Millisecond) {
		if err := d.dev.Failed(); err != nil {
			t.Fatalf("device failed: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q (%d times) in the log", want, n)
		}
	}
}

func blkTestDevice(t *testing.T, path string) *blk.Device {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	dk, err := raw.Open(f, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dk.Close() })
	dev, err := blk.New(blk.Config{Disk: dk})
	if err != nil {
		t.Fatal(err)
	}
	return dev
}

const reconnected = "reconnected to the vhost-user back-end; the device serves again"

// TestExternalReconnect: with reconnect=, an external back-end that goes
// away while the guest runs (a daemon restarted) no longer fails the
// device: the core suspends it, connects again until a new back-end
// listens on the socket, and resumes the rings there; a request the guest
// posted meanwhile completes once, and every write reads back. Without
// reconnect= the device fails as before (TestExternalHangup).
func TestExternalReconnect(t *testing.T) {
	dir := shortDir(t)
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	srv := startTestServer(t, sock, blkTestDevice(t, img))
	d, drv, logs := reconnectRig(t, "type=blk,reconnect=0.05,socket="+sock)
	if d.inflight == nil {
		t.Fatal("no inflight region from a back-end that offers INFLIGHT_SHMFD")
	}
	drv.start()
	a := bytes.Repeat([]byte{0xa1}, 512)
	drv.post(0, 0, a)
	drv.wait(1, 0, 10*time.Second)

	// The daemon goes; a request is posted while nothing listens.
	srv.stop()
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)
	b := bytes.Repeat([]byte{0xb2}, 512)
	drv.post(1, 8, b)
	// Two failed attempts, waited for: the second comes an interval
	// after the first, which a loaded machine can push past any fixed
	// sleep.
	waitLog(t, d, logs, "reconnect failed; trying again", 2)
	if !d.dev.Suspended() {
		t.Fatal("device not suspended while its back-end is away")
	}
	srv = startTestServer(t, sock, blkTestDevice(t, img))
	drv.wait(2, 1, 30*time.Second)
	waitLog(t, d, logs, reconnected, 1)
	// While nothing listened: one WARN line, then DEBUG lines.
	if n := strings.Count(logs.String(), "[WARN]  vhost-user-blk: reconnect failed"); n != 1 {
		t.Errorf("%d WARN lines for the same failure, want 1", n)
	}

	// Once more, then read both writes back through the third back-end.
	srv.stop()
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 2)
	startTestServer(t, sock, blkTestDevice(t, img))
	waitLog(t, d, logs, reconnected, 2)
	for i, want := range [][]byte{a, b} {
		drv.readBack(2+i, uint64(i*8), uint16(3+i), want, 10*time.Second)
	}
	imageHolds(t, img, map[uint64][]byte{0: a, 8: b})
}

// TestExternalReconnectChecksNewBackend: a back-end that takes over must
// offer every feature the first one had (the guest may have acked them);
// one that does not is refused with a line in the log, the device stays
// suspended, and the next attempts go on until a suitable one listens.
func TestExternalReconnectChecksNewBackend(t *testing.T) {
	const featX = 1 << 20
	sock := filepath.Join(shortDir(t), "be.sock")
	srv := startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1, features: featX})
	d, drv, logs := reconnectRig(t, "type=4,reconnect=0.02,socket="+sock)
	drv.start()
	srv.stop()
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)
	srv = startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1})
	waitLog(t, d, logs, "lacks features 0x100000", 1)
	if !d.dev.Suspended() || d.dev.Failed() != nil {
		t.Fatalf("after a refused back-end: suspended %v, failed %v", d.dev.Suspended(), d.dev.Failed())
	}
	srv.stop()
	startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1, features: featX})
	waitLog(t, d, logs, reconnected, 1)
	if d.dev.Suspended() {
		t.Fatal("device still suspended after the reconnection")
	}
}

// TestExternalReconnectQemuStorageDaemon: qemu-storage-daemon 7.2 keeps no
// inflight region, so a new one can only start at the used index. Killed
// while no request is outstanding, it is reconnected once started again
// on its socket, and the writes the guest posted meanwhile complete and
// read back. Killed with a request outstanding (stopped first, so the
// request cannot complete), the device fails with one line saying why
// instead of resuming with a request lost or repeated.
func TestExternalReconnectQemuStorageDaemon(t *testing.T) {
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (Debian package qemu-utils)")
	}
	dir := shortDir(t)
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	start := func() *exec.Cmd {
		t.Helper()
		os.Remove(sock)
		cmd := exec.Command(qsd, "--blockdev", "driver=file,node-name=f,filename="+img,
			"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="+sock+",writable=on")
		var out syncbuf.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if c, err := os.Stat(sock); err == nil && c.Mode()&os.ModeSocket != 0 {
				return cmd
			}
			if time.Now().After(deadline) {
				t.Fatalf("qemu-storage-daemon did not listen: %s", out.String())
			}
		}
	}
	kill := func(cmd *exec.Cmd) {
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
	cmd := start()
	d, drv, logs := reconnectRig(t, "type=blk,reconnect=0.05,socket="+sock)
	if !strings.Contains(logs.String(), "keeps no inflight region (INFLIGHT_SHMFD): it is reconnected only if lost with no request outstanding") {
		t.Error("no warning at attach that the back-end is reconnected only when idle")
	}
	drv.start()
	want := make([][]byte, 5)
	for i := range want {
		want[i] = bytes.Repeat([]byte{byte(0x10 + i)}, 512)
	}
	drv.post(0, 0, want[0])
	drv.wait(1, 0, 10*time.Second)

	// Lost while idle: reconnected; two writes posted while it is away.
	kill(cmd)
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)
	drv.post(1, 8, want[1])
	drv.post(2, 16, want[2])
	cmd = start()
	waitLog(t, d, logs, reconnected, 1)
	drv.wait(3, 2, 30*time.Second)
	for i := range 3 {
		if st := drv.get(uint64(rdBufs+i*0x1000+0x100), 1)[0]; st != 0 {
			t.Fatalf("write %d: status %d", i, st)
		}
		slot := []int{3, 4, 0}[i] // at most 5 slots of 3 descriptors in 16
		drv.readBack(slot, uint64(i*8), uint16(4+i), want[i], 10*time.Second)
	}

	// Lost with a write outstanding: the device fails, one line says why.
	cmd.Process.Signal(syscall.SIGSTOP)
	drv.post(1, 24, want[3])
	time.Sleep(50 * time.Millisecond)
	kill(cmd)
	for deadline := time.Now().Add(30 * time.Second); d.dev.Failed() == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the device did not fail")
		}
	}
	if err := d.dev.Failed(); !strings.Contains(err.Error(), "queue 0 had requests in flight") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("device error: %v", err)
	}
	if strings.Count(logs.String(), reconnected) != 1 {
		t.Fatal("reconnected after a loss with a request outstanding")
	}
}

// reconnectMachine attaches spec (its socket given) to a machine without
// KVM, with the monitor running, and returns the device, a driver, the
// core's log, the machine and the monitor's cancel.
func reconnectMachine(t *testing.T, spec string) (*pluginDevice, *ringDriver, *syncbuf.Buffer, *machine, context.CancelFunc) {
	t.Helper()
	var logs syncbuf.Buffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("core log:\n%s", logs.String())
		}
	})
	c := NewContext(hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Debug}))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	// qemu-storage-daemon creates its socket a moment before it listens.
	d := connectRetryCtx(t, ctx, c, spec)
	m := newDeviceMachine(t, c.log, []*pluginDevice{d})
	if err := m.attachDevices(); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	d.startMonitor(runCtx)
	t.Cleanup(func() {
		stop()
		m.shutdownDevices()
	})
	return d, &ringDriver{t: t, mem: m.mem, dev: d.dev}, &logs, m, stop
}

// TestExternalReconnectShutdownDuringHungReattach (from review): a back-end
// that accepted the reconnection and never answered held the VM's exit
// for the whole 10 s negotiation limit: the attempt's client was not
// closed when the run ended.
func TestExternalReconnectShutdownDuringHungReattach(t *testing.T) {
	sock := filepath.Join(shortDir(t), "be.sock")
	srv := startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1})
	d, drv, logs, m, stop := reconnectMachine(t, "type=4,reconnect=0.02,socket="+sock)
	drv.start()
	srv.stop()
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)

	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conn, err := ln.Accept() // the core's next attempt; never answered
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	time.Sleep(100 * time.Millisecond) // the core waits in Reattach now

	// The VM exits (machine.run: stopVCPUs, cancel, then close).
	m.stopVCPUs()
	stop()
	start := time.Now()
	done := make(chan struct{})
	go func() { m.shutdownDevices(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		<-done
		t.Fatalf("shutdown took %v with a hung back-end in Reattach", time.Since(start).Round(time.Millisecond))
	}
}

// TestExternalReconnectStopsOnceFailed (from review): a device that failed
// while its back-end was away kept being reconnected for the VM's life
// (each attempt negotiating, then refused by Resume).
func TestExternalReconnectStopsOnceFailed(t *testing.T) {
	sock := filepath.Join(shortDir(t), "be.sock")
	srv := startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1})
	d, drv, logs := reconnectRig(t, "type=4,reconnect=0.02,socket="+sock)
	drv.start()
	srv.stop()
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)
	d.dev.Fail(errors.New("failed while suspended"))
	startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1})
	select {
	case <-d.monitorDone:
	case <-time.After(2 * time.Second):
		n := strings.Count(logs.String(), "reconnect failed; trying again")
		t.Fatalf("monitor still reconnecting 2 s after the device failed (%d failed attempts logged)", n)
	}
}

// TestExternalUnresponsiveNotReplaced (from review): a back-end that failed
// a call but keeps its connection may still be using the rings, and the
// core cannot kill a process it did not start: reconnecting would let a
// second back-end serve the same rings. The device fails instead, and the
// back-end sees its connection end.
func TestExternalUnresponsiveNotReplaced(t *testing.T) {
	sock := filepath.Join(shortDir(t), "be.sock")
	startTestServer(t, sock, &fakeDevice{typ: 4, queues: 1})
	d, drv, logs := reconnectRig(t, "type=4,reconnect=0.02,socket="+sock)
	drv.start()
	d.backendGone(errors.New("request timed out")) // as the transport reports a timeout
	select {
	case <-d.monitorDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the monitor did not end")
	}
	err := d.dev.Failed()
	if err == nil || !strings.Contains(err.Error(), "stopped answering") {
		t.Fatalf("device error %v", err)
	}
	if strings.Contains(logs.String(), "reconnecting") {
		t.Fatal("a back-end that still holds its connection was replaced")
	}
}
