package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// ringDriver is a minimal virtio-mmio driver of one virtio-blk queue in
// guest memory, for tests of the core without KVM: it writes the
// transport's registers as the guest's driver would and kicks by hand
// (QueueNotify reaches the core without an ioeventfd).
type ringDriver struct {
	t     testing.TB
	mem   *guestmem.Memory
	dev   *mmio.Device
	avail uint16
	used  uint16
}

const (
	rdQueueSize = 16
	rdDesc      = 0x10000
	rdAvail     = 0x11000
	rdUsed      = 0x12000
	rdBufs      = 0x20000 // request i: header, data, status at rdBufs+i*0x1000
)

func (r *ringDriver) reg(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	r.dev.Write(off, b[:])
}

func (r *ringDriver) rd(off uint64) uint32 {
	var b [4]byte
	r.dev.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// startQueue0 brings dev up as a guest's driver does, with only
// VIRTIO_F_VERSION_1 and queue 0 of size entries at desc, avail and used,
// and returns the device status read back (DRIVER_OK set if it took it).
func startQueue0(dev *mmio.Device, size, desc, avail, used uint32) uint32 {
	reg := func(off uint64, v uint32) {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], v)
		dev.Write(off, b[:])
	}
	reg(mmio.RegStatus, 0)
	reg(mmio.RegStatus, mmio.StatusAcknowledge|mmio.StatusDriver)
	reg(mmio.RegDriverFeatSel, 1)
	reg(mmio.RegDriverFeatures, 1) // VIRTIO_F_VERSION_1
	reg(mmio.RegDriverFeatSel, 0)
	reg(mmio.RegDriverFeatures, 0)
	reg(mmio.RegStatus, mmio.StatusAcknowledge|mmio.StatusDriver|mmio.StatusFeaturesOK)
	reg(mmio.RegQueueSel, 0)
	reg(mmio.RegQueueNum, size)
	reg(mmio.RegQueueDescLow, desc)
	reg(mmio.RegQueueDriverLow, avail)
	reg(mmio.RegQueueDeviceLow, used)
	reg(mmio.RegQueueReady, 1)
	reg(mmio.RegStatus, mmio.StatusAcknowledge|mmio.StatusDriver|mmio.StatusFeaturesOK|mmio.StatusDriverOK)
	var b [4]byte
	dev.Read(mmio.RegStatus, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

func (r *ringDriver) start() {
	if st := startQueue0(r.dev, rdQueueSize, rdDesc, rdAvail, rdUsed); st&mmio.StatusDriverOK == 0 {
		r.t.Fatalf("device status %#x", st)
	}
}

func (r *ringDriver) put(gpa uint64, b []byte) {
	if err := r.mem.Write(guestmem.Addr(gpa), b); err != nil {
		r.t.Fatal(err)
	}
}

// idx reads a ring index with one load, as a driver does: get copies byte
// by byte and can see half of a store the back-end makes meanwhile.
func (r *ringDriver) idx(gpa uint64) uint16 {
	v, err := r.mem.Load16(guestmem.Addr(gpa))
	if err != nil {
		r.t.Fatal(err)
	}
	return v
}

// setIdx stores a ring index with one store, never half of it.
func (r *ringDriver) setIdx(gpa uint64, v uint16) {
	if err := r.mem.Store16(guestmem.Addr(gpa), v); err != nil {
		r.t.Fatal(err)
	}
}

func (r *ringDriver) get(gpa uint64, n int) []byte {
	b := make([]byte, n)
	if err := r.mem.Read(guestmem.Addr(gpa), b); err != nil {
		r.t.Fatal(err)
	}
	return b
}

// post makes a virtio-blk request (write when data is given, else a read
// of one sector) available in slot i and kicks; it returns the data
// buffer's address.
func (r *ringDriver) post(i int, sector uint64, data []byte) uint64 {
	base := r.stage(i, sector, data)
	r.publish()
	return base
}

// stage lays out a virtio-blk request as post does and puts it in the
// avail ring, but leaves the avail index and the kick to publish, so that
// several requests can become available at once. It returns the data
// buffer's address.
func (r *ringDriver) stage(i int, sector uint64, data []byte) uint64 {
	base := uint64(rdBufs + i*0x1000)
	typ := uint32(0)
	if data != nil {
		typ = 1
		r.put(base+0x200, data)
	}
	hdr := make([]byte, 16)
	binary.LittleEndian.PutUint32(hdr, typ)
	binary.LittleEndian.PutUint64(hdr[8:], sector)
	r.put(base, hdr)
	r.put(base+0x100, []byte{0xff})
	desc := func(j int, addr uint64, n uint32, flags, next uint16) {
		d := make([]byte, 16)
		binary.LittleEndian.PutUint64(d, addr)
		binary.LittleEndian.PutUint32(d[8:], n)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], next)
		r.put(rdDesc+uint64(j)*16, d)
	}
	h := uint16(i * 3)
	dataFlags := uint16(1) // NEXT
	if data == nil {
		dataFlags |= 2 // WRITE
	}
	desc(int(h), base, 16, 1, h+1)
	desc(int(h)+1, base+0x200, 512, dataFlags, h+2)
	desc(int(h)+2, base+0x100, 1, 2, 0)
	var e [2]byte
	binary.LittleEndian.PutUint16(e[:], h)
	r.put(rdAvail+4+2*uint64(r.avail%rdQueueSize), e[:])
	r.avail++
	return base
}

