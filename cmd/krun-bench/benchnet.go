package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/testguest/tcpip"
)

// netResult is what one net benchmark run measured.
type netResult struct {
	Link        string  `json:"link"` // "virtio-net" or "passt-socket"
	MSS         int     `json:"mss"`
	Bytes       int64   `json:"bytes"`
	Seconds     float64 `json:"seconds"`
	MiBps       float64 `json:"mib_per_s"` // each way
	FramesPerS  float64 `json:"frames_per_s"`
	TxFrames    uint64  `json:"tx_frames"`
	RxFrames    uint64  `json:"rx_frames"`
	Retransmits uint64  `json:"retransmits"`
}

const benchNetUsage = `usage: krun-bench net (--socket PATH | --passt) [options]

Sends a TCP stream from the Go test guest through passt to an echo server on
this host's loopback and back, checking every byte. The guest connects to the
gateway address, which passt maps to the host. --socket drives a
vhost-user-net back-end's tx and rx queues (krun-core serve --net passt, run
in the same network namespace); --passt starts passt and sends the same
frames straight to its socket.`

func benchNet(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlags("krun-bench net", benchNetUsage)
	socket := fs.String("socket", "", "unix socket `PATH` of a vhost-user-net back-end whose other end is passt")
	direct := fs.Bool("passt", false, "start passt (from $PATH) and drive its socket directly")
	size := fs.String("bytes", "64M", "length of the stream sent and echoed back, per run (`SIZE`)")
	mssList := fs.String("mss", "1460,65480", "comma-separated TCP segment sizes, one run each, 64 to 65480 (`LIST`)")
	window := fs.String("window", "1M", "receive window and cap on bytes in flight (`SIZE`)")
	output := cli.OutputFlag(fs.FlagSet)
	if rc, done := fs.ParseArgs(args, stdout, stderr); done {
		return rc
	}
	fail := func(format string, a ...any) int { return fs.Failf(stderr, format, a...) }
	if fs.NArg() != 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	if (*socket == "") == !*direct {
		return fail("want exactly one of --socket PATH and --passt")
	}
	if err := cli.CheckOutput(*output); err != nil {
		return fail("%v", err)
	}
	log, err := fs.Logger(stderr)
	if err != nil {
		return fail("%v", err)
	}
	n, err := devspec.ParseSize(*size)
	if err != nil || n <= 0 {
		return fail("--bytes %q: want a positive size such as 64M", *size)
	}
	w, err := devspec.ParseSize(*window)
	if err != nil || w < 64 || w > 65535<<7 {
		return fail("--window %q: want a size from 64 bytes to about 8M", *window)
	}
	var mss []int
	for _, s := range strings.Split(*mssList, ",") {
		v, err := strconv.Atoi(s)
		if err != nil || v < 64 || v > 65480 || int64(v) > w {
			return fail("--mss %q: want sizes from 64 to 65480, at most --window", s)
		}
		mss = append(mss, v)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	results, err := runNetBench(ctx, netBenchConfig{Socket: *socket, Bytes: n, MSS: mss, Window: int(w), Progress: stderr, Log: log})
	if err != nil {
		return fail("%v", err)
	}
	if err := cli.Report(stdout, *output, results, func(w io.Writer) { printNetResults(w, results) }); err != nil {
		return fail("%v", err)
	}
	return 0
}

func printNetResults(w io.Writer, results []netResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "link\tMSS\tMiB/s each way\tframes/s\tretransmits\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%.1f\t%.0f\t%d\t\n", r.Link, r.MSS, r.MiBps, r.FramesPerS, r.Retransmits)
	}
	tw.Flush()
}

type netBenchConfig struct {
	Socket   string // vhost-user-net back-end; "" starts passt and drives it directly
	Bytes    int64
	MSS      []int
	Window   int
	Progress io.Writer
	Log      hclog.Logger // passt's own lines go here (nil: discarded)
}

// runNetBench starts the echo server, connects the link, takes a DHCP
// lease and runs one echo stream per MSS.
func runNetBench(ctx context.Context, cfg netBenchConfig) ([]netResult, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("echo server: %w", err)
	}
	defer l.Close()
	go tcpip.ServeEcho(l)
	port := uint16(l.Addr().(*net.TCPAddr).Port)

	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	link, name, closeLink, err := openNetLink(cfg.Socket, log)
	if err != nil {
		return nil, err
	}
	defer closeLink()
	mac := [6]byte{0x52, 0x54, 0x00, 0x6b, 0x72, 0x6e}
	ep := tcpip.New(link, mac)
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	lease, err := ep.DHCP(dctx)
	cancel()
	if err != nil {
		return nil, err
	}
	var results []netResult
	for _, mss := range cfg.MSS {
		res, err := ep.Echo(ctx, netip.AddrPortFrom(lease.Gateway, port), tcpip.EchoOptions{Bytes: cfg.Bytes, MSS: mss, Window: cfg.Window})
		if err != nil {
			return results, fmt.Errorf("%s, MSS %d: %w", name, mss, err)
		}
		r := netResult{Link: name, MSS: mss, Bytes: res.Bytes, Seconds: res.Elapsed.Seconds(),
			MiBps: res.MiBPerSecond(), FramesPerS: res.FramesPerSecond(),
			TxFrames: res.TxFrames, RxFrames: res.RxFrames, Retransmits: res.Retransmits}
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, "%s MSS %d: %.1f MiB/s each way, %.0f frames/s\n", name, mss, r.MiBps, r.FramesPerS)
		}
		results = append(results, r)
	}
	return results, nil
}

// openNetLink connects to the vhost-user-net back-end at socket, or starts
// passt on a socket pair when socket is "".
func openNetLink(socket string, log hclog.Logger) (tcpip.Link, string, func(), error) {
	if socket != "" {
		n, err := testguest.DialNet(socket, testguest.Options{QueueSize: 256})
		if err != nil {
			return nil, "", nil, fmt.Errorf("connect to %s: %w", socket, err)
		}
		return n, "virtio-net", func() { n.Close() }, nil
	}
	// The same passt, started the same way, as for --net passt.
	if _, err := exec.LookPath("passt"); err != nil {
		return nil, "", nil, errors.New("--passt needs the passt program in $PATH (Debian package passt)")
	}
	spec, err := devspec.ParseNet("passt")
	if err != nil {
		return nil, "", nil, err
	}
	opened, err := spec.Open(devspec.OpenOptions{HelperStderr: devspec.HelperLog(log.Named("passt"))})
	if err != nil {
		return nil, "", nil, err
	}
	var ours *os.File
	for _, f := range opened.Files {
		if f.Name == devopts.FilePasst {
			ours = f.File
		}
	}
	c, err := net.FileConn(ours) // its own descriptor
	opened.CloseFiles()
	if err != nil {
		opened.Close()
		return nil, "", nil, err
	}
	l := tcpip.NewPasstLink(c)
	return l, "passt-socket", func() {
		l.Close()
		opened.Close()
	}, nil
}
