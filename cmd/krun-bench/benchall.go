package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/internal/cli"
)

const benchAllUsage = `usage: krun-bench all [options]

Runs the whole comparison in one command, on this machine:

  blk-raw    krun-core serve --disk format=raw against qemu-storage-daemon
             (same file, buffered, aio=threads) and fio on the bare file
             (psync at depth 1, io_uring deeper)
  blk-qcow2  krun-core serve --disk format=qcow2 against qemu-storage-daemon:
             writes that allocate (a fresh image per workload) and writes
             and reads on a fully allocated image
  fs         krun-core serve --fs (sandboxed plugin) against QEMU's C
             virtiofsd: create+stat+unlink, GETATTR round trip, 1 MiB
             writes and reads
  startup    exec to a listening socket: krun-core serve --disk against
             qemu-storage-daemon

The back-ends take turns within every round (their order rotates from
round to round), so slow phases of a shared machine hit all of them. The
table gives the median of each figure over the rounds and the median of
the per-round ratios: "vs ref" is krun-core's advantage over the C daemon
(above 1: krun-core is ahead; for latencies and start-up times the ratio
of the reference's time to krun-core's), "of fio" krun-core's share of
what fio reaches on the bare file. Block figures come from the same Go
test guest as krun-bench blk (queue 0, VIRTIO_BLK_F_FLUSH
negotiated, fixed buffers); "cpu/req" is the CPU time the back-end's
processes used per request. The write workloads overwrite the images in
the work directory, which is removed afterwards unless --dir names it.

A reference that is not installed (qemu-storage-daemon and qemu-img from
qemu-utils, fio, /usr/lib/qemu/virtiofsd from qemu-system-common, which
needs root) leaves its column empty; krun-core's own figures are still
measured.`

// benchSuites are the suites of bench all, in the order they run.
var benchSuites = []string{"blk-raw", "blk-qcow2", "fs", "startup"}

// Names of the sides of a comparison.
const (
	sideKrun = "krun-core"
	sideQSD  = "qemu-storage-daemon"
	sideFio  = "fio"
	sideVFSD = "virtiofsd"
)

const virtiofsdPath = "/usr/lib/qemu/virtiofsd"

type benchAllConfig struct {
	Rounds   int
	Seconds  time.Duration
	Size     int64
	Dir      string
	KeepDir  bool
	Suites   []string
	Starts   int
	Self     string // the krun-core binary measured
	Progress io.Writer
}

// benchFigure is one measured quantity and what each side got per round.
type benchFigure struct {
	Suite    string `json:"suite"`
	Workload string `json:"workload"`
	Unit     string `json:"unit"`
	// Higher: a larger value is better (throughput); otherwise a
	// latency or a time.
	Higher bool `json:"higher_is_better"`
	// Ref is the C daemon compared with: qemu-storage-daemon or virtiofsd.
	Ref string `json:"reference"`
	// Values per side, one per round (NaN-free: a failed round is left out
	// of every side).
	Values map[string][]float64 `json:"values"`
	// CPU per request per side (µs), one per round, blk suites only.
	CPU map[string][]float64 `json:"cpu_us_per_request,omitempty"`
	// Medians and ratios, filled by summarize.
	Median     map[string]float64 `json:"median"`
	CPUMedian  map[string]float64 `json:"cpu_us_per_request_median,omitempty"`
	VsRef      float64            `json:"krun_vs_reference,omitempty"`
	OfFio      float64            `json:"krun_of_fio,omitempty"`
	RefMissing bool               `json:"reference_missing,omitempty"`
}

type benchAllReport struct {
	Date    string         `json:"date"`
	Machine string         `json:"machine"`
	Rounds  int            `json:"rounds"`
	Seconds float64        `json:"seconds_per_workload"`
	Size    int64          `json:"image_bytes"`
	Dir     string         `json:"dir"`
	Load    [2]float64     `json:"load_average_1min_min_max"`
	Notes   []string       `json:"notes,omitempty"`
	Figures []*benchFigure `json:"figures"`
}

