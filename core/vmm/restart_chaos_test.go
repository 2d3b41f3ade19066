package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/internal/blkstamp"
)

// The core chaos test's layout: slots spread over a 1 GiB disk, each in a
// cluster of its own (most first writes to a slot allocate in qcow2);
// requests of up to a slot; one ring of cqSize.
const (
	cqDisk       = 1 << 30
	cqBlock      = 4096
	cqSlotBlocks = 4
	cqSlots      = 2048
	cqStride     = cqDisk / cqSlots
	cqSize       = 64
	cqDepth      = 20 // chains of 3 descriptors
	cqKills      = 24
	cqDesc       = 0x10000
	cqAvail      = 0x11000
	cqUsed       = 0x12000
	cqBufs       = 0x100000 // slot i: header, status, data at cqBufs + i*cqBufSize
	cqBufSize    = 0x10000
)

func cqSector(blk int) uint64 {
	return uint64((blk/cqSlotBlocks)*cqStride+(blk%cqSlotBlocks)*cqBlock) / 512
}

type cqReq struct {
	id        uint64
	typ       uint32 // 0 IN, 1 OUT, 4 FLUSH
	blk, n    int
	gen       uint64
	want      []uint64
	snapshot  []uint64 // FLUSH: every block's generation at submission
	atKill    bool
	slot      int
	submitted time.Time
}

func (r *cqReq) String() string {
	age := time.Since(r.submitted).Round(time.Millisecond)
	switch r.typ {
	case 4:
		return fmt.Sprintf("#%d flush in slot %d (submitted %v ago)", r.id, r.slot, age)
	case 1:
		return fmt.Sprintf("#%d write of blocks %d+%d (sector %d) generation %d in slot %d (submitted %v ago)", r.id, r.blk, r.n, cqSector(r.blk), r.gen, r.slot, age)
	}
	return fmt.Sprintf("#%d read of blocks %d+%d (sector %d) in slot %d (submitted %v ago)", r.id, r.blk, r.n, cqSector(r.blk), r.slot, age)
}

// cqDriver is a virtio-mmio driver of one virtio-blk ring that keeps
// cqDepth requests of its own in flight (each in a fixed slot: head 3*slot)
// and polls the used ring, for the core's restart path without KVM.
type cqDriver struct {
	mem   *guestmem.Memory
	dev   *mmio.Device
	rng   *rand.Rand
	avail uint16
	used  uint16

	nextID   uint64
	slots    [cqDepth]*cqReq
	lastGen  []uint64
	busy     []bool
	sinceFl  int
	durable  func(snapshot []uint64) error
	killMark chan struct{} // a kill happened: mark the flushes in flight
	stats    struct{ writes, reads, flushes, flushesAtKill, durableChecks int }
}

func (d *cqDriver) reg(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.dev.Write(off, b[:])
}

func (d *cqDriver) start() error {
	if st := startQueue0(d.dev, cqSize, cqDesc, cqAvail, cqUsed); st&mmio.StatusDriverOK == 0 {
		return fmt.Errorf("device status %#x", st)
	}
	return nil
}

func (d *cqDriver) desc(j uint16, addr uint64, n uint32, flags, next uint16) error {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	return d.mem.Write(guestmem.Addr(cqDesc+uint64(j)*16), b[:])
}

