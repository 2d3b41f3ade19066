package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
	"github.com/krun-core/krun-core/testguest"
)

// fsSeqFile is the size of the file the 1 MiB read and write workloads
// cycle through (in the page cache).
const fsSeqFile = 64 << 20

// fsSuite compares krun-core serve --fs (the sandboxed plugin) with the C
// virtiofsd, driving both with the same Go FUSE client over virtqueues:
// one request in flight, waited for by the requesting goroutine itself
// (fuseclient.NewSyncRing: a reaper goroutine's hand-off would add more
// to each round trip than the back-ends differ by), requests and replies
// scattered over 4 KiB descriptors as a guest's pages are (GETATTR: one
// descriptor each way).
func (e *benchEnv) fsSuite(ctx context.Context) ([]*benchFigure, error) {
	set := newFigureSet("fs", sideVFSD)
	sides := []string{sideKrun}
	if e.vfsd != "" {
		sides = append(sides, sideVFSD)
	}
	for r := range e.cfg.Rounds {
		load := e.sampleLoad()
		for _, side := range order(sides, r) {
			if err := e.fsRound(ctx, side, set); err != nil {
				return nil, fmt.Errorf("%s: %w", side, err)
			}
		}
		e.progress("fs: round %d of %d done (load %.2f)", r+1, e.cfg.Rounds, load)
	}
	return set.list, nil
}

// fsShare makes a fresh shared directory with a 64 MiB file in it, owned
// by the caller: a root krun-core hands it to its plugin as an ID-mapped
// mount, so the plugin's user owns what the caller owns.
func (e *benchEnv) fsShare(side string) (string, error) {
	dir := filepath.Join(e.cfg.Dir, "share-"+side)
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", err
	}
	buf := make([]byte, fsSeqFile)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	data := filepath.Join(dir, "data")
	if err := os.WriteFile(data, buf, 0o644); err != nil {
		return "", err
	}
	return dir, nil
}

func (e *benchEnv) fsRound(ctx context.Context, side string, set *figureSet) error {
	dir, err := e.fsShare(side)
	if err != nil {
		return fmt.Errorf("shared directory: %w", err)
	}
	defer os.RemoveAll(dir)
	sock := e.sockPath("fs.sock")
	var d *daemon
	switch side {
	case sideKrun:
		d, err = startDaemon(ctx, side, sock, e.cfg.Self, "serve", "--socket", sock, "--fs", "path="+dir+",tag=bench")
	case sideVFSD:
		d, err = startDaemon(ctx, side, sock, e.vfsd, "--socket-path="+sock, "-o", "source="+dir, "-o", "cache=auto")
	}
	if err != nil {
		return err
	}
	defer d.stop()
	type work struct {
		name, unit string
		higher     bool
		run        func(g *fsGuest, until time.Time) (ops int, amount float64, err error)
	}
	works := []work{
		{"create+stat+unlink", "files/s", true, fsMeta},
		{"getattr", "µs", false, fsGetattr},
		{"seqwrite-1m", "MiB/s", true, func(g *fsGuest, until time.Time) (int, float64, error) { return fsSeq(g, until, true) }},
		{"seqread-1m", "MiB/s", true, func(g *fsGuest, until time.Time) (int, float64, error) { return fsSeq(g, until, false) }},
	}
	// One connection for every workload: the C virtiofsd exits when its
	// front-end disconnects.
	g, err := dialFSGuest(sock, 4096)
	if err != nil {
		return fmt.Errorf("%w (%s)", err, d.out.last())
	}
	defer g.close()
	for _, w := range works {
		cpu0, err := d.cpuTime()
		if err != nil {
			return err
		}
		start := time.Now()
		ops, amount, err := w.run(g, start.Add(e.cfg.Seconds))
		el := time.Since(start)
		cpu1, cerr := d.cpuTime()
		if err != nil {
			return fmt.Errorf("%s: %w (%s)", w.name, err, d.out.last())
		}
		if err := errors.Join(ctx.Err(), cerr); err != nil {
			return err
		}
		if ops == 0 {
			return fmt.Errorf("%s: no operation completed", w.name)
		}
		v := amount / el.Seconds()
		if !w.higher {
			v = float64(el) / float64(time.Microsecond) / float64(ops)
		}
		set.add(w.name, w.unit, w.higher, side, v, float64(cpu1-cpu0)/float64(time.Microsecond)/float64(ops))
	}
	return nil
}

// fsGuest is the Go FUSE client on a virtio-fs back-end: the request queue
// and the hiprio queue (FORGET).
type fsGuest struct {
	g          *testguest.Guest
	rq, hq     *fuseclient.Ring
	req, prio  *fuseclient.Client
	maxRequest int // bytes of data in one READ or WRITE
}