func benchAll(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlags("krun-bench all", benchAllUsage)
	rounds := fs.Int("rounds", 5, "rounds of every suite (`N`, 1 to 100)")
	seconds := fs.Float64("seconds", 2, "run time of each workload in each round, in seconds (`N`)")
	size := fs.String("size", "1G", "size of the disk images (`SIZE`, at least 16M)")
	dir := fs.String("dir", "", "work directory for images and sockets (`DIR`, kept; default: a new directory under $TMPDIR, removed)")
	suites := fs.String("suites", strings.Join(benchSuites, ","), "comma-separated suites to run (`LIST`): "+strings.Join(benchSuites, ","))
	starts := fs.Int("starts", 10, "start-ups of each side per round in the startup suite (`N`, 1 to 1000)")
	krunCore := fs.String("krun-core", "", "the krun-core binary to measure (`PATH`; default: krun-core next to krun-bench, whose plugins are next to it)")
	output := cli.OutputFlag(fs.FlagSet)
	if rc, done := fs.ParseArgs(args, stdout, stderr); done {
		return rc
	}
	fail := func(format string, a ...any) int { return fs.Failf(stderr, format, a...) }
	if fs.NArg() != 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if *rounds < 1 || *rounds > 100 {
		return fail("--rounds must be 1 to 100")
	}
	if !(*seconds > 0 && *seconds <= 600) {
		return fail("--seconds must be in (0, 600]")
	}
	if *starts < 1 || *starts > 1000 {
		return fail("--starts must be 1 to 1000")
	}
	if err := cli.CheckOutput(*output); err != nil {
		return fail("%v", err)
	}
	if _, err := fs.Logger(stderr); err != nil {
		return fail("%v", err)
	}
	n, err := devspec.ParseSize(*size)
	if err != nil || n < 16<<20 {
		return fail("--size %q: want a size of at least 16M, such as 1G", *size)
	}
	var which []string
	for _, s := range strings.Split(*suites, ",") {
		if !slices.Contains(benchSuites, s) {
			return fail("unknown suite %q (want some of %s)", s, strings.Join(benchSuites, ","))
		}
		if !slices.Contains(which, s) {
			which = append(which, s)
		}
	}
	self := *krunCore
	if self == "" {
		exe, err := os.Executable()
		if err != nil {
			return fail("find this executable: %v", err)
		}
		self = filepath.Join(filepath.Dir(exe), "krun-core")
	}
	if st, err := os.Stat(self); err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		return fail("krun-core binary %s: not an executable file (build it with make, or pass --krun-core PATH)", self)
	}
	if strings.ContainsAny(*dir, ",") {
		return fail("--dir %q: a comma cannot be passed in --disk and --fs options", *dir)
	}
	cfg := benchAllConfig{Rounds: *rounds, Seconds: time.Duration(*seconds * float64(time.Second)), Size: n,
		Dir: *dir, KeepDir: *dir != "", Suites: which, Starts: *starts, Self: self, Progress: stderr}
	if cfg.Dir == "" {
		if cfg.Dir, err = os.MkdirTemp("", "krun-bench-"); err != nil {
			return fail("work directory: %v", err)
		}
		defer os.RemoveAll(cfg.Dir)
	} else if st, err := os.Stat(cfg.Dir); err != nil {
		return fail("--dir: %v", err)
	} else if !st.IsDir() {
		return fail("--dir %s: not a directory", cfg.Dir)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	rep, err := runBenchAll(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	if err := cli.Report(stdout, *output, rep, func(w io.Writer) { printBenchAll(w, rep) }); err != nil {
		return fail("%v", err)
	}
	return 0
}

// benchEnv is what the suites share.
type benchEnv struct {
	cfg     benchAllConfig
	log     io.Writer
	qsd     string // paths of the reference tools, "" if missing
	qemuImg string
	fio     string
	vfsd    string
	sockDir string // the work directory, or a short one for long paths
	load    [2]float64
	notes   []string
}

func (e *benchEnv) note(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	if !slices.Contains(e.notes, msg) {
		e.notes = append(e.notes, msg)
		fmt.Fprintln(e.log, "note: "+msg)
	}
}

func (e *benchEnv) progress(format string, a ...any) {
	fmt.Fprintf(e.log, format+"\n", a...)
}

// sampleLoad records the 1-minute load average (min and max over the run).
func (e *benchEnv) sampleLoad() float64 {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return 0
	}
	l := float64(si.Loads[0]) / 65536
	if e.load == [2]float64{} {
		e.load = [2]float64{l, l}
	}
	e.load[0], e.load[1] = min(e.load[0], l), max(e.load[1], l)
	return l
}

