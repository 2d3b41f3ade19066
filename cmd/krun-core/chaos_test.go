package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/blkstamp"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// The chaos test's disk layout: slots spread over the disk, each in a
// cluster of its own, so that most first writes to a slot allocate.
const (
	chaosDiskSize    = 1 << 30
	chaosBlock       = 4096
	chaosSlotBlocks  = 8
	chaosSlots       = 2048
	chaosSlotStride  = chaosDiskSize / chaosSlots // bytes between slots
	chaosDepth       = 32                         // requests kept in flight
	chaosKills       = 24
	chaosFlushEvery  = 12 // one FLUSH among so many requests
	chaosReadPercent = 25
)

func chaosBlockSector(blk int) uint64 {
	slot, off := blk/chaosSlotBlocks, blk%chaosSlotBlocks
	return uint64(slot*chaosSlotStride+off*chaosBlock) / 512
}

// chaosReq is one request of the chaos driver.
type chaosReq struct {
	id        uint64
	typ       uint32
	blk, n    int      // first block and count (IN, OUT)
	gen       uint64   // OUT: the generation written
	want      []uint64 // IN: the generation of each block at submission
	snapshot  []uint64 // FLUSH: every block's generation at submission
	atKill    bool     // FLUSH: in flight when a plugin was killed
	ring      uint32
	buf       uint64
	submitted time.Time
}

func (r *chaosReq) String() string {
	kind := map[uint32]string{testguest.BlkTIn: "read", testguest.BlkTOut: "write", testguest.BlkTFlush: "flush"}[r.typ]
	if r.typ == testguest.BlkTFlush {
		return fmt.Sprintf("#%d flush ring %d (submitted %v ago)", r.id, r.ring, time.Since(r.submitted).Round(time.Millisecond))
	}
	return fmt.Sprintf("#%d %s ring %d blocks %d+%d sector %d gen %d (submitted %v ago)", r.id, kind, r.ring, r.blk, r.n,
		chaosBlockSector(r.blk), r.gen, time.Since(r.submitted).Round(time.Millisecond))
}

// chaosDriver keeps requests in flight on a guest's virtio-blk rings
// (chaosDepth in all), never two on the same block at once, and checks
// every completion.
type chaosDriver struct {
	g   *testguest.Guest
	rng *rand.Rand
	// durable checks the image file after a FLUSH in flight at a kill
	// completed: every block holds at least the generation it had when
	// the FLUSH was submitted.
	durable func(snapshot []uint64) error

	mu          sync.Mutex
	nextID      uint64
	lastGen     []uint64 // per block, the last write the driver saw complete
	busy        []bool
	outstanding map[uint64]*chaosReq
	completed   map[uint64]bool
	sinceFlush  int
	stats       struct{ writes, reads, flushes, flushesAtKill, durableChecks int }
}

const chaosDataOff = 4096

func (d *chaosDriver) post(ring *testguest.Ring) error {
	r := &chaosReq{typ: testguest.BlkTOut, ring: ring.Index()}
	switch {
	case d.sinceFlush >= chaosFlushEvery:
		r.typ = testguest.BlkTFlush
		r.snapshot = append([]uint64(nil), d.lastGen...)
	case d.rng.Intn(100) < chaosReadPercent:
		r.typ = testguest.BlkTIn
	}
	if r.typ != testguest.BlkTFlush {
		// A range within a slot that no request in flight touches.
		var err error
		if r.blk, r.n, err = blkstamp.FreeRange(d.rng.Intn, d.busy, chaosSlots, chaosSlotBlocks); err != nil {
			return err
		}
	}
	d.nextID++
	r.id = d.nextID
	size := uint64(chaosDataOff + r.n*chaosBlock)
	buf, err := d.g.Mem.Alloc(size, 4096)
	if err != nil {
		return err
	}
	mem, _ := d.g.Mem.Bytes(buf, size)
	clear(mem)
	binary.LittleEndian.PutUint32(mem[0:], r.typ)
	if r.typ != testguest.BlkTFlush {
		binary.LittleEndian.PutUint64(mem[8:], chaosBlockSector(r.blk))
	}
	mem[16] = 0xff // the status, which the device overwrites
	segs := []testguest.Segment{{Addr: buf, Len: 16}}
	switch r.typ {
	case testguest.BlkTOut:
		r.gen = r.id
		for i := 0; i < r.n; i++ {
			blkstamp.Stamp(mem[chaosDataOff+i*chaosBlock:chaosDataOff+(i+1)*chaosBlock], chaosBlockSector(r.blk+i), r.gen)
		}
		segs = append(segs, testguest.Segment{Addr: buf + chaosDataOff, Len: uint32(r.n * chaosBlock)})
	case testguest.BlkTIn:
		for i := 0; i < r.n; i++ {
			r.want = append(r.want, d.lastGen[r.blk+i])
		}
		segs = append(segs, testguest.Segment{Addr: buf + chaosDataOff, Len: uint32(r.n * chaosBlock), Writable: true})
	}
	segs = append(segs, testguest.Segment{Addr: buf + 16, Len: 1, Writable: true})
	if _, err := ring.Post(segs, r); err != nil {
		d.g.Mem.Free(buf)
		return err
	}
	r.buf, r.submitted = buf, time.Now()
	for i := r.blk; i < r.blk+r.n; i++ {
		d.busy[i] = true
	}
	d.outstanding[r.id] = r
	if r.typ == testguest.BlkTFlush {
		d.sinceFlush = 0
	} else {
		d.sinceFlush++
	}
	return nil
}

