package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The workloads of the blk suites (names from krun-bench blk).
var (
	rawBenchWorkloads = []string{"randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1",
		"randwrite-4k-qd32", "seqread-1m-qd4", "seqwrite-1m-qd4"}
	// On a fresh image every one of these writes allocates.
	qcow2AllocWorkloads = []string{"randwrite-4k-qd32", "seqwrite-1m-qd4"}
	// On a fully allocated image.
	qcow2FullWorkloads = []string{"randread-4k-qd32", "randwrite-4k-qd32", "seqwrite-1m-qd4"}
)

func mustWorkloads(names []string) []blkWorkload {
	w, err := selectWorkloads(strings.Join(names, ","))
	if err != nil {
		panic(err) // the lists above name existing workloads
	}
	return w
}

// rawImage returns the raw image of random data the blk suites share,
// writing it the first time.
func (e *benchEnv) rawImage() (string, error) {
	img := filepath.Join(e.cfg.Dir, "raw.img")
	if st, err := os.Stat(img); err == nil && st.Size() == e.cfg.Size {
		return img, nil
	}
	e.progress("writing %d MiB of random data to %s", e.cfg.Size>>20, img)
	if err := randomFile(img, e.cfg.Size); err != nil {
		return "", fmt.Errorf("raw image: %w", err)
	}
	return img, nil
}

func (e *benchEnv) blkRaw(ctx context.Context) ([]*benchFigure, error) {
	img, err := e.rawImage()
	if err != nil {
		return nil, err
	}
	work := mustWorkloads(rawBenchWorkloads)
	set := newFigureSet("blk-raw", sideQSD)
	sides := []string{sideKrun}
	if e.qsd != "" {
		sides = append(sides, sideQSD)
	}
	if e.fio != "" {
		sides = append(sides, sideFio)
	}
	for r := range e.cfg.Rounds {
		load := e.sampleLoad()
		for _, side := range order(sides, r) {
			if err := warm(img); err != nil {
				return nil, err
			}
			var res []blkResult
			if side == sideFio {
				res, err = e.fioRun(ctx, img, work)
				if err != nil {
					e.note("fio failed, its column is empty: %v", err)
					sides = removeSide(sides, sideFio)
					continue
				}
			} else if res, err = e.serveAndBench(ctx, side, img, "raw", work); err != nil {
				return nil, fmt.Errorf("%s: %w", side, err)
			}
			for _, x := range res {
				set.add(x.Workload, "IOPS", true, side, x.IOPS, x.ServerCPUus)
			}
		}
		e.progress("blk-raw: round %d of %d done (load %.2f)", r+1, e.cfg.Rounds, load)
	}
	return set.list, nil
}

func removeSide(sides []string, side string) []string {
	var out []string
	for _, s := range sides {
		if s != side {
			out = append(out, s)
		}
	}
	return out
}

func (e *benchEnv) blkQcow2(ctx context.Context) ([]*benchFigure, error) {
	raw, err := e.rawImage()
	if err != nil {
		return nil, err
	}
	full := filepath.Join(e.cfg.Dir, "full.qcow2")
	e.progress("converting %s to a fully allocated qcow2 image", raw)
	if err := e.qcow2Convert(raw, full); err != nil {
		return nil, err
	}
	fresh := filepath.Join(e.cfg.Dir, "fresh.qcow2")
	set := newFigureSet("blk-qcow2", sideQSD)
	sides := []string{sideKrun}
	if e.qsd != "" {
		sides = append(sides, sideQSD)
	}
	for r := range e.cfg.Rounds {
		load := e.sampleLoad()
		for _, side := range order(sides, r) {
			for _, w := range mustWorkloads(qcow2AllocWorkloads) {
				if err := e.qcow2Create(fresh, e.cfg.Size); err != nil {
					return nil, err
				}
				res, err := e.serveAndBench(ctx, side, fresh, "qcow2", []blkWorkload{w})
				if err != nil {
					return nil, fmt.Errorf("%s: %w", side, err)
				}
				for _, x := range res {
					set.add("alloc "+x.Workload, "IOPS", true, side, x.IOPS, x.ServerCPUus)
				}
			}
			if err := warm(full); err != nil {
				return nil, err
			}
			res, err := e.serveAndBench(ctx, side, full, "qcow2", mustWorkloads(qcow2FullWorkloads))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", side, err)
			}
			for _, x := range res {
				set.add(x.Workload, "IOPS", true, side, x.IOPS, x.ServerCPUus)
			}
		}
		e.progress("blk-qcow2: round %d of %d done (load %.2f)", r+1, e.cfg.Rounds, load)
	}
	os.Remove(fresh)
	return set.list, nil
}