func dialFSGuest(sock string, split int) (*fsGuest, error) {
	var g *testguest.Guest
	var err error
	for try := 0; ; try++ { // a daemon may create its socket before it listens
		g, err = testguest.Dial(sock, testguest.Options{NumQueues: 2, QueueSize: 128, MemSize: 64 << 20, EndWaitsOnHangup: true})
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || try >= 100 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	f := &fsGuest{g: g, rq: fuseclient.NewSyncRing(g.Mem, g.Rings[1], split), hq: fuseclient.NewSyncRing(g.Mem, g.Rings[0], split)}
	f.req, f.prio = fuseclient.New(f.rq), fuseclient.New(f.hq)
	init, err := f.req.Init(fuseclient.LinuxInitFlags)
	if err != nil {
		f.close()
		return nil, fmt.Errorf("FUSE INIT: %w", err)
	}
	f.maxRequest = int(init.MaxWrite)
	if init.MaxPages > 0 {
		f.maxRequest = min(f.maxRequest, int(init.MaxPages)*4096)
	}
	f.maxRequest = min(max(f.maxRequest, 4096), 1<<20)
	return f, nil
}

func (f *fsGuest) close() {
	f.rq.Close()
	f.hq.Close()
	f.g.Close()
}

// fsMeta creates, closes, stats, unlinks and forgets files; the amount is
// files.
func fsMeta(g *fsGuest, until time.Time) (int, float64, error) {
	n := 0
	for ; n == 0 || time.Now().Before(until); n++ {
		name := fmt.Sprintf("f%d", n)
		en, fh, err := g.req.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
		if err != nil {
			return n, 0, fmt.Errorf("CREATE: %w", err)
		}
		if err := g.req.Release(en.NodeID, fh, false); err != nil {
			return n, 0, fmt.Errorf("RELEASE: %w", err)
		}
		if _, err := g.req.Getattr(en.NodeID); err != nil {
			return n, 0, fmt.Errorf("GETATTR: %w", err)
		}
		if err := g.req.Unlink(fuse.RootID, name); err != nil {
			return n, 0, fmt.Errorf("UNLINK: %w", err)
		}
		if err := g.prio.Forget(en.NodeID, 1); err != nil {
			return n, 0, fmt.Errorf("FORGET: %w", err)
		}
	}
	return n, float64(n), nil
}

// fsGetattr is the round trip of the smallest request.
func fsGetattr(g *fsGuest, until time.Time) (int, float64, error) {
	n := 0
	for ; n == 0 || time.Now().Before(until); n++ {
		if _, err := g.req.Getattr(fuse.RootID); err != nil {
			return n, 0, fmt.Errorf("GETATTR: %w", err)
		}
	}
	return n, float64(n), nil
}

// fsSeq writes or reads the 64 MiB file 1 MiB at a time, in requests of
// the size the server negotiated; the amount is MiB.
func fsSeq(g *fsGuest, until time.Time, write bool) (int, float64, error) {
	en, err := g.req.Lookup(fuse.RootID, "data")
	if err != nil {
		return 0, 0, fmt.Errorf("LOOKUP: %w", err)
	}
	flags := uint32(unix.O_RDONLY)
	if write {
		flags = unix.O_RDWR
	}
	fh, err := g.req.Open(en.NodeID, flags)
	if err != nil {
		return 0, 0, fmt.Errorf("OPEN: %w", err)
	}
	buf := make([]byte, 1<<20)
	chunk := g.maxRequest
	n, off := 0, uint64(0)
	for ; n == 0 || time.Now().Before(until); n++ {
		if off+1<<20 > fsSeqFile {
			off = 0
		}
		for k := 0; k < 1<<20; k += chunk {
			c := min(chunk, 1<<20-k)
			if write {
				m, err := g.req.Write(en.NodeID, fh, off+uint64(k), buf[k:k+c])
				if err != nil || int(m) != c {
					return n, 0, fmt.Errorf("WRITE: %d bytes, %v", m, err)
				}
			} else {
				got, err := g.req.Read(en.NodeID, fh, off+uint64(k), uint32(c))
				if err != nil || len(got) != c {
					return n, 0, fmt.Errorf("READ: %d bytes, %v", len(got), err)
				}
			}
		}
		off += 1 << 20
	}
	if err := g.req.Release(en.NodeID, fh, false); err != nil {
		return n, 0, fmt.Errorf("RELEASE: %w", err)
	}
	return n, float64(n), nil
}