func runBenchAll(ctx context.Context, cfg benchAllConfig) (*benchAllReport, error) {
	e := &benchEnv{cfg: cfg, log: cfg.Progress}
	if e.log == nil {
		e.log = io.Discard
	}
	e.sockDir = cfg.Dir
	if len(cfg.Dir) > 80 { // unix socket paths have 107 bytes
		d, err := os.MkdirTemp("", "kb")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		e.sockDir = d
	}
	look := func(name, pkg string) string {
		p, err := exec.LookPath(name)
		if err != nil {
			e.note("%s is not installed (%s): its column is empty", name, pkg)
			return ""
		}
		return p
	}
	e.qsd = look("qemu-storage-daemon", "Debian package qemu-utils")
	e.qemuImg = look("qemu-img", "Debian package qemu-utils")
	e.fio = look("fio", "Debian package fio")
	if slices.Contains(cfg.Suites, "fs") {
		switch st, err := os.Stat(virtiofsdPath); {
		case err != nil || st.Mode().Perm()&0o111 == 0:
			e.note("%s is not installed (Debian package qemu-system-common): the fs reference column is empty", virtiofsdPath)
		case os.Geteuid() != 0:
			e.note("the C virtiofsd needs root for its own sandbox: the fs reference column is empty")
		default:
			e.vfsd = virtiofsdPath
		}
	}
	rep := &benchAllReport{
		Date:    time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		Machine: machineLine(),
		Rounds:  cfg.Rounds,
		Seconds: cfg.Seconds.Seconds(),
		Size:    cfg.Size,
		Dir:     cfg.Dir,
	}
	e.sampleLoad()
	e.progress("krun-bench all: %s; %d rounds, %s per workload, images of %d MiB in %s",
		rep.Machine, cfg.Rounds, cfg.Seconds, cfg.Size>>20, cfg.Dir)
	for _, s := range cfg.Suites {
		var figs []*benchFigure
		var err error
		switch s {
		case "blk-raw":
			figs, err = e.blkRaw(ctx)
		case "blk-qcow2":
			figs, err = e.blkQcow2(ctx)
		case "fs":
			figs, err = e.fsSuite(ctx)
		case "startup":
			figs, err = e.startup(ctx)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
		rep.Figures = append(rep.Figures, figs...)
	}
	e.sampleLoad()
	for _, f := range rep.Figures {
		summarize(f)
	}
	rep.Load = e.load
	rep.Notes = e.notes
	return rep, nil
}

// machineLine names the machine: CPUs, model, memory, kernel.
func machineLine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	var si unix.Sysinfo_t
	mem := ""
	if unix.Sysinfo(&si) == nil {
		mem = fmt.Sprintf(", %d GiB", (uint64(si.Totalram)*uint64(si.Unit)+1<<29)>>30)
	}
	var un unix.Utsname
	kernel := ""
	if unix.Uname(&un) == nil {
		kernel = ", Linux " + unix.ByteSliceToString(un.Release[:])
	}
	return fmt.Sprintf("%d CPUs %s%s%s", runtime.NumCPU(), model, mem, kernel)
}

// order is the sides of round r, rotated so that no side always runs first.
func order(sides []string, r int) []string {
	out := make([]string, len(sides))
	for i := range sides {
		out[i] = sides[(i+r)%len(sides)]
	}
	return out
}