// publish publishes the avail index (every staged request at once) and
// kicks.
func (r *ringDriver) publish() {
	r.setIdx(rdAvail+2, r.avail)
	r.reg(mmio.RegQueueNotify, 0)
}

// readBack reads sector through request slot i, waits until the device
// has used n chains in all, and fails unless the sector holds want.
func (r *ringDriver) readBack(i int, sector uint64, n uint16, want []byte, within time.Duration) {
	r.t.Helper()
	buf := r.post(i, sector, nil)
	r.wait(n, i, within)
	if got := r.get(buf+0x200, 512); !bytes.Equal(got, want) {
		r.t.Fatalf("sector %d reads %#x..., want %#x...", sector, got[:4], want[:4])
	}
}

// imageHolds fails unless the image file holds each write at its sector.
func imageHolds(t *testing.T, img string, writes map[uint64][]byte) {
	t.Helper()
	image, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	for sector, want := range writes {
		off := sector * 512
		if off+512 > uint64(len(image)) || !bytes.Equal(image[off:off+512], want) {
			t.Fatalf("the image does not hold the write to sector %d", sector)
		}
	}
}

// wait waits until the device has used n chains in all and checks the
// status byte of request slot i.
func (r *ringDriver) wait(n uint16, i int, within time.Duration) {
	r.t.Helper()
	deadline := time.Now().Add(within)
	for r.idx(rdUsed+2) != n {
		if time.Now().After(deadline) {
			r.t.Fatalf("used index %d, want %d", r.idx(rdUsed+2), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if st := r.get(uint64(rdBufs+i*0x1000+0x100), 1)[0]; st != 0 {
		r.t.Fatalf("request %d: status %d", i, st)
	}
}

// restartRig is a blk-raw plugin behind the core's transport, without KVM.
type restartRig struct {
	m    *machine
	d    *pluginDevice
	drv  *ringDriver
	img  string
	logs *syncbuf.Buffer
	pid  int // the first plugin's
	// stop ends the device's monitor, as the end of a run does before
	// the devices are shut down.
	stop context.CancelFunc
}

func newRestartRig(t testing.TB, policy pluginhost.RestartPolicy, setup ...func(*Context, devspec.Spec)) *restartRig {
	t.Helper()
	return newRestartRigOf(t, "../../plugins/blk-raw", policy, setup...)
}

// newRestartRigOf is newRestartRig with the package pkg built as the
// blk-raw plugin.
func newRestartRigOf(t testing.TB, pkg string, policy pluginhost.RestartPolicy, setup ...func(*Context, devspec.Spec)) *restartRig {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return newRestartRigDisk(t, dir, pkg, "krun-plugin-blk-raw", img, "raw", policy, setup...)
}

// newRestartRigDisk is newRestartRigOf for the image img of format, with
// the package pkg built as the plugin bin in dir.
func newRestartRigDisk(t testing.TB, dir, pkg, bin, img, format string, policy pluginhost.RestartPolicy, setup ...func(*Context, devspec.Spec)) *restartRig {
	t.Helper()
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, bin), pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	var logs syncbuf.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Debug})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("core log:\n%s", logs.String())
		}
	})
	c := NewContext(log)
	c.SetPluginDir(dir)
	c.SetSandboxOff(true) // no trampoline next to a test binary
	c.SetPluginRestarts(policy)
	spec, err := devspec.ParseDisk("path=" + img + ",format=" + format)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.AddDevice(spec); err != nil {
		t.Fatal(err)
	}
	for _, f := range setup {
		f(c, spec)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	devs, err := c.launchPlugins(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m := newDeviceMachine(t, log, devs)
	mem := m.mem
	if err := m.attachDevices(); err != nil {
		t.Fatal(err)
	}
	d := devs[0]
	// The plugin's pid: the first one's before the monitor may replace
	// it, then the one each "restarted" line names.
	pid := d.plugin.Pid()
	runCtx, stop := context.WithCancel(ctx)
	d.startMonitor(runCtx)
	t.Cleanup(func() {
		stop()
		m.shutdownDevices()
	})
	drv := &ringDriver{t: t, mem: mem, dev: d.dev}
	drv.start()
	return &restartRig{m: m, d: d, drv: drv, img: img, logs: &logs, pid: pid, stop: stop}
}

// TestRestartResumesDevice runs the core's device path without KVM: a
// blk-raw plugin serves a disk through the virtio-mmio transport to a
// minimal driver; its process is killed (SIGKILL) after a write and again
// with a request posted while it is dead. The core restarts it, the device
// never fails, the request completes once, and every write reads back;
// once the restart budget is spent the next death fails the device.
func TestRestartResumesDevice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: 3, Window: time.Hour})
	d, drv, img, logs, pid := r.d, r.drv, r.img, r.logs, r.pid

	a := bytes.Repeat([]byte{0xa1}, 512)
	drv.post(0, 0, a)
	drv.wait(1, 0, 10*time.Second)

	restarted := 0
	kill := func() {
		t.Helper()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	waitRestart := func() {
		t.Helper()
		restarted++
		deadline := time.Now().Add(30 * time.Second)
		for {
			if m := restartedPidRE.FindAllStringSubmatch(logs.String(), -1); len(m) >= restarted {
				next, _ := strconv.Atoi(m[restarted-1][1])
				if next == pid {
					t.Fatalf("restart %d reports the old pid %d", restarted, pid)
				}
				pid = next
				if d.dev.Suspended() {
					t.Fatal("device still suspended after the restart")
				}
				return
			}
			if err := d.dev.Failed(); err != nil {
				t.Fatalf("device failed: %v", err)
			}
			if time.Now().After(deadline) {
				t.Fatal("plugin not restarted")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// A request posted while the plugin is dead completes after the
	// restart.
	kill()
	time.Sleep(50 * time.Millisecond)
	b := bytes.Repeat([]byte{0xb2}, 512)
	drv.post(1, 8, b)
	drv.wait(2, 1, 30*time.Second)
	waitRestart()

	// Both writes are on the disk, read through the new plugin.
	for i, want := range [][]byte{a, b} {
		drv.readBack(2+i, uint64(i*8), uint16(3+i), want, 10*time.Second)
	}
	imageHolds(t, img, map[uint64][]byte{0: a, 8: b})

	// Two more restarts are allowed; the fourth death fails the device.
	for range 2 {
		kill()
		waitRestart()
	}
	kill()
	deadline := time.Now().Add(30 * time.Second)
	for d.dev.Failed() == nil {
		if time.Now().After(deadline) {
			t.Fatal("device did not fail once the restarts were spent")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := drv.rd(mmio.RegStatus); st&mmio.StatusDeviceNeedsRst == 0 {
		t.Errorf("status %#x lacks DEVICE_NEEDS_RESET", st)
	}
	if n := strings.Count(logs.String(), "plugin lost; restarting it"); n != 3 {
		t.Errorf("%d restart lines, want 3", n)
	}
	if !strings.Contains(logs.String(), "will not be restarted again") {
		t.Error("no line saying the device fails")
	}
}

var restartedPidRE = regexp.MustCompile(`plugin restarted; the device serves again: .*pid=([0-9]+)`)

// BenchmarkCoreRestart measures the pause a plugin's death costs the guest
// of `krun-core run`: from SIGKILL of the disk plugin to the completion of
// a request the driver posted right after the kill, served by the
// restarted plugin (detection, relaunch, reattach, resume). The plugin runs
// without the sandbox here (no trampoline next to a test binary; see
// BenchmarkServeRestart in cmd/krun-core for a sandboxed launch). Run it
// with -benchtime=20x; it reports the median and the worst.
func BenchmarkCoreRestart(b *testing.B) {
	r := newRestartRig(b, pluginhost.RestartPolicy{Max: 100000, Window: time.Second})
	drv := r.drv
	drv.post(0, 0, bytes.Repeat([]byte{1}, 512))
	drv.wait(1, 0, 10*time.Second)
	pid, used := r.pid, uint16(1)
	var took []time.Duration
	b.ResetTimer()
	for i := 1; i <= b.N; i++ {
		start := time.Now()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		drv.post(i%4, 8, bytes.Repeat([]byte{byte(i)}, 512))
		used++
		drv.wait(used, i%4, 30*time.Second)
		took = append(took, time.Since(start))
		deadline := time.Now().Add(30 * time.Second)
		for {
			m := restartedPidRE.FindAllStringSubmatch(r.logs.String(), -1)
			if len(m) >= i {
				pid, _ = strconv.Atoi(m[i-1][1])
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("restart %d not logged", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	b.StopTimer()
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "median-ms")
	b.ReportMetric(float64(took[len(took)-1].Microseconds())/1000, "worst-ms")
}

// TestRestartHungPlugin: a plugin that stops answering (SIGSTOP: its
// process lives, Health gets no answer) is killed and restarted like a
// dead one; a request posted to it completes through its successor.
func TestRestartHungPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin and waits for a Health timeout; skipped with -short")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{})
	stopProcess(t, r.pid)
	r.drv.post(0, 16, bytes.Repeat([]byte{0xc3}, 512))
	r.drv.wait(1, 0, pluginhost.HealthInterval+pluginhost.HealthTimeout+30*time.Second)
	// The request completes once the device resumes, which comes just
	// before the restart is logged: wait for the line, not only for it.
	deadline := time.Now().Add(10 * time.Second)
	log := r.logs.String()
	for !strings.Contains(log, "plugin restarted; the device serves again") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		log = r.logs.String()
	}
	if !strings.Contains(log, "plugin stopped answering (Health)") || !strings.Contains(log, "plugin restarted; the device serves again") {
		t.Fatalf("no restart for a hung plugin:\n%s", log)
	}
	if err := r.d.dev.Failed(); err != nil {
		t.Fatal(err)
	}
}

// TestRestartKillsBeforeBackoff: a plugin the core gives up on (here a
// back-end call found it gone while its process, stopped, still lives and
// maps guest memory) is killed before the restart's back-off delay, not
// after it: during the wait no old plugin may still write guest memory.
func TestRestartKillsBeforeBackoff(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{})
	old := r.d.plugin
	waited := make(chan error, 1)
	r.d.backoff = func(ctx context.Context, delay time.Duration) bool {
		select {
		case <-old.Done():
			waited <- nil
		case <-time.After(5 * time.Second):
			waited <- errors.New("the old plugin still runs while the restart waits")
		}
		return sleepCtx(ctx, delay)
	}
	stopProcess(t, r.pid)
	r.d.backendGone(errors.New("vhost-user call timed out"))
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatalf("no restart within a minute:\n%s", r.logs.String())
	}
	r.drv.post(0, 16, bytes.Repeat([]byte{0x5a}, 512))
	r.drv.wait(1, 0, 30*time.Second)
	if err := r.d.dev.Failed(); err != nil {
		t.Fatal(err)
	}
}

// TestEssentialDeviceFailureEndsRun: a device the guest cannot do without
// (with -- CMD the root share and the console, whose plugins are not
// restarted) that fails ends the VM with an error naming it, instead of
// leaving the command hanging on a dead file system. Here a disk stands
// in for the root share; another device's failure only fails it.
func TestEssentialDeviceFailureEndsRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	for _, tc := range []struct {
		essential, exited bool
	}{{true, false}, {false, false}, {true, true}} {
		essential := tc.essential && !tc.exited
		t.Run(fmt.Sprintf("essential=%v exited=%v", tc.essential, tc.exited), func(t *testing.T) {
			r := newRestartRig(t, pluginhost.RestartPolicy{Max: -1}, func(c *Context, s devspec.Spec) {
				if tc.essential {
					c.essential = map[devspec.Spec]string{s: "the test's root"}
				}
			})
			if tc.exited {
				// The command has reported its status: the guest is on
				// its way down, and a failure then ends nothing.
				r.m.status.exit.Store(1)
			}
			a := bytes.Repeat([]byte{0x5a}, 512)
			r.drv.post(0, 0, a)
			r.drv.wait(1, 0, 10*time.Second)
			select {
			case ev := <-r.m.events:
				t.Fatalf("the VM ended while its devices worked: %+v", ev)
			default:
			}
			if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(30 * time.Second)
			for r.d.dev.Failed() == nil {
				if time.Now().After(deadline) {
					t.Fatal("the device did not fail after its plugin died")
				}
				time.Sleep(10 * time.Millisecond)
			}
			select {
			case ev := <-r.m.events:
				if !essential {
					t.Fatalf("the VM ended (essential %v, command exited %v): %v", tc.essential, tc.exited, ev.err)
				}
				if !errors.Is(ev.err, ErrEssentialDevice) || !errors.Is(ev.err, mmio.ErrFailed) ||
					!strings.HasPrefix(ev.err.Error(), "the test's root failed; the guest cannot go on without it: ") {
					t.Fatalf("the VM ended with %q", ev.err)
				}
				t.Logf("ended with: %v", ev.err)
			case <-time.After(5 * time.Second):
				if essential {
					t.Fatal("the essential device failed and the VM went on")
				}
			}
		})
	}
}

// TestGuestBlkRing: the blk plugin takes rings up to 1024 (QEMU's
// queue-size=1024), but krun's own guests are offered 256, as before and as
// QEMU's own virtio-blk does (see guestBlkRing).
func TestGuestBlkRing(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a plugin; skipped with -short")
	}
	r := newRestartRig(t, pluginhost.RestartPolicy{Max: -1})
	if got := r.d.info.MaxQueueSize; got != 1024 {
		t.Fatalf("the blk plugin takes rings of up to %d, want 1024", got)
	}
	r.drv.reg(mmio.RegQueueSel, 0)
	if got := r.drv.rd(mmio.RegQueueNumMax); got != guestBlkRing {
		t.Fatalf("QueueNumMax %d, want %d", got, guestBlkRing)
	}
}