// post puts a new request in the free slot s (not yet published).
func (d *cqDriver) post(s int) error {
	r := &cqReq{typ: 1, slot: s}
	switch {
	case d.sinceFl >= 12:
		r.typ = 4
		r.snapshot = append([]uint64(nil), d.lastGen...)
	case d.rng.Intn(4) == 0:
		r.typ = 0
	}
	if r.typ != 4 {
		var err error
		if r.blk, r.n, err = blkstamp.FreeRange(d.rng.Intn, d.busy, cqSlots, cqSlotBlocks); err != nil {
			return err
		}
	}
	d.nextID++
	r.id = d.nextID
	base := uint64(cqBufs + s*cqBufSize)
	hdr := make([]byte, 16)
	binary.LittleEndian.PutUint32(hdr, r.typ)
	if r.typ != 4 {
		binary.LittleEndian.PutUint64(hdr[8:], cqSector(r.blk))
	}
	if err := d.mem.Write(guestmem.Addr(base), hdr); err != nil {
		return err
	}
	if err := d.mem.Write(guestmem.Addr(base+0x100), []byte{0xff}); err != nil {
		return err
	}
	h := uint16(3 * s)
	data := make([]byte, r.n*cqBlock)
	switch r.typ {
	case 1:
		r.gen = r.id
		for i := 0; i < r.n; i++ {
			blkstamp.Stamp(data[i*cqBlock:(i+1)*cqBlock], cqSector(r.blk+i), r.gen)
		}
	case 0:
		for i := 0; i < r.n; i++ {
			r.want = append(r.want, d.lastGen[r.blk+i])
		}
	}
	if err := d.mem.Write(guestmem.Addr(base+0x1000), data); err != nil { // zeros before a read
		return err
	}
	var err error
	if r.typ == 4 {
		err = errors.Join(d.desc(h, base, 16, 1, h+2), d.desc(h+2, base+0x100, 1, 2, 0))
	} else {
		flags := uint16(1)
		if r.typ == 0 {
			flags |= 2
		}
		err = errors.Join(d.desc(h, base, 16, 1, h+1), d.desc(h+1, base+0x1000, uint32(len(data)), flags, h+2),
			d.desc(h+2, base+0x100, 1, 2, 0))
	}
	if err != nil {
		return err
	}
	var e [2]byte
	binary.LittleEndian.PutUint16(e[:], h)
	if err := d.mem.Write(guestmem.Addr(cqAvail+4+2*uint64(d.avail%cqSize)), e[:]); err != nil {
		return err
	}
	d.avail++
	r.submitted = time.Now()
	for i := r.blk; i < r.blk+r.n; i++ {
		d.busy[i] = true
	}
	d.slots[s] = r
	if r.typ == 4 {
		d.sinceFl = 0
	} else {
		d.sinceFl++
	}
	return nil
}

// complete checks the used element (head, n).
func (d *cqDriver) complete(head, n uint32) error {
	s := int(head / 3)
	if head%3 != 0 || s >= cqDepth || d.slots[s] == nil {
		return fmt.Errorf("device completed descriptor %d that is not in flight (%s)", head, d.outstanding())
	}
	r := d.slots[s]
	d.slots[s] = nil
	for i := r.blk; i < r.blk+r.n; i++ {
		d.busy[i] = false
	}
	base := uint64(cqBufs + s*cqBufSize)
	st := make([]byte, 1)
	if err := d.mem.Read(guestmem.Addr(base+0x100), st); err != nil {
		return err
	}
	if st[0] != 0 {
		return fmt.Errorf("request %v completed with status %d (0xff: the device never wrote it)", r, st[0])
	}
	switch r.typ {
	case 1:
		d.stats.writes++
		for i := r.blk; i < r.blk+r.n; i++ {
			d.lastGen[i] = r.gen
		}
	case 0:
		d.stats.reads++
		if want := uint32(r.n*cqBlock + 1); n != want {
			return fmt.Errorf("read %v: used length %d, want %d", r, n, want)
		}
		data := make([]byte, r.n*cqBlock)
		if err := d.mem.Read(guestmem.Addr(base+0x1000), data); err != nil {
			return err
		}
		for i := 0; i < r.n; i++ {
			gen, err := blkstamp.Gen(data[i*cqBlock:(i+1)*cqBlock], cqSector(r.blk+i))
			if err != nil {
				return fmt.Errorf("read %v: %w", r, err)
			}
			if gen != r.want[i] {
				return fmt.Errorf("read %v: block %d holds generation %d, want %d", r, r.blk+i, gen, r.want[i])
			}
		}
	case 4:
		d.stats.flushes++
		if r.atKill {
			d.stats.flushesAtKill++
			if d.durable != nil && d.stats.durableChecks < 8 {
				d.stats.durableChecks++
				if err := d.durable(r.snapshot); err != nil {
					return fmt.Errorf("flush %v in flight at a kill completed before the data was in the image: %w", r, err)
				}
			}
		}
	}
	return nil
}

func (d *cqDriver) outstanding() string {
	var rs []*cqReq
	for _, r := range d.slots {
		if r != nil {
			rs = append(rs, r)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].id < rs[j].id })
	var s []string
	for _, r := range rs {
		s = append(s, r.String())
	}
	return fmt.Sprintf("%d outstanding (avail index %d, used index %d): %s", len(rs), d.avail, d.used, strings.Join(s, "; "))
}