// figureSet collects the figures of a suite by workload.
type figureSet struct {
	suite, ref string
	byName     map[string]*benchFigure
	list       []*benchFigure
}

func newFigureSet(suite, ref string) *figureSet {
	return &figureSet{suite: suite, ref: ref, byName: map[string]*benchFigure{}}
}

func (s *figureSet) get(workload, unit string, higher bool) *benchFigure {
	if f, ok := s.byName[workload]; ok {
		return f
	}
	f := &benchFigure{Suite: s.suite, Workload: workload, Unit: unit, Higher: higher, Ref: s.ref,
		Values: map[string][]float64{}, CPU: map[string][]float64{}}
	s.byName[workload] = f
	s.list = append(s.list, f)
	return f
}

func (s *figureSet) add(workload, unit string, higher bool, side string, v, cpu float64) {
	f := s.get(workload, unit, higher)
	f.Values[side] = append(f.Values[side], v)
	if cpu > 0 {
		f.CPU[side] = append(f.CPU[side], cpu)
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// summarize computes medians and the medians of the per-round ratios
// (rounds pair up because the sides alternate within each round).
func summarize(f *benchFigure) {
	f.Median = map[string]float64{}
	for side, v := range f.Values {
		f.Median[side] = median(v)
	}
	if len(f.CPU) > 0 {
		f.CPUMedian = map[string]float64{}
		for side, v := range f.CPU {
			f.CPUMedian[side] = median(v)
		}
	} else {
		f.CPU = nil
	}
	ratio := func(other string) float64 {
		k, o := f.Values[sideKrun], f.Values[other]
		var rs []float64
		for i := 0; i < len(k) && i < len(o); i++ {
			if k[i] <= 0 || o[i] <= 0 {
				continue
			}
			if f.Higher {
				rs = append(rs, k[i]/o[i])
			} else {
				rs = append(rs, o[i]/k[i])
			}
		}
		return median(rs)
	}
	if _, ok := f.Values[f.Ref]; ok {
		f.VsRef = ratio(f.Ref)
	} else {
		f.RefMissing = true
	}
	if _, ok := f.Values[sideFio]; ok {
		f.OfFio = ratio(sideFio)
	}
}

func printBenchAll(w io.Writer, rep *benchAllReport) {
	fmt.Fprintf(w, "krun-bench all, %s\n", rep.Date)
	fmt.Fprintf(w, "machine: %s\n", rep.Machine)
	fmt.Fprintf(w, "%d rounds, %.3g s per workload, %d MiB images, load average %.2f to %.2f\n",
		rep.Rounds, rep.Seconds, rep.Size>>20, rep.Load[0], rep.Load[1])
	fmt.Fprintln(w, "medians over the rounds; vs ref and of fio: medians of the per-round ratios (krun-core's advantage)")
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "suite\tworkload\tunit\tkrun-core\treference\tref\tvs ref\tfio\tof fio\tcpu/req krun\tcpu/req ref\t")
	num := func(v float64) string {
		switch {
		case v == 0:
			return "-"
		case v >= 100:
			return strconv.FormatFloat(v, 'f', 0, 64)
		case v >= 10:
			return strconv.FormatFloat(v, 'f', 1, 64)
		}
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	for _, f := range rep.Figures {
		ref, vs, fio, of := "-", "-", "-", "-"
		if v, ok := f.Median[f.Ref]; ok {
			ref = num(v)
		}
		if f.VsRef > 0 {
			vs = fmt.Sprintf("%.2fx", f.VsRef)
		}
		if v, ok := f.Median[sideFio]; ok {
			fio = num(v)
		}
		if f.OfFio > 0 {
			of = fmt.Sprintf("%.0f%%", 100*f.OfFio)
		}
		ck, cr := "-", "-"
		if v, ok := f.CPUMedian[sideKrun]; ok {
			ck = fmt.Sprintf("%.1f µs", v)
		}
		if v, ok := f.CPUMedian[f.Ref]; ok {
			cr = fmt.Sprintf("%.1f µs", v)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", f.Suite, f.Workload, f.Unit,
			num(f.Median[sideKrun]), f.Ref, ref, vs, fio, of, ck, cr)
	}
	tw.Flush()
	for _, n := range rep.Notes {
		fmt.Fprintln(w, "note: "+n)
	}
}

// ---- processes ----

// daemon is a back-end process started for one measurement.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	out    *tailWriter
	exited chan struct{}
	socket string
}

// tailWriter keeps the last few KiB a process printed, for error messages.
type tailWriter struct{ b []byte }

func (t *tailWriter) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > 4096 {
		t.b = t.b[len(t.b)-4096:]
	}
	return len(p), nil
}