// qemuEscape doubles commas, as QEMU option values need.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// serveAndBench starts one side's vhost-user-blk back-end on img, runs the
// workloads with the test guest and stops it.
func (e *benchEnv) serveAndBench(ctx context.Context, side, img, format string, work []blkWorkload) ([]blkResult, error) {
	sock := e.sockPath("blk.sock")
	var argv []string
	switch side {
	case sideKrun:
		argv = []string{e.cfg.Self, "serve", "--socket", sock, "--disk", "path=" + img + ",format=" + format}
	case sideQSD:
		argv = []string{e.qsd,
			"--blockdev", "driver=file,node-name=f0,filename=" + qemuEscape(img) + ",cache.direct=off,aio=threads",
			"--blockdev", "driver=" + format + ",node-name=d0,file=f0",
			"--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=" + qemuEscape(sock) + ",writable=on,num-queues=1"}
	default:
		return nil, fmt.Errorf("unknown side %s", side)
	}
	d, err := startDaemon(ctx, side, sock, argv...)
	if err != nil {
		return nil, err
	}
	defer d.stop()
	cfg := blkBenchConfig{Socket: sock, Duration: e.cfg.Seconds, Workloads: work, ServerCPU: d.cpuTime}
	// A daemon may create its socket a moment before it listens.
	for try := 0; ; try++ {
		res, err := runBlkBench(ctx, cfg)
		if err != nil && errors.Is(err, syscall.ECONNREFUSED) && try < 100 {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w (%s)", err, d.out.last())
		}
		return res, nil
	}
}

// fioRun runs each workload with fio on the file itself: psync at depth 1,
// io_uring deeper, buffered like the back-ends.
func (e *benchEnv) fioRun(ctx context.Context, img string, work []blkWorkload) ([]blkResult, error) {
	var out []blkResult
	for _, w := range work {
		rw := map[[2]bool]string{{false, true}: "randread", {true, true}: "randwrite",
			{false, false}: "read", {true, false}: "write"}[[2]bool{w.Write, w.Random}]
		engine := "io_uring"
		if w.Depth == 1 {
			engine = "psync"
		}
		args := []string{"--name=" + w.Name, "--filename=" + img, "--rw=" + rw,
			"--bs=" + strconv.Itoa(w.BlockSize), "--iodepth=" + strconv.Itoa(w.Depth), "--ioengine=" + engine,
			"--size=" + strconv.FormatInt(e.cfg.Size, 10), "--invalidate=0", "--norandommap", "--randrepeat=0",
			"--time_based", fmt.Sprintf("--runtime=%dms", e.cfg.Seconds.Milliseconds()),
			"--lat_percentiles=1", "--percentile_list=50:99", "--output-format=json"}
		cmd := exec.CommandContext(ctx, e.fio, args...)
		var stderr tailWriter
		cmd.Stderr = &stderr
		b, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("fio %s: %v: %s", w.Name, err, stderr.last())
		}
		r, err := parseFio(b, w)
		if err != nil {
			return nil, fmt.Errorf("fio %s: %w", w.Name, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// parseFio reads the one job of fio's JSON output.
func parseFio(b []byte, w blkWorkload) (blkResult, error) {
	// fio may print notes before the JSON document.
	if i := strings.IndexByte(string(b), '{'); i > 0 {
		b = b[i:]
	}
	type dir struct {
		IOPS  float64 `json:"iops"`
		Bytes float64 `json:"bw_bytes"`
		IOs   uint64  `json:"total_ios"`
		Lat   struct {
			Percentile map[string]float64 `json:"percentile"`
		} `json:"lat_ns"`
	}
	var doc struct {
		Jobs []struct {
			Read    dir     `json:"read"`
			Write   dir     `json:"write"`
			Runtime float64 `json:"job_runtime"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return blkResult{}, err
	}
	if len(doc.Jobs) != 1 {
		return blkResult{}, fmt.Errorf("%d jobs in the output, want 1", len(doc.Jobs))
	}
	j := doc.Jobs[0]
	d := j.Read
	if w.Write {
		d = j.Write
	}
	if d.IOPS <= 0 {
		return blkResult{}, errors.New("no I/O reported")
	}
	return blkResult{
		Workload: w.Name,
		Requests: int(d.IOs),
		Seconds:  j.Runtime / 1000,
		IOPS:     d.IOPS,
		MiBps:    d.Bytes / (1 << 20),
		P50us:    d.Lat.Percentile["50.000000"] / 1000,
		P99us:    d.Lat.Percentile["99.000000"] / 1000,
	}, nil
}