// run keeps the ring full until stop is closed, then lets it drain; it
// fails with what is outstanding when no completion comes for stall.
func (d *cqDriver) run(stop <-chan struct{}, stall time.Duration) error {
	stopping, last := false, time.Now()
	for {
		select {
		case <-stop:
			stopping = true
		case <-d.killMark:
			for _, r := range d.slots {
				if r != nil && r.typ == 4 {
					r.atKill = true
				}
			}
		default:
		}
		posted, inflight := 0, 0
		for s := range d.slots {
			if d.slots[s] == nil && !stopping {
				if err := d.post(s); err != nil {
					return err
				}
				posted++
			}
			if d.slots[s] != nil {
				inflight++
			}
		}
		if posted > 0 {
			// One 16-bit store, as a driver makes: Write copies byte
			// by byte, and a back-end could read half of it.
			if err := d.mem.Store16(guestmem.Addr(cqAvail+2), d.avail); err != nil {
				return err
			}
			d.reg(mmio.RegQueueNotify, 0)
		}
		if stopping && inflight == 0 {
			return nil
		}
		// One 16-bit load: Read copies byte by byte and, racing the
		// back-end's store of 0x4d00 over 0x4cff, can return 0x4dff.
		usedIdx, err := d.mem.Load16(guestmem.Addr(cqUsed + 2))
		if err != nil {
			return err
		}
		if usedIdx == d.used {
			if err := d.dev.Failed(); err != nil {
				return fmt.Errorf("the device failed: %v; %s", err, d.outstanding())
			}
			if time.Since(last) > stall {
				return fmt.Errorf("no completion for %v: %s", stall, d.outstanding())
			}
			time.Sleep(200 * time.Microsecond)
			continue
		}
		if uint16(usedIdx-d.used) > cqDepth {
			return fmt.Errorf("used index went from %d to %d, more than the %d in flight: %s", d.used, usedIdx, cqDepth, d.outstanding())
		}
		last = time.Now()
		for ; d.used != usedIdx; d.used++ {
			var e [8]byte
			if err := d.mem.Read(guestmem.Addr(cqUsed+4+8*uint64(d.used%cqSize)), e[:]); err != nil {
				return err
			}
			if err := d.complete(binary.LittleEndian.Uint32(e[0:]), binary.LittleEndian.Uint32(e[4:])); err != nil {
				return err
			}
		}
	}
}

// pluginChildren returns the pids of this process's children that run a
// krun plugin.
func pluginChildren() []int {
	var pids []int
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, w := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(w)
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if strings.HasPrefix(string(comm), "krun-plugin") {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// TestRestartChaos runs the core's restart path (virtio-mmio transport
// suspended, plugin relaunched, Resume, replay from the inflight region)
// under chaos without KVM: a driver keeps 20 stamped writes (sector and
// generation in every sector), reads that check what they find, and
// FLUSH requests in flight on a raw and a qcow2 disk while the plugin is
// killed (SIGKILL) every 50-300 ms, a third of the time again while its
// successor starts, handshakes or replays. No request may fail, complete
// twice or never; a FLUSH in flight at a kill completes only once what was
// written before it is in the image; at the end the image holds every
// block's last generation and qemu-img check finds no corruption in the
// qcow2 one (leaked clusters are allowed).
func TestRestartChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("builds plugins; skipped with -short")
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	for i, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			seed := time.Now().UnixNano() + int64(i)
			t.Logf("seed %d", seed)
			restartChaos(t, format, seed)
		})
	}
}