// complete checks one used element; an error is a defect.
func (d *chaosDriver) complete(c testguest.Completion) error {
	r, ok := c.Token.(*chaosReq)
	if !ok {
		return fmt.Errorf("device completed descriptor %d that is not in flight (%v)", c.Head, c.Token)
	}
	if d.completed[r.id] {
		return fmt.Errorf("request %v completed twice", r)
	}
	if d.outstanding[r.id] != r {
		return fmt.Errorf("request %v completed but not outstanding", r)
	}
	delete(d.outstanding, r.id)
	d.completed[r.id] = true
	size := uint64(chaosDataOff + r.n*chaosBlock)
	mem, _ := d.g.Mem.Bytes(r.buf, size)
	defer d.g.Mem.Free(r.buf)
	for i := r.blk; i < r.blk+r.n; i++ {
		d.busy[i] = false
	}
	if st := mem[16]; st != testguest.BlkSOK {
		return fmt.Errorf("request %v completed with status %d (0xff: the device never wrote it)", r, st)
	}
	switch r.typ {
	case testguest.BlkTOut:
		d.stats.writes++
		for i := r.blk; i < r.blk+r.n; i++ {
			d.lastGen[i] = r.gen
		}
	case testguest.BlkTIn:
		d.stats.reads++
		if want := uint32(r.n*chaosBlock + 1); c.Len != want {
			return fmt.Errorf("read %v: used length %d, want %d", r, c.Len, want)
		}
		for i := 0; i < r.n; i++ {
			p := mem[chaosDataOff+i*chaosBlock : chaosDataOff+(i+1)*chaosBlock]
			gen, err := blkstamp.Gen(p, chaosBlockSector(r.blk+i))
			if err != nil {
				return fmt.Errorf("read %v: %w", r, err)
			}
			if gen != r.want[i] {
				return fmt.Errorf("read %v: block %d holds generation %d, want %d", r, r.blk+i, gen, r.want[i])
			}
		}
	case testguest.BlkTFlush:
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

// markKill notes the FLUSH requests in flight when a plugin is killed.
func (d *chaosDriver) markKill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.outstanding {
		if r.typ == testguest.BlkTFlush {
			r.atKill = true
		}
	}
}

// outstandingList names the requests not completed, oldest first.
func (d *chaosDriver) outstandingList() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rs []*chaosReq
	for _, r := range d.outstanding {
		rs = append(rs, r)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].id < rs[j].id })
	var s []string
	for _, r := range rs {
		s = append(s, r.String())
	}
	return fmt.Sprintf("%d outstanding: %s", len(rs), strings.Join(s, "; "))
}

