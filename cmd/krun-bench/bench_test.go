package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/internal/netnstest"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

func TestBenchUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 1, "no command given"},
		{[]string{"fs"}, 1, `unknown command "fs"`},
		{[]string{"net"}, 1, "want exactly one of --socket PATH and --passt"},
		{[]string{"net", "--passt", "--socket", "/x"}, 1, "want exactly one"},
		{[]string{"net", "--passt", "--mss", "1460,40"}, 1, "--mss \"40\""},
		{[]string{"net", "--passt", "--mss", "70000"}, 1, "--mss"},
		{[]string{"net", "--passt", "--bytes", "0"}, 1, "--bytes"},
		{[]string{"net", "--passt", "--window", "1G"}, 1, "--window"},
		{[]string{"net", "--passt", "--mss", "2000", "--window", "1K"}, 1, "at most --window"},
		{[]string{"net", "--passt", "extra"}, 1, "unexpected argument"},
		{[]string{"net", "--socket", filepath.Join(os.TempDir(), "krun-no-such-socket")}, 1, "connect"},
		{[]string{"blk"}, 1, "--socket is required"},
		{[]string{"blk", "--socket", "/x", "--seconds", "0"}, 1, "--seconds"},
		{[]string{"blk", "--socket", "/x", "--size", "12Q"}, 1, "--size"},
		{[]string{"blk", "--socket", "/x", "--workloads", "randread-4k-qd1,bogus"}, 1, "unknown workload"},
		{[]string{"blk", "--socket", "/x", "extra"}, 1, "unexpected argument"},
		{[]string{"blk", "--socket", filepath.Join(os.TempDir(), "krun-no-such-socket"), "--seconds", "0.1"}, 1, "connect"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		if code := benchCommand(tc.args, &out, &errb); code != tc.code {
			t.Errorf("bench %q: exit %d, want %d (%s)", tc.args, code, tc.code, errb.String())
		}
		if !strings.Contains(errb.String(), tc.msg) {
			t.Errorf("bench %q: stderr %q lacks %q", tc.args, errb.String(), tc.msg)
		}
	}
}

func TestBenchVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version"} {
		var out, errb bytes.Buffer
		if rc := benchCommand([]string{arg}, &out, &errb); rc != 0 || !strings.HasPrefix(out.String(), "krun-bench ") ||
			!strings.Contains(out.String(), runtime.Version()) || strings.Count(out.String(), "\n") != 1 || errb.Len() != 0 {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", arg, rc, out.String(), errb.String())
		}
	}
}

// The version the Makefile links in (git describe) is what --version
// says; it said "(devel)" for every build from the tree.
func TestBenchVersionLinked(t *testing.T) {
	saved := buildVersion
	defer func() { buildVersion = saved }()
	buildVersion = "e36add8-dirty"
	var out, errb bytes.Buffer
	if rc := benchCommand([]string{"--version"}, &out, &errb); rc != 0 || !strings.HasPrefix(out.String(), "krun-bench e36add8-dirty") {
		t.Errorf("exit %d, stdout %q", rc, out.String())
	}
}

// Every page: on stdout, exit 0, its own; bad flags: one line, exit 1.
func TestBenchPages(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"blk", "--help"}, {"net", "--help"}, {"all", "--help"}, {"help", "blk"}, {"help", "net"}, {"help", "all"}} {
		var out, errb bytes.Buffer
		want := "usage: krun-bench " + strings.Join(args[:len(args)-1], " ")
		if args[0] == "help" {
			want = "usage: krun-bench " + args[1] // help CMD is CMD's page
		}
		if rc := benchCommand(args, &out, &errb); rc != 0 || errb.Len() != 0 || !strings.HasPrefix(out.String(), want) {
			t.Errorf("%q: exit %d, stdout %.60q, stderr %q: want the page %q on stdout", args, rc, out.String(), errb.String(), want)
		}
	}
	var out bytes.Buffer
	benchCommand([]string{"blk", "--help"}, &out, &out)
	if page := strings.Join(strings.Fields(out.String()), " "); !strings.Contains(page, "--log-level LEVEL") || !strings.Contains(page, "(default warn)") {
		t.Errorf("blk page lacks the log flags:\n%s", out.String())
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "krun-bench: no command given (blk, net or all; see krun-bench --help)"},
		{[]string{"blk", "--bogus"}, "krun-bench blk: unknown flag --bogus (see krun-bench blk --help)"},
		{[]string{"net", "--bogus"}, "krun-bench net: unknown flag --bogus (see krun-bench net --help)"},
		{[]string{"blk", "--socket", "/x", "--output", "xml"}, `krun-bench blk: --output="xml": want human or json`},
	} {
		var out, errb bytes.Buffer
		if rc := benchCommand(tt.args, &out, &errb); rc != 1 || out.Len() != 0 || errb.String() != tt.want+"\n" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 1 and %q", tt.args, rc, out.String(), errb.String(), tt.want)
		}
	}
}

