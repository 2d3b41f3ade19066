package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// stressBlock is the unit the stress model tracks: 4 KiB.
const stressBlock = 4096

// block states in the model
const (
	stZero    = iota // zeroes
	stData           // gen holds the expected generation
	stUnknown        // discarded: zeroes or the previous content
)

type stressState struct {
	st   int
	gen  uint32
	prev uint32 // for stUnknown: the generation before (0: zeroes)
}

// stressFill fills a 4 KiB block with its LBA and generation.
func stressFill(p []byte, lba uint64, gen uint32) {
	for i := 0; i < len(p); i += 16 {
		binary.LittleEndian.PutUint64(p[i:], lba)
		binary.LittleEndian.PutUint32(p[i+8:], gen)
		binary.LittleEndian.PutUint32(p[i+12:], uint32(i)^gen*2654435761)
	}
}

func stressEnv(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

// TestServeKillStress drives krun-core serve's disk plugin with the Go
// test guest (inflight region, two request queues) through random batches of
// writes (each 4 KiB block tagged with its LBA and a generation),
// write-zeroes (with and without unmap), discards and flushes, and SIGKILLs
// the plugin at random moments inside batches, sometimes again while the new
// plugin replays. After every batch every request must have succeeded and
// the whole disk must read back as the model says; at the end qemu-img check
// must find no corruption.
func TestServeKillStress(t *testing.T) {
	if os.Getenv("KRUN_STRESS") == "" {
		t.Skip("a long stress run; set KRUN_STRESS=1 (KRUN_STRESS_ROUNDS, KRUN_STRESS_CASE, KRUN_STRESS_SEED, KRUN_STRESS_MIB, KRUN_STRESS_BIN)")
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	bin := os.Getenv("KRUN_STRESS_BIN")
	if bin == "" {
		bin = buildServeBinaries(t, "blk-raw", "blk-qcow2")
	}
	type tc struct{ name, format, opts, prep string }
	cases := []tc{
		{"raw", "raw", "", ""},
		{"qcow2-64k", "qcow2", "", ""},
		{"qcow2-4k", "qcow2", "cluster_size=4096", ""},
		{"qcow2-512-rc64", "qcow2", "cluster_size=512,refcount_bits=64", ""},
		{"qcow2-extl2", "qcow2", "cluster_size=32768,extended_l2=on", ""},
		{"qcow2-backing", "qcow2", "", "backing"},
		{"qcow2-backing-extl2", "qcow2", "cluster_size=16384,extended_l2=on", "backing"},
		{"qcow2-v2-backing", "qcow2", "compat=0.10,cluster_size=8192", "backing"},
		{"qcow2-snapshot", "qcow2", "cluster_size=16384", "snapshot"},
		{"qcow2-compressed", "qcow2", "", "compressed"},
		{"qcow2-compressed-4k", "qcow2", "cluster_size=4096", "compressed"},
		{"qcow2-lazy", "qcow2", "lazy_refcounts=on,cluster_size=4096", ""},
		{"qcow2-prealloc-meta", "qcow2", "preallocation=metadata,cluster_size=4096", ""},
		{"raw-loop", "raw", "", "loop"},
		{"qcow2-loop", "qcow2", "", "loop"},
		{"qcow2-loop-4k", "qcow2", "cluster_size=4096", "loop"},
		{"qcow2-datafile", "qcow2", "cluster_size=4096", "datafile"},
		{"qcow2-datafile-raw", "qcow2", "cluster_size=4096,data_file_raw=on", "datafile"},
		{"qcow2-zstd-compressed-extl2", "qcow2", "cluster_size=65536,extended_l2=on", "compressed-zstd"},
	}
	only := os.Getenv("KRUN_STRESS_CASE")
	for _, c := range cases {
		if only != "" && only != c.name {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			serveKillStress(t, bin, c.format, c.opts, c.prep)
		})
	}
}

func serveKillStress(t *testing.T, bin, format, opts, prep string) {
	sizeMiB := stressEnv("KRUN_STRESS_MIB", 24)
	size := sizeMiB << 20
	rounds := stressEnv("KRUN_STRESS_ROUNDS", 30)
	seed := uint64(stressEnv("KRUN_STRESS_SEED", int(time.Now().UnixNano()%1e9)))
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 101))
	dir := t.TempDir()
	img := filepath.Join(dir, "disk."+format)
	args := []string{"create", "-q", "-f", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	nblocks := size / stressBlock
	model := make([]stressState, nblocks)
	diskOpts := ""
	if prep == "loop" {
		// The image on a block device (a loop device over a file):
		// blk.Config.SerialWrites is off there, writes run concurrently.
		back := filepath.Join(dir, "loop.img")
		lsize := size
		if format == "qcow2" {
			lsize = 512 << 20
		}
		if err := os.WriteFile(back, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(back, int64(lsize)); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("losetup", "-f", "--show", back).Output()
		if err != nil {
			t.Skipf("losetup: %v", err)
		}
		dev := string(bytes.TrimSpace(out))
		t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
		img = dev
		if format == "qcow2" {
			if out, err := exec.Command("qemu-img", append(args, img, strconv.Itoa(size))...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
		}
	} else if prep == "datafile" {
		df := filepath.Join(dir, "data.bin")
		if out, err := exec.Command("qemu-img", append(args[:len(args)-1], opts+",data_file="+df, img, strconv.Itoa(size))...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		diskOpts = ",data-file=" + df
	} else if prep == "" {
		if out, err := exec.Command("qemu-img", append(args, img, strconv.Itoa(size))...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
	} else {
		// Every block written with generation 1 in a raw file, made the
		// backing file, or converted (compressed), or snapshotted.
		base := filepath.Join(dir, "base.raw")
		buf := make([]byte, size)
		for b := 0; b < nblocks; b++ {
			if b%7 == 3 {
				continue // some holes
			}
			stressFill(buf[b*stressBlock:(b+1)*stressBlock], uint64(b), 1)
			model[b] = stressState{st: stData, gen: 1}
		}
		if err := os.WriteFile(base, buf, 0o644); err != nil {
			t.Fatal(err)
		}
		var cmds [][]string
		switch prep {
		case "backing":
			cmds = [][]string{append(args, "-b", base, "-F", "raw", img, strconv.Itoa(size))}
			diskOpts = ",backing=" + base + ",backing-format=raw"
		case "snapshot":
			cmds = [][]string{{"convert", "-O", "qcow2", "-o", opts, base, img}, {"snapshot", "-c", "s1", img}}
		case "compressed", "compressed-zstd":
			ct := map[bool]string{true: "zstd", false: "zlib"}[prep == "compressed-zstd"]
			cmds = [][]string{{"convert", "-c", "-O", "qcow2", "-o", opts + map[bool]string{true: "", false: ","}[opts == ""] + "compression_type=" + ct, base, img}}
		}
		for _, c := range cmds {
			if out, err := exec.Command("qemu-img", c...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img %v: %v\n%s", c, err, out)
			}
		}
	}
	sock := filepath.Join(dir, "blk.sock")
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format="+format+",queues=2"+diskOpts, "--plugin-restarts", "10000/10m")
	waitSocket(t, s, sock)
	pid := servingPid(t, s)
	const nq = 2
	g, err := testguest.Dial(sock, testguest.Options{Inflight: true, QueueSize: 128, MemSize: 48 << 20, NumQueues: nq, Features: testguest.BlkFeatures})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var blks [nq]*testguest.Blk
	for q := range nq {
		if blks[q], err = testguest.NewBlk(g, q); err != nil {
			t.Fatal(err)
		}
	}
	gen := uint32(1)
	kills := 0
	kill := func() {
		kills++
		if format == "qcow2" && rng.IntN(2) == 0 {
			// serve stopped: the plugin dies and stays dead (a zombie,
			// its I/O finished) while qemu-img checks what it left.
			s.cmd.Process.Signal(syscall.SIGSTOP)
			syscall.Kill(pid, syscall.SIGKILL)
			for i := 0; i < 1000; i++ {
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				if f := bytes.Fields(b); len(f) > 2 && string(f[2]) == "Z" || len(b) == 0 {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			stressCheckU(t, img, fmt.Sprintf("right after kill %d", kills))
			s.cmd.Process.Signal(syscall.SIGCONT)
			deadline := time.Now().Add(20 * time.Second)
			for len(restartedPids(s)) < kills {
				if time.Now().After(deadline) {
					t.Fatalf("no restart %d", kills)
				}
				time.Sleep(5 * time.Millisecond)
			}
			pid = restartedPids(s)[kills-1]
		} else {
			pid = killPlugin(t, s, pid, kills)
		}
		var c *frontend.Client
		var err error
		for try := 0; try < 100; try++ {
			if c, err = frontend.Dial(sock); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("kill %d: dial: %v", kills, err)
		}
		if rng.IntN(3) == 0 {
			// Kill the new plugin again while the guest reattaches to
			// it (or just after), then reattach to the next one.
			rc := make(chan error, 1)
			go func() { rc <- g.Reconnect(c) }()
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
			kills++
			pid = killPlugin(t, s, pid, kills)
			<-rc
			for try := 0; try < 100; try++ {
				if c, err = frontend.Dial(sock); err == nil {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("kill %d: dial: %v", kills, err)
			}
		}
		if err := g.Reconnect(c); err != nil {
			t.Fatalf("kill %d: reconnect: %v", kills, err)
		}
	}
	verify := func(when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		const chunk = 256 << 10
		buf := make([]byte, chunk)
		want := make([]byte, stressBlock)
		for off := 0; off < size; off += chunk {
			if err := blks[0].Read(ctx, uint64(off/512), buf); err != nil {
				t.Fatalf("%s: read at %d: %v", when, off, err)
			}
			for i := 0; i < chunk; i += stressBlock {
				lba := uint64((off + i) / stressBlock)
				m := model[lba]
				got := buf[i : i+stressBlock]
				ok := false
				switch m.st {
				case stData:
					stressFill(want, lba, m.gen)
					ok = bytes.Equal(got, want)
				case stZero:
					ok = allZero(got)
				case stUnknown:
					if m.prev == 0 {
						ok = allZero(got)
					} else {
						// zeroes, or an older generation of this block
						g := binary.LittleEndian.Uint32(got[8:])
						stressFill(want, lba, g)
						ok = allZero(got) || (g >= 1 && g <= m.prev && bytes.Equal(got, want))
					}
				}
				if !ok {
					t.Fatalf("%s (seed %d, %d kills): block %d (byte %d): state %+v, got lba=%d gen=%d zero=%v",
						when, seed, kills, lba, lba*stressBlock, m, binary.LittleEndian.Uint64(got), binary.LittleEndian.Uint32(got[8:]), allZero(got))
				}
			}
		}
	}
	for round := 1; round <= rounds; round++ {
		// A batch over disjoint block runs, split over the queues.
		var reqs [nq][]*testguest.BlkRequest
		type upd struct {
			lba, n int
			st     int
			gen    uint32
		}
		var upds []upd
		perm := rng.Perm(nblocks / 16)
		used := make([]bool, nblocks/16)
		nreq := 40 + rng.IntN(200)
		for k := 0; k < nreq && k < len(perm); k++ {
			start := perm[k] * 16
			n := 1 + rng.IntN(16)
			if rng.IntN(8) == 0 { // now and then a long write
				n = 16
			}
			if used[perm[k]] {
				continue
			}
			used[perm[k]] = true
			if r := perm[k]; rng.IntN(30) == 0 && r+4 < len(used) && !used[r+1] && !used[r+2] && !used[r+3] && !used[r+4] {
				n = 64 + rng.IntN(16) // a long request over the next runs
				used[r+1], used[r+2], used[r+3], used[r+4] = true, true, true, true
			}
			q := rng.IntN(nq)
			switch op := rng.IntN(20); {
			case op < 14:
				gen++
				data := make([]byte, n*stressBlock)
				for b := 0; b < n; b++ {
					stressFill(data[b*stressBlock:(b+1)*stressBlock], uint64(start+b), gen)
				}
				reqs[q] = append(reqs[q], &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: uint64(start * stressBlock / 512), Data: data})
				upds = append(upds, upd{start, n, stData, gen})
			case op < 17:
				seg := make([]byte, 16)
				binary.LittleEndian.PutUint64(seg, uint64(start*stressBlock/512))
				binary.LittleEndian.PutUint32(seg[8:], uint32(n*stressBlock/512))
				if rng.IntN(2) == 0 {
					binary.LittleEndian.PutUint32(seg[12:], 1) // unmap
				}
				reqs[q] = append(reqs[q], &testguest.BlkRequest{Type: testguest.BlkTWriteZeroes, Data: seg})
				upds = append(upds, upd{start, n, stZero, 0})
			case op < 19:
				seg := make([]byte, 16)
				binary.LittleEndian.PutUint64(seg, uint64(start*stressBlock/512))
				binary.LittleEndian.PutUint32(seg[8:], uint32(n*stressBlock/512))
				reqs[q] = append(reqs[q], &testguest.BlkRequest{Type: testguest.BlkTDiscard, Data: seg})
				upds = append(upds, upd{start, n, stUnknown, 0})
			default:
				reqs[q] = append(reqs[q], &testguest.BlkRequest{Type: testguest.BlkTFlush})
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		var wg sync.WaitGroup
		errs := make([]error, nq)
		for q := range nq {
			wg.Add(1)
			go func() { defer wg.Done(); errs[q] = blks[q].Do(ctx, reqs[q]) }()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		// Kill 0, 1 or 2 times at random moments inside the batch.
		nk := rng.IntN(3)
		for k := 0; k < nk; k++ {
			time.Sleep(time.Duration(rng.IntN(40000)) * time.Microsecond)
			kill()
		}
		<-done
		cancel()
		for q := range nq {
			if errs[q] != nil {
				t.Fatalf("round %d queue %d: %v", round, q, errs[q])
			}
			for _, r := range reqs[q] {
				if r.Err != nil {
					t.Fatalf("round %d (seed %d): request type %d sector %d: %v", round, seed, r.Type, r.Sector, r.Err)
				}
			}
		}
		for _, u := range upds {
			for b := u.lba; b < u.lba+u.n; b++ {
				switch u.st {
				case stUnknown:
					m := model[b]
					p := uint32(0)
					if m.st == stData {
						p = m.gen
					} else if m.st == stUnknown {
						p = m.prev
					}
					model[b] = stressState{st: stUnknown, prev: p}
				default:
					model[b] = stressState{st: u.st, gen: u.gen}
				}
			}
		}
		verify(fmt.Sprintf("round %d", round))
		if rng.IntN(4) == 0 { // a kill with nothing in flight
			kill()
			verify(fmt.Sprintf("round %d after an idle kill", round))
			if format == "qcow2" {
				stressCheckU(t, img, fmt.Sprintf("round %d after an idle kill", round))
			}
		}
	}
	t.Logf("%d kills, %d requests resubmitted", kills, resubmitted(s.log()))
	g.Close()
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.waitExit(t)
	if format == "qcow2" {
		checkNoCorruption(t, img)
	}
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// stressCheckU runs qemu-img check -U on the served image (idle: every
// request completed): leaks are fine, corruptions are not.
func stressCheckU(t *testing.T, img, when string) {
	t.Helper()
	out, _ := exec.Command("qemu-img", "check", "-U", "--output=json", img).Output()
	var res struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
		CheckErrors int `json:"check-errors"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%s: qemu-img check -U: %v\n%s", when, err, out)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		c, _ := exec.Command("qemu-img", "check", "-U", img).CombinedOutput()
		t.Fatalf("%s: qemu-img check -U: %d corruptions, %d errors\n%s", when, res.Corruptions, res.CheckErrors, c)
	}
}