// run drives requests on ring until stop is closed, keeping depth in
// flight, then waits for the ones in flight; it fails with what is
// outstanding if no completion comes for stall.
func (d *chaosDriver) run(ring *testguest.Ring, depth int, stop <-chan struct{}, stall time.Duration) error {
	var stopping bool
	inflight := 0
	lastProgress := time.Now()
	for {
		select {
		case <-stop:
			stopping = true
		default:
		}
		d.mu.Lock()
		posted := 0
		for !stopping && inflight+posted < depth {
			if err := d.post(ring); err != nil {
				d.mu.Unlock()
				return err
			}
			posted++
		}
		inflight += posted
		d.mu.Unlock()
		if posted > 0 {
			if _, err := ring.Kick(); err != nil {
				return err
			}
		}
		if stopping && inflight == 0 {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		done, err := ring.Wait(ctx)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if len(done) == 0 {
			if time.Since(lastProgress) > stall {
				return fmt.Errorf("no completion for %v: %s", stall, d.outstandingList())
			}
			continue
		}
		lastProgress = time.Now()
		d.mu.Lock()
		for _, c := range done {
			if err := d.complete(c); err != nil {
				d.mu.Unlock()
				return err
			}
			inflight--
		}
		d.mu.Unlock()
	}
}

// pluginPids returns the pids of serve's plugins so far, first one first.
func pluginPids(s *serveProc) []int {
	var pids []int
	if m := pidRE.FindStringSubmatch(s.log()); m != nil {
		var pid int
		fmt.Sscan(m[1], &pid)
		pids = append(pids, pid)
	}
	return append(pids, restartedPids(s)...)
}

// waitPlugin waits for serve's n-th plugin (1: the first) and returns its
// pid.
func waitPlugin(s *serveProc, n int, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if p := pluginPids(s); len(p) >= n {
			return p[n-1], nil
		}
		select {
		case err := <-s.done:
			s.done <- err
			return 0, fmt.Errorf("serve exited: %v", err)
		default:
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, fmt.Errorf("no plugin %d after %v (%d so far)", n, timeout, len(pluginPids(s)))
}

// TestServeDiskRestartChaos writes stamped blocks (sector and generation
// in every sector) at depth through a disk that krun-core serve serves,
// mixed with reads that check what they find and FLUSH requests, while
// the plugin is killed (SIGKILL) every 50-300 ms, sometimes again while
// the guest reconnects to its successor or right after (while it
// replays). No request may fail, complete twice or never; every read
// finds the last generation written; a FLUSH in flight at a kill completes
// only once what was written before it is in the image file; the image
// holds the last generation of every block at the end; qemu-img check
// finds no corruption in a qcow2 image (leaked clusters are allowed: a
// killed plugin may leak the clusters of writes it never completed).
func TestServeDiskRestartChaos(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	tests := []chaosCase{
		{name: "raw", format: "raw", queues: 1},
		{name: "qcow2", format: "qcow2", queues: 2},
		{name: "qcow2-4k-clusters", format: "qcow2", create: []string{"-o", "cluster_size=4096"}, queues: 2, noEventIdx: true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.seed = time.Now().UnixNano() + int64(i)
			t.Logf("seed %d", tc.seed)
			chaosRun(t, bin, tc)
		})
	}
}

type chaosCase struct {
	name, format string
	create       []string // qemu-img create options
	queues       int
	noEventIdx   bool
	seed         int64
}

func chaosRun(t *testing.T, bin string, tc chaosCase) {
	start := time.Now()
	format := tc.format
	dir := t.TempDir()
	img := filepath.Join(dir, "disk."+format)
	args := append([]string{"create", "-f", format}, tc.create...)
	if out, err := exec.Command("qemu-img", append(args, img, fmt.Sprint(chaosDiskSize))...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "blk.sock")
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format="+format+",queues="+fmt.Sprint(tc.queues), "--plugin-restarts", "10000/10s")
	waitSocket(t, s, sock)
	if _, err := waitPlugin(s, 1, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Dial(sock, testguest.Options{
		Inflight: true, QueueSize: 128, MemSize: 48 << 20, NumQueues: tc.queues,
		Features: testguest.BlkFeatures, NoEventIdx: tc.noEventIdx,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	b, err := testguest.NewBlk(g, 0)
	if err != nil {
		t.Fatal(err)
	}
	blocks := chaosSlots * chaosSlotBlocks
	d := &chaosDriver{
		g: g, rng: rand.New(rand.NewSource(tc.seed)),
		lastGen: make([]uint64, blocks), busy: make([]bool, blocks),
		outstanding: map[uint64]*chaosReq{}, completed: map[uint64]bool{},
	}
	d.durable = func(snapshot []uint64) error {
		return chaosCheckImage(dir, img, format, func(blk int, gen uint64) error {
			if gen < snapshot[blk] {
				return fmt.Errorf("block %d holds generation %d, older than %d", blk, gen, snapshot[blk])
			}
			return nil
		})
	}

	stop := make(chan struct{})
	driverErr := make(chan error, tc.queues)
	for _, r := range g.Rings {
		go func() { driverErr <- d.run(r, chaosDepth/tc.queues, stop, 20*time.Second) }()
	}

	// The killer: kill the plugin every 50-300 ms; half of the time kill
	// its successor again before the guest reconnects, while it does, or
	// just after (while the plugin replays what was in flight).
	krng := rand.New(rand.NewSource(tc.seed + 1))
	kills, beforeHandshake, duringHandshake, duringReplay, n := 0, 0, 0, 0, 1
	reconnect := func() error {
		for {
			pid, err := waitPlugin(s, n, 20*time.Second)
			if err != nil {
				return err
			}
			mode := krng.Intn(6)
			if kills >= chaosKills+chaosKills/2 {
				mode = -1
			}
			if mode == 2 {
				// Before the guest connects: the new plugin is starting.
				d.markKill()
				syscall.Kill(pid, syscall.SIGKILL)
				kills++
				beforeHandshake++
				n++
				continue
			}
			c, err := frontend.Dial(sock)
			if err != nil {
				return fmt.Errorf("dial: %w", err)
			}
			var killed chan struct{}
			if mode == 0 {
				killed = make(chan struct{})
				delay := time.Duration(krng.Intn(800)) * time.Microsecond
				go func() {
					time.Sleep(delay)
					d.markKill()
					syscall.Kill(pid, syscall.SIGKILL)
					close(killed)
				}()
			}
			rerr := g.Reconnect(c)
			if killed != nil {
				<-killed
				kills++
				n++
				if rerr != nil {
					duringHandshake++
				} else {
					duringReplay++
				}
				continue
			}
			if rerr != nil {
				return fmt.Errorf("reconnect to plugin %d (pid %d): %w", n, pid, rerr)
			}
			if mode == 1 {
				time.Sleep(time.Duration(krng.Intn(2000)) * time.Microsecond)
				d.markKill()
				syscall.Kill(pid, syscall.SIGKILL)
				kills++
				duringReplay++
				n++
				continue
			}
			return nil
		}
	}
	deadline := time.Now().Add(25 * time.Second)
	var killErr error
	for kills < chaosKills && time.Now().Before(deadline) {
		time.Sleep(time.Duration(50+krng.Intn(250)) * time.Millisecond)
		select {
		case err := <-driverErr:
			driverErr <- err
			killErr = errors.New("the driver stopped")
		default:
		}
		if killErr != nil {
			break
		}
		pid, err := waitPlugin(s, n, time.Second)
		if err != nil {
			killErr = err
			break
		}
		d.markKill()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			killErr = fmt.Errorf("kill %d: %w", pid, err)
			break
		}
		kills++
		n++
		if killErr = reconnect(); killErr != nil {
			break
		}
	}
	close(stop)
	var derr error
	timeout := time.After(25 * time.Second)
	for range g.Rings {
		select {
		case err := <-driverErr:
			if derr == nil {
				derr = err
			}
		case <-timeout:
			derr = fmt.Errorf("driver did not finish: %s", d.outstandingList())
		}
		if derr != nil {
			break
		}
	}
	if derr != nil {
		t.Fatalf("after %d kills: %v", kills, derr)
	}
	if killErr != nil {
		t.Fatalf("after %d kills: %v (%s)", kills, killErr, d.outstandingList())
	}
	if kills < chaosKills {
		t.Fatalf("only %d kills in the time allowed", kills)
	}
	t.Logf("%d kills (%d before the guest reconnected, %d during a reconnection, %d during replay), %d plugins; %d writes, %d reads, %d flushes (%d in flight at a kill, %d checked in the image), %d requests resubmitted",
		kills, beforeHandshake, duringHandshake, duringReplay, n, d.stats.writes, d.stats.reads, d.stats.flushes, d.stats.flushesAtKill, d.stats.durableChecks, resubmitted(s.log()))

	// Every block reads back, through the last plugin, with the last
	// generation the driver saw written.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := make([]byte, chaosBlock*chaosSlotBlocks)
	for slot := 0; slot < chaosSlots; slot++ {
		blk := slot * chaosSlotBlocks
		if err := b.Read(ctx, chaosBlockSector(blk), p); err != nil {
			t.Fatalf("final read of slot %d: %v", slot, err)
		}
		for i := 0; i < chaosSlotBlocks; i++ {
			gen, err := blkstamp.Gen(p[i*chaosBlock:(i+1)*chaosBlock], chaosBlockSector(blk+i))
			if err != nil || gen != d.lastGen[blk+i] {
				t.Fatalf("final read of block %d: generation %d (%v), want %d", blk+i, gen, err, d.lastGen[blk+i])
			}
		}
	}
	g.Close()
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.waitExit(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	// And the image itself, read by QEMU.
	if err := chaosCheckImage(dir, img, format, func(blk int, gen uint64) error {
		if gen != d.lastGen[blk] {
			return fmt.Errorf("block %d holds generation %d, want %d", blk, gen, d.lastGen[blk])
		}
		return nil
	}); err != nil {
		t.Fatalf("image after serve exited: %v", err)
	}
	if format == "qcow2" {
		checkNoCorruption(t, img)
	}
	t.Logf("took %v", time.Since(start).Round(time.Millisecond))
}

// chaosCheckImage reads every block of the image file (qcow2 through
// qemu-img convert, sharing the image with the running plugin) and calls
// check with its generation.
func chaosCheckImage(dir, img, format string, check func(blk int, gen uint64) error) error {
	im, err := blkstamp.OpenImage(dir, img, format)
	if err != nil {
		return err
	}
	defer im.Close()
	for blk := 0; blk < chaosSlots*chaosSlotBlocks; blk++ {
		gen, err := im.Gen(chaosBlockSector(blk), chaosBlock)
		if err != nil {
			return fmt.Errorf("block %d: %w", blk, err)
		}
		if err := check(blk, gen); err != nil {
			return err
		}
	}
	return nil
}