// TestBenchBlk runs every workload briefly against an in-process virtio-blk
// back-end on a listening socket, the way `krun-core serve` offers one.
func TestBenchBlk(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(f, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() }) // after the server's stop
	dev, err := blk.New(blk.Config{Disk: d})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := backend.NewServer(dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	backendtest.Serve(t, srv, sock)

	var out, errb bytes.Buffer
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.2", "--size", "16M", "--output", "json"}, &out, &errb); code != 0 {
		t.Fatalf("bench exit %d: %s", code, errb.String())
	}
	var results []blkResult
	if err := json.Unmarshal(out.Bytes(), &results); err != nil {
		t.Fatalf("bad JSON %q: %v", out.String(), err)
	}
	if len(results) != len(blkWorkloads) {
		t.Fatalf("%d results, want %d", len(results), len(blkWorkloads))
	}
	for i, r := range results {
		if r.Workload != blkWorkloads[i].Name || r.Requests == 0 || r.IOPS <= 0 || r.P50us <= 0 || r.P99us < r.P50us {
			t.Errorf("implausible result %+v", r)
		}
		// Probe reads are counted apart, and only where asked for.
		if probes := blkWorkloads[i].Probes > 0; probes != (r.ProbeReads > 0) || probes && (r.ProbeP50us <= 0 || r.ProbeP99us < r.ProbeP50us) {
			t.Errorf("%s: probe figures %d reads, p50 %.1f, p99 %.1f", r.Workload, r.ProbeReads, r.ProbeP50us, r.ProbeP99us)
		}
	}
	st := dev.Stats()
	if st.Reads == 0 || st.Writes == 0 || st.IOErrors+st.OutOfRange != 0 {
		t.Fatalf("device stats %+v", st)
	}
	// All traffic stayed inside --size.
	fi, _ := os.Stat(img)
	if fi.Size() != 64<<20 {
		t.Fatalf("image size changed to %d", fi.Size())
	}
	buf := make([]byte, 1<<20)
	if _, err := d.ReadAt(buf, 32<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, make([]byte, len(buf))) {
		t.Fatal("bench wrote beyond --size")
	}

	// A --size past the disk's end is refused, not clamped silently.
	out.Reset()
	errb.Reset()
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.1", "--size", "128M", "--workloads", "randread-4k-qd1"}, &out, &errb); code == 0 {
		t.Fatalf("--size 128M on a 64 MiB disk: exit 0, output %q", out.String())
	}
	if msg := errb.String(); !strings.Contains(msg, "past the end of the disk") || strings.Count(msg, "\n") != 1 {
		t.Fatalf("--size past the end: stderr %q, want one line naming the disk's end", msg)
	}

	// Read-only: only the read workloads run.
	out.Reset()
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.1", "--read-only", "--workloads", "randread-4k-qd1,randwrite-4k-qd1"}, &out, &errb); code != 0 {
		t.Fatalf("bench exit %d: %s", code, errb.String())
	}
	if !strings.Contains(out.String(), "randread-4k-qd1") || strings.Contains(out.String(), "randwrite") {
		t.Fatalf("read-only table:\n%s", out.String())
	}
	// Only writes asked for, read-only: one line and exit 1, not an empty
	// table and exit 0.
	out.Reset()
	errb.Reset()
	if code := benchCommand([]string{"blk", "--socket", sock, "--seconds", "0.1", "--read-only", "--workloads", "randwrite-4k-qd1"}, &out, &errb); code != 1 ||
		out.Len() != 0 || strings.Count(errb.String(), "\n") != 1 || !strings.Contains(errb.String(), "nothing to run: every workload asked for writes and --read-only was given") {
		t.Fatalf("writes only, --read-only: exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}
}

// TestBenchNet runs `krun-bench net` both ways inside a network
// namespace of the test's own: through `krun-core serve --net passt` (the
// plugin's virtio-net queues) and straight to passt's socket.
func TestBenchNet(t *testing.T) {
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	ns := netnstest.New(t)
	bin := buildBinaries(t)
	sock := filepath.Join(t.TempDir(), "net.sock")
	serve := netnstest.Command(ns, filepath.Join(bin, "krun-core"), "serve", "--socket", sock, "--net", "passt")
	var serveLog syncbuf.Buffer
	serve.Stdout, serve.Stderr = &serveLog, &serveLog
	serve.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		serve.Process.Signal(syscall.SIGTERM)
		serve.Wait()
		if t.Failed() {
			t.Logf("serve output:\n%s", serveLog.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not create its socket\n%s", serveLog.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, tc := range []struct{ link, arg string }{{"virtio-net", "--socket=" + sock}, {"passt-socket", "--passt"}} {
		t.Run(tc.link, func(t *testing.T) {
			cmd := netnstest.Command(ns, filepath.Join(bin, "krun-bench"), "net", tc.arg, "--bytes", "16M", "--output", "json")
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			if err := cmd.Run(); err != nil {
				t.Fatalf("bench net %s: %v\n%s", tc.arg, err, errb.String())
			}
			var results []netResult
			if err := json.Unmarshal(out.Bytes(), &results); err != nil {
				t.Fatalf("bad JSON %q: %v", out.String(), err)
			}
			if len(results) != 2 || results[0].MSS != 1460 || results[1].MSS != 65480 {
				t.Fatalf("results %+v, want MSS 1460 and 65480", results)
			}
			for _, r := range results {
				if r.Link != tc.link || r.Bytes != 16<<20 || !(r.MiBps > 0) || !(r.FramesPerS > 0) || r.TxFrames == 0 || r.RxFrames == 0 {
					t.Errorf("implausible result %+v", r)
				}
				t.Logf("%s MSS %d: %.1f MiB/s each way, %.0f frames/s, %d retransmits", r.Link, r.MSS, r.MiBps, r.FramesPerS, r.Retransmits)
			}
		})
	}
}

// buildBinaries builds krun-bench, krun-core and the net-passt plugin into
// a temporary directory.
func buildBinaries(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds binaries; skipped with -short")
	}
	dir := t.TempDir()
	for pkg, out := range map[string]string{".": "krun-bench", "../krun-core": "krun-core", "../../plugins/net-passt": "krun-plugin-net-passt"} {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, out), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	return dir
}