func restartChaos(t *testing.T, format string, seed int64) {
	start := time.Now()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk."+format)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", format, img, strconv.Itoa(cqDisk)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	r := newRestartRigDisk(t, dir, "../../plugins/blk-"+format, "krun-plugin-blk-"+format, img, format,
		pluginhost.RestartPolicy{Max: 10000, Window: 10 * time.Second})
	blocks := cqSlots * cqSlotBlocks
	d := &cqDriver{
		mem: r.m.mem, dev: r.d.dev, rng: rand.New(rand.NewSource(seed)),
		lastGen: make([]uint64, blocks), busy: make([]bool, blocks), killMark: make(chan struct{}, 64),
	}
	d.durable = func(snapshot []uint64) error {
		im, err := blkstamp.OpenImage(dir, img, format)
		if err != nil {
			return err
		}
		defer im.Close()
		for blk, want := range snapshot {
			if want == 0 {
				continue
			}
			gen, err := im.Gen(cqSector(blk), cqBlock)
			if err != nil {
				return fmt.Errorf("block %d: %w", blk, err)
			}
			if gen < want {
				return fmt.Errorf("block %d holds generation %d, older than %d", blk, gen, want)
			}
		}
		return nil
	}
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	driverErr := make(chan error, 1)
	go func() { driverErr <- d.run(stop, 20*time.Second) }()

	krng := rand.New(rand.NewSource(seed + 1))
	killed := map[int]bool{}
	kill := func(pid int) {
		killed[pid] = true
		select {
		case d.killMark <- struct{}{}:
		default:
		}
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// current waits for a plugin that the log says serves and that was
	// not killed.
	current := func() (int, error) {
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			pid := r.pid
			if m := restartedPidRE.FindAllStringSubmatch(r.logs.String(), -1); len(m) > 0 {
				pid, _ = strconv.Atoi(m[len(m)-1][1])
			}
			if !killed[pid] {
				return pid, nil
			}
			if err := r.d.dev.Failed(); err != nil {
				return 0, fmt.Errorf("the device failed: %w", err)
			}
			time.Sleep(time.Millisecond)
		}
		return 0, errors.New("no plugin serves again after 20 s")
	}
	kills, early := 0, 0
	var killErr error
	deadline := time.Now().Add(40 * time.Second)
	for kills < cqKills && time.Now().Before(deadline) && killErr == nil {
		time.Sleep(time.Duration(50+krng.Intn(250)) * time.Millisecond)
		select {
		case err := <-driverErr:
			driverErr <- err
			killErr = errors.New("the driver stopped")
			continue
		default:
		}
		pid, err := current()
		if err != nil {
			killErr = err
			continue
		}
		kill(pid)
		kills++
		if krng.Intn(3) != 0 {
			continue
		}
		// Kill the successor as soon as it runs, after 0-5 ms: while it
		// starts, while the core hands it the device, or while it
		// replays.
		delay := time.Duration(krng.Intn(5000)) * time.Microsecond
		for wait := time.Now().Add(5 * time.Second); time.Now().Before(wait); time.Sleep(100 * time.Microsecond) {
			next := 0
			for _, p := range pluginChildren() {
				if !killed[p] {
					next = p
				}
			}
			if next != 0 {
				time.Sleep(delay)
				kill(next)
				kills++
				early++
				break
			}
		}
	}
	close(stop)
	var derr error
	select {
	case derr = <-driverErr:
	case <-time.After(25 * time.Second):
		derr = errors.New("the driver did not finish")
	}
	if derr != nil {
		t.Fatalf("after %d kills: %v", kills, derr)
	}
	if killErr != nil {
		t.Fatalf("after %d kills: %v", kills, killErr)
	}
	if kills < cqKills {
		t.Fatalf("only %d kills in the time allowed", kills)
	}
	if err := r.d.dev.Failed(); err != nil {
		t.Fatalf("the device failed: %v", err)
	}
	t.Logf("%d kills (%d of a plugin just started), %d restarts; %d writes, %d reads, %d flushes (%d in flight at a kill, %d checked in the image)",
		kills, early, len(restartedPidRE.FindAllString(r.logs.String(), -1)), d.stats.writes, d.stats.reads, d.stats.flushes, d.stats.flushesAtKill, d.stats.durableChecks)

	// The image holds every block's last generation.
	if _, err := current(); err != nil {
		t.Fatal(err)
	}
	r.stop()
	r.m.shutdownDevices()
	im, err := blkstamp.OpenImage(dir, img, format)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	for blk := 0; blk < blocks; blk++ {
		gen, err := im.Gen(cqSector(blk), cqBlock)
		if err != nil || gen != d.lastGen[blk] {
			t.Fatalf("block %d of the image: generation %d (%v), want %d", blk, gen, err, d.lastGen[blk])
		}
	}
	if format == "qcow2" {
		out, err := exec.Command("qemu-img", "check", "-U", img).CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) { // 3: leaks only
			t.Fatalf("qemu-img check: %v\n%s", err, out)
		}
		leaks := "no leaks"
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "leaked clusters") {
				leaks = strings.TrimSpace(l)
			}
		}
		t.Logf("qemu-img check: no corruption; %s", leaks)
	}
	t.Logf("took %v", time.Since(start).Round(time.Millisecond))
}