func (t *tailWriter) last() string {
	s := strings.TrimSpace(string(t.b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// startDaemon starts argv and waits until socket exists.
func startDaemon(ctx context.Context, name, socket string, argv ...string) (*daemon, error) {
	os.Remove(socket)
	d := &daemon{name: name, out: &tailWriter{}, exited: make(chan struct{}), socket: socket}
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { d.cmd.Wait(); close(d.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if st, err := os.Stat(socket); err == nil && st.Mode().Type() == os.ModeSocket {
			return d, nil
		}
		select {
		case <-d.exited:
			return nil, fmt.Errorf("%s exited before listening: %s", name, d.out.last())
		case <-ctx.Done():
			d.stop()
			return nil, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("%s: no socket %s after 30 s", name, socket)
		}
	}
}

// stop ends the daemon with SIGTERM (SIGKILL after 30 s).
func (d *daemon) stop() {
	select {
	case <-d.exited:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
	os.Remove(d.socket)
}

// cpuTime is the CPU time (user + system) used so far by the process and
// its descendants that are still running.
func (d *daemon) cpuTime() (time.Duration, error) {
	return treeCPU(d.cmd.Process.Pid)
}

func treeCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name (which may hold spaces) start at ")".
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64) // field 14, utime
	st, err2 := strconv.ParseUint(f[12], 10, 64) // field 15, stime
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	total := time.Duration(ut+st) * time.Second / clockTicks
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, k := range strings.Fields(string(kids)) {
			if c, err := strconv.Atoi(k); err == nil {
				if ct, err := treeCPU(c); err == nil {
					total += ct
				}
			}
		}
	}
	return total, nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times (100 on every
// Linux architecture krun-core supports).
const clockTicks = 100

// ---- images ----

// randomFile writes size bytes of pseudo-random data to path.
func randomFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	src := rand.NewChaCha8([32]byte{'k', 'r', 'u', 'n'})
	buf := make([]byte, 1<<20)
	for left := size; left > 0; left -= int64(len(buf)) {
		src.Read(buf)
		n := min(left, int64(len(buf)))
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// warm reads a file into the page cache.
func warm(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		_, err := f.Read(buf)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// qcow2Create makes an empty qcow2 image of size bytes (64 KiB clusters):
// with qemu-img when installed, else with krun-core img create.
func (e *benchEnv) qcow2Create(path string, size int64) error {
	os.Remove(path)
	var cmd *exec.Cmd
	if e.qemuImg != "" {
		cmd = exec.Command(e.qemuImg, "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	} else {
		cmd = exec.Command(e.cfg.Self, "img", "create", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("create %s: %v: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// qcow2Convert converts a raw image into a fully allocated qcow2 one.
func (e *benchEnv) qcow2Convert(raw, path string) error {
	os.Remove(path)
	var cmd *exec.Cmd
	if e.qemuImg != "" {
		cmd = exec.Command(e.qemuImg, "convert", "-f", "raw", "-O", "qcow2", raw, path)
	} else {
		cmd = exec.Command(e.cfg.Self, "img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("convert %s: %v: %s", raw, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sockPath is the path of a socket named name in the socket directory.
func (e *benchEnv) sockPath(name string) string { return filepath.Join(e.sockDir, name) }
