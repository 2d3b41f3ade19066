package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/testguest"
)

const benchUsage = `usage: krun-bench blk --socket PATH [options]
       krun-bench net (--socket PATH | --passt) [options]
       krun-bench all [options]

Benchmarks a vhost-user back-end with the Go test guest:
  blk  fio-like workloads against a vhost-user-blk back-end (krun-core
       serve, qemu-storage-daemon, ...); the write workloads overwrite
       the disk
  net  a checked TCP echo stream through passt
  all  krun-core against qemu-storage-daemon, fio and the C virtiofsd
       (block, virtio-fs, start-up), in alternating rounds, one table

See krun-bench blk --help, krun-bench net --help and
krun-bench all --help; krun-bench --version prints its build.
`

// benchCommand is krun-bench: it benchmarks a vhost-user back-end with the
// Go test guest.
// buildVersion may be set at link time (-ldflags "-X
// main.buildVersion=..."), as the Makefile does for krun-core: a binary
// built from a source tree otherwise says "(devel)".
var buildVersion string

func benchCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "krun-bench: no command given (blk, net or all; see krun-bench --help)")
		return 1
	}
	switch args[0] {
	case "-h", "--help", "help":
		// help CMD is CMD's own page, as with krun-core help CMD.
		if args[0] == "help" && len(args) > 1 && slices.Contains([]string{"blk", "net", "all"}, args[1]) {
			return benchCommand([]string{args[1], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, benchUsage)
		return 0
	case "--version", "-version", "version":
		b := cli.ReadBuild()
		if buildVersion != "" {
			b.Version = buildVersion
		}
		fmt.Fprintf(stdout, "krun-bench %s, %s\n", b, runtime.Version())
		return 0
	case "blk":
		return benchBlk(args[1:], stdout, stderr)
	case "net":
		return benchNet(args[1:], stdout, stderr)
	case "all":
		return benchAll(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "krun-bench: unknown command %q (want blk, net or all; see krun-bench --help)\n", args[0])
	return 1
}

// blkWorkload is one fio-like job.
type blkWorkload struct {
	Name      string
	Write     bool
	Random    bool
	BlockSize int
	Depth     int
	// Probes is how many 4 KiB random reads are kept in flight beside
	// the workload's own requests, one at a time each: how long a read
	// waits behind a stream of other requests on the same queue. Their
	// latency is reported apart (blkResult.Probe*).
	Probes int
}

var blkWorkloads = []blkWorkload{
	{"randread-4k-qd1", false, true, 4 << 10, 1, 0},
	{"randread-4k-qd32", false, true, 4 << 10, 32, 0},
	{"randwrite-4k-qd1", true, true, 4 << 10, 1, 0},
	{"randwrite-4k-qd32", true, true, 4 << 10, 32, 0},
	{"seqread-1m-qd4", false, false, 1 << 20, 4, 0},
	{"seqwrite-1m-qd4", true, false, 1 << 20, 4, 0},
	// On an empty qcow2 image every write allocates clusters.
	{"seqwrite-64k-qd1", true, false, 64 << 10, 1, 0},
	// A read behind 1 MiB writes on one queue.
	{"seqwrite-1m-qd4+randread-4k-qd1", true, false, 1 << 20, 4, 1},
}

// blkResult is what one workload measured.
type blkResult struct {
	Workload string  `json:"workload"`
	Requests int     `json:"requests"`
	Seconds  float64 `json:"seconds"`
	IOPS     float64 `json:"iops"`
	MiBps    float64 `json:"mib_per_s"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	// ServerCPUus is the CPU time (user + system) the back-end's
	// processes spent per request, when the caller could sample it
	// (krun-bench all); 0 otherwise.
	ServerCPUus float64 `json:"server_cpu_us_per_request,omitempty"`
	// PerWakeup is how many completions the test guest found per wake-up
	// (interrupt): how well the back-end batches its notifications.
	PerWakeup float64 `json:"completions_per_wakeup"`
	// ProbeReads, ProbeP50us and ProbeP99us are the count and latency of
	// the workload's probe reads (blkWorkload.Probes), which Requests,
	// IOPS and the other figures leave out.
	ProbeReads int     `json:"probe_reads,omitempty"`
	ProbeP50us float64 `json:"probe_p50_us,omitempty"`
	ProbeP99us float64 `json:"probe_p99_us,omitempty"`
}

const benchBlkUsage = `usage: krun-bench blk --socket PATH [options]

Drives a vhost-user-blk back-end (krun-core serve, qemu-storage-daemon, ...)
with the Go test guest: each workload runs for --seconds on request queue 0
and reports IOPS, throughput and latency percentiles. The write workloads
overwrite the disk. A back-end that completes no request for 30 s ends the
run with one line (exit 1).`

func benchBlk(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlags("krun-bench blk", benchBlkUsage)
	socket := fs.String("socket", "", "unix socket `PATH` of the vhost-user-blk back-end (required)")
	seconds := fs.Float64("seconds", 5, "run time of each workload in seconds (`N`)")
	size := fs.String("size", "", "span of the disk the workloads use, from offset 0 (`SIZE`, e.g. 1G; default: the whole disk)")
	readOnly := fs.Bool("read-only", false, "run only the read workloads (also implied by a read-only device)")
	only := fs.String("workloads", "", "comma-separated workloads to run (`LIST`; default: all): "+workloadNames())
	output := cli.OutputFlag(fs.FlagSet)
	if rc, done := fs.ParseArgs(args, stdout, stderr); done {
		return rc
	}
	fail := func(format string, a ...any) int { return fs.Failf(stderr, format, a...) }
	if fs.NArg() != 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *socket == "" {
		return fail("--socket is required")
	}
	if !(*seconds > 0 && *seconds <= 3600) {
		return fail("--seconds must be in (0, 3600]")
	}
	if err := cli.CheckOutput(*output); err != nil {
		return fail("%v", err)
	}
	if _, err := fs.Logger(stderr); err != nil {
		return fail("%v", err)
	}
	var span uint64
	if *size != "" {
		n, err := devspec.ParseSize(*size)
		if err != nil {
			return fail("--size: %v", err)
		}
		span = uint64(n)
	}
	work, err := selectWorkloads(*only)
	if err != nil {
		return fail("%v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	results, err := runBlkBench(ctx, blkBenchConfig{
		Socket:    *socket,
		Duration:  time.Duration(*seconds * float64(time.Second)),
		Span:      span,
		ReadOnly:  *readOnly,
		Workloads: work,
		Progress:  stderr,
	})
	if err != nil {
		return fail("%v", err)
	}
	if err := cli.Report(stdout, *output, results, func(w io.Writer) { printBlkResults(w, results) }); err != nil {
		return fail("%v", err)
	}
	return 0
}

// nameWidth is the longest workload name's length, for aligned progress
// lines.
var nameWidth = func() int {
	n := 0
	for _, w := range blkWorkloads {
		n = max(n, len(w.Name))
	}
	return n
}()

func workloadNames() string {
	var names []string
	for _, w := range blkWorkloads {
		names = append(names, w.Name)
	}
	return strings.Join(names, ",")
}

func selectWorkloads(list string) ([]blkWorkload, error) {
	if list == "" {
		return blkWorkloads, nil
	}
	var out []blkWorkload
	for _, name := range strings.Split(list, ",") {
		i := slices.IndexFunc(blkWorkloads, func(w blkWorkload) bool { return w.Name == name })
		if i < 0 {
			return nil, fmt.Errorf("unknown workload %q (want some of %s)", name, workloadNames())
		}
		out = append(out, blkWorkloads[i])
	}
	return out, nil
}

func printBlkResults(w io.Writer, results []blkResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tIOPS\tMiB/s\tp50 µs\tp99 µs\tprobe reads\tprobe p50 µs\tprobe p99 µs\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%.0f\t%.1f\t%.1f\t%.1f\t", r.Workload, r.IOPS, r.MiBps, r.P50us, r.P99us)
		if r.ProbeReads > 0 {
			fmt.Fprintf(tw, "%d\t%.1f\t%.1f\t\n", r.ProbeReads, r.ProbeP50us, r.ProbeP99us)
		} else {
			fmt.Fprint(tw, "-\t-\t-\t\n")
		}
	}
	tw.Flush()
}

type blkBenchConfig struct {
	Socket    string
	Duration  time.Duration
	Span      uint64 // bytes; 0: whole disk
	ReadOnly  bool
	Workloads []blkWorkload
	Progress  io.Writer // one line per workload; nil for none
	// ServerCPU, if set, returns the CPU time the back-end has used so
	// far; it is sampled around each workload.
	ServerCPU func() (time.Duration, error)
}

// runBlkBench connects once and runs the workloads one after the other on
// request queue 0.
func runBlkBench(ctx context.Context, cfg blkBenchConfig) ([]blkResult, error) {
	maxData := 0
	maxDepth := 0
	for _, w := range cfg.Workloads {
		maxData = max(maxData, w.BlockSize*(w.Depth+w.Probes))
		maxDepth = max(maxDepth, w.Depth+w.Probes)
	}
	b, err := testguest.DialBlk(cfg.Socket, testguest.Options{
		// Room for every request's data plus one page of header and
		// status each, plus the rings.
		MemSize:   uint64(maxData) + uint64(maxDepth)*4096 + 8<<20,
		QueueSize: 256,
		// Direct descriptors: an indirect table per request would add
		// guest-side allocation to every measurement.
		NoIndirect: true,
		// A back-end that exits (a crash, a failed ring that restarts
		// the plugin and drops this connection) ends the run at once;
		// the stall watchdog is for one that lives on and stops.
		EndWaitsOnHangup: true,
	})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", cfg.Socket, err)
	}
	defer b.Close()
	capacity := b.Config.Capacity * testguest.SectorSize
	if capacity == 0 {
		return nil, errors.New("the back-end reports a zero capacity (or no config space)")
	}
	span := cfg.Span
	if span > capacity {
		// Clamping it silently measured a smaller span than asked for.
		return nil, fmt.Errorf("--size %d bytes is past the end of the disk (%d bytes)", span, capacity)
	}
	if span == 0 {
		span = capacity
	}
	ro := cfg.ReadOnly || b.Guest().Features()&testguest.BlkFRO != 0
	var results []blkResult
	for _, w := range cfg.Workloads {
		if w.Write && ro {
			continue
		}
		if span < uint64(w.BlockSize) {
			return nil, fmt.Errorf("%s: disk span %d bytes is smaller than one %d-byte block", w.Name, span, w.BlockSize)
		}
		var cpu0 time.Duration
		if cfg.ServerCPU != nil {
			if cpu0, err = cfg.ServerCPU(); err != nil {
				return results, fmt.Errorf("%s: back-end CPU time: %w", w.Name, err)
			}
		}
		r, err := runBlkWorkload(ctx, b, w, span, cfg.Duration)
		if err != nil {
			return results, fmt.Errorf("%s: %w", w.Name, err)
		}
		if cfg.ServerCPU != nil {
			cpu1, err := cfg.ServerCPU()
			if err != nil {
				return results, fmt.Errorf("%s: back-end CPU time: %w", w.Name, err)
			}
			if r.Requests > 0 {
				r.ServerCPUus = float64(cpu1-cpu0) / float64(time.Microsecond) / float64(r.Requests+r.ProbeReads)
			}
		}
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, "%-*s %9.0f IOPS %8.1f MiB/s  p50 %7.1f µs  p99 %7.1f µs", nameWidth, r.Workload, r.IOPS, r.MiBps, r.P50us, r.P99us)
			if r.ProbeReads > 0 {
				fmt.Fprintf(cfg.Progress, "  probe reads %d p50 %7.1f µs  p99 %7.1f µs", r.ProbeReads, r.ProbeP50us, r.ProbeP99us)
			}
			fmt.Fprintln(cfg.Progress)
		}
		results = append(results, r)
	}
	// Every workload asked for was a write on a read-only device: say so
	// rather than print an empty table and exit 0.
	if len(results) == 0 && len(cfg.Workloads) > 0 {
		why := "the device is read-only (VIRTIO_BLK_F_RO)"
		if cfg.ReadOnly {
			why = "--read-only was given"
		}
		return nil, fmt.Errorf("nothing to run: every workload asked for writes and %s", why)
	}
	return results, nil
}

// benchSlot is one request buffer in guest memory: header at addr, status
// at addr+16, data at addr+4096.
type benchSlot struct {
	addr  uint64
	mem   []byte
	start time.Time
}

const slotDataOff = 4096

// runBlkWorkload keeps w.Depth requests in flight for d, re-posting each one
// as it completes, and measures every request's latency from post to
// completion. Data is not copied on the guest side: requests read into and
// write from fixed guest buffers.
// blkStallTimeout is how long a workload waits for the next completion
// before it gives up on the back-end.
var blkStallTimeout = 30 * time.Second

// errStalled is the cause of a workload that stopped seeing completions.
var errStalled = errors.New("the back-end stopped answering")

// watchStall cancels ctx with errStalled once progress has not moved for
// limit. It returns when ctx is done.
func watchStall(ctx context.Context, cancel context.CancelCauseFunc, progress *atomic.Int64, limit time.Duration) {
	tick := time.NewTicker(max(limit/8, time.Millisecond))
	defer tick.Stop()
	last, since := progress.Load(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			if n := progress.Load(); n != last {
				last, since = n, now
			} else if now.Sub(since) >= limit {
				cancel(fmt.Errorf("%w: no request completed for %v (its log says why: a failed ring, a restarted plugin, which drops this connection)", errStalled, limit))
				return
			}
		}
	}
}

func runBlkWorkload(ctx context.Context, b *testguest.Blk, w blkWorkload, span uint64, d time.Duration) (blkResult, error) {
	// A back-end that stops completing requests (a ring it failed, a
	// plugin krun-core restarts) left the bench waiting forever, printing
	// nothing: give up with one line once nothing completes for
	// blkStallTimeout.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var progress atomic.Int64
	go watchStall(ctx, cancel, &progress, blkStallTimeout)
	g := b.Guest()
	ring := g.Rings[0]
	slots := make([]benchSlot, w.Depth+w.Probes)
	defer func() {
		for _, s := range slots {
			if s.addr != 0 {
				g.Mem.Free(s.addr)
			}
		}
	}()
	for i := range slots {
		n := uint64(slotDataOff + w.BlockSize)
		addr, err := g.Mem.Alloc(n, 4096)
		if err != nil {
			return blkResult{}, err
		}
		mem, err := g.Mem.Bytes(addr, n)
		if err != nil {
			return blkResult{}, err
		}
		for j := slotDataOff; j < len(mem); j++ {
			mem[j] = byte(j*7 + i)
		}
		slots[i] = benchSlot{addr: addr, mem: mem}
	}
	typ := uint32(testguest.BlkTIn)
	if w.Write {
		typ = testguest.BlkTOut
	}
	blocks := span / uint64(w.BlockSize)
	rng := rand.New(rand.NewPCG(0x6b72756e, uint64(w.BlockSize*w.Depth)))
	next := uint64(0)
	lat := make([]time.Duration, 0, 1<<16)
	var probeLat []time.Duration

	post := func(i int) error {
		s := &slots[i]
		var off uint64
		t, size, write := typ, w.BlockSize, w.Write
		switch {
		case i >= w.Depth: // a probe read
			t, size, write = testguest.BlkTIn, probeSize, false
			off = rng.Uint64N(span/probeSize) * probeSize
		case w.Random:
			off = rng.Uint64N(blocks) * uint64(w.BlockSize)
		default:
			off = next % blocks * uint64(w.BlockSize)
			next++
		}
		binary.LittleEndian.PutUint32(s.mem[0:], t)
		binary.LittleEndian.PutUint32(s.mem[4:], 0)
		binary.LittleEndian.PutUint64(s.mem[8:], off/testguest.SectorSize)
		s.mem[16] = 0xff
		segs := [3]testguest.Segment{
			{Addr: s.addr, Len: 16},
			{Addr: s.addr + slotDataOff, Len: uint32(size), Writable: !write},
			{Addr: s.addr + 16, Len: 1, Writable: true},
		}
		s.start = time.Now()
		_, err := ring.Post(segs[:], i)
		return err
	}

	for i := range slots {
		if err := post(i); err != nil {
			return blkResult{}, err
		}
	}
	done := make([]testguest.Completion, 0, len(slots)) // reused: no allocation per wait
	if _, err := ring.Kick(); err != nil {
		return blkResult{}, err
	}
	begin := time.Now()
	deadline := begin.Add(d)
	inflight := len(slots)
	wakeups := 0
	var end time.Time
	for inflight > 0 {
		var err error
		done, err = ring.WaitInto(ctx, done)
		if err != nil {
			if cause := context.Cause(ctx); errors.Is(cause, errStalled) {
				return blkResult{}, cause
			}
			if errors.Is(err, testguest.ErrBackendGone) {
				return blkResult{}, fmt.Errorf("%w, with %d requests in flight (its log says why)", testguest.ErrBackendGone, inflight)
			}
			return blkResult{}, err
		}
		progress.Add(1)
		wakeups++
		now := time.Now()
		posted := false
		for _, c := range done {
			i, ok := c.Token.(int)
			if !ok || i < 0 || i >= len(slots) {
				return blkResult{}, fmt.Errorf("device completed unknown descriptor %d", c.Head)
			}
			s := &slots[i]
			if st := s.mem[16]; st != testguest.BlkSOK {
				return blkResult{}, fmt.Errorf("request at sector %d failed with status %d", binary.LittleEndian.Uint64(s.mem[8:]), st)
			}
			if i >= w.Depth {
				probeLat = append(probeLat, now.Sub(s.start))
			} else {
				lat = append(lat, now.Sub(s.start))
				end = now
			}
			inflight--
			if now.Before(deadline) {
				if err := post(i); err != nil {
					return blkResult{}, err
				}
				inflight++
				posted = true
			}
		}
		if posted {
			if _, err := ring.Kick(); err != nil {
				return blkResult{}, err
			}
		}
	}
	elapsed := end.Sub(begin).Seconds()
	slices.Sort(lat)
	slices.Sort(probeLat)
	iops := float64(len(lat)) / elapsed
	return blkResult{
		Workload:   w.Name,
		Requests:   len(lat),
		Seconds:    elapsed,
		IOPS:       iops,
		MiBps:      iops * float64(w.BlockSize) / (1 << 20),
		P50us:      percentile(lat, 0.50),
		P99us:      percentile(lat, 0.99),
		PerWakeup:  float64(len(lat)+len(probeLat)) / float64(max(wakeups, 1)),
		ProbeReads: len(probeLat),
		ProbeP50us: percentile(probeLat, 0.50),
		ProbeP99us: percentile(probeLat, 0.99),
	}, nil
}

// probeSize is the size of a probe read (blkWorkload.Probes).
const probeSize = 4096

// percentile returns the p-th quantile (0..1) of sorted latencies in µs; 0
// when there are none.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i]) / float64(time.Microsecond)
}
