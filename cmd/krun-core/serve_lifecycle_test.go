package main

// Lifecycle soak tests of krun-core serve (from review, helper-94): many
// front-end cycles, front-ends that die at every step of the negotiation,
// and many plugin restarts must not make krun-core or its plugin grow; a
// serve killed at any moment leaves nothing behind for good. Longer soaks:
// KRUN_SOAK_ROUNDS, KRUN_SOAK_RESTARTS; KRUN_SOAK_BIN reuses the binaries
// of `make all` (bin/).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// soakBin is a directory holding krun-core and its plugins: $KRUN_SOAK_BIN
// when set (bin/ of `make all`), else freshly built.
func soakBin(t *testing.T, plugins ...string) string {
	t.Helper()
	if d := os.Getenv("KRUN_SOAK_BIN"); d != "" {
		return d
	}
	return buildServeBinaries(t, plugins...)
}

// procUsage is what a process holds: open fds, threads, resident KiB.
type procUsage struct{ fds, threads, rssKiB, maps int }

func (u procUsage) String() string {
	return fmt.Sprintf("fds=%d threads=%d rss=%dKiB maps=%d", u.fds, u.threads, u.rssKiB, u.maps)
}

func usageOf(t *testing.T, pid int) procUsage {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("pid %d: %v", pid, err)
	}
	u := procUsage{fds: len(ents)}
	if m, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid)); err == nil {
		u.maps = strings.Count(string(m), "\n")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "Threads:":
			u.threads, _ = strconv.Atoi(f[1])
		case "VmRSS:":
			u.rssKiB, _ = strconv.Atoi(f[1])
		}
	}
	return u
}

// fdTargets lists what pid's fds point at (for a report of a leak).
func fdTargets(pid int) map[string]int {
	m := map[string]int{}
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, e := range ents {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		if i := strings.IndexByte(l, ':'); i > 0 && strings.HasPrefix(l, "socket") || strings.HasPrefix(l, "pipe") || strings.HasPrefix(l, "anon_inode") {
			l = l[:strings.IndexByte(l, ':')]
		}
		m[l]++
	}
	return m
}

// negotiationSteps is a full vhost-user-blk start, one message (or one
// request) a step; a front-end that dies after step k closes its
// connection there.
type soakFrontend struct {
	c   *frontend.Client
	n   frontend.Negotiated
	mem *testguest.Memory
	r   *testguest.Ring
	in  *frontend.Inflight
}

func (f *soakFrontend) close() {
	f.c.Close()
	if f.r != nil {
		f.r.Close()
	}
	if f.in != nil {
		f.in.Close()
	}
	if f.mem != nil {
		f.mem.Close()
	}
}

var soakSteps = []struct {
	name string
	do   func(f *soakFrontend) error
}{
	{"SET_OWNER", func(f *soakFrontend) error { return f.c.SetOwner() }},
	{"GET_FEATURES", func(f *soakFrontend) error {
		v, err := f.c.GetFeatures()
		f.n.Features = v & (vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | testguest.BlkFeatures)
		return err
	}},
	{"GET_PROTOCOL_FEATURES", func(f *soakFrontend) error {
		v, err := f.c.GetProtocolFeatures()
		f.n.ProtocolFeatures = v & frontend.SupportedProtocolFeatures
		return err
	}},
	{"SET_PROTOCOL_FEATURES", func(f *soakFrontend) error { return f.c.SetProtocolFeatures(f.n.ProtocolFeatures) }},
	{"GET_QUEUE_NUM", func(f *soakFrontend) error { _, err := f.c.GetQueueNum(); return err }},
	{"SET_FEATURES", func(f *soakFrontend) error { return f.c.SetFeatures(f.n.Features) }},
	{"SET_MEM_TABLE", func(f *soakFrontend) error {
		var err error
		if f.mem, err = testguest.NewMemory(0, 4<<20); err != nil {
			return err
		}
		return f.c.SetMemTable(f.mem.Regions(1))
	}},
	{"GET_INFLIGHT_FD", func(f *soakFrontend) error {
		var err error
		f.in, err = f.c.GetInflightFD(1, 64)
		return err
	}},
	{"SET_INFLIGHT_FD", func(f *soakFrontend) error { return f.c.SetInflightFD(f.in) }},
	{"SET_VRING_NUM", func(f *soakFrontend) error {
		var err error
		f.r, err = testguest.NewRing(f.mem, 0, testguest.RingOptions{Size: 64})
		if err != nil {
			return err
		}
		return f.c.SetVringNum(0, 64)
	}},
	{"SET_VRING_BASE", func(f *soakFrontend) error { return f.c.SetVringBase(0, 0) }},
	{"SET_VRING_ADDR", func(f *soakFrontend) error {
		q := f.r.Setup()
		return f.c.SetVringAddr(vhostuser.VringAddr{Index: 0, Desc: q.Desc, Avail: q.Avail, Used: q.Used})
	}},
	{"SET_VRING_CALL", func(f *soakFrontend) error { return f.c.SetVringCall(0, f.r.CallFile()) }},
	{"SET_VRING_KICK", func(f *soakFrontend) error { return f.c.SetVringKick(0, f.r.KickFile()) }},
	{"SET_VRING_ENABLE", func(f *soakFrontend) error { return f.c.SetVringEnable(0, true) }},
	{"request", func(f *soakFrontend) error {
		addr, err := f.mem.Alloc(16+512+1, 16)
		if err != nil {
			return err
		}
		if _, err := f.r.Post([]testguest.Segment{{Addr: addr, Len: 16}, {Addr: addr + 16, Len: 512, Writable: true}, {Addr: addr + 16 + 512, Len: 1, Writable: true}}, nil); err != nil {
			return err
		}
		if _, err := f.r.Kick(); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = f.r.Wait(ctx)
		return err
	}},
}

// partialCycle sends the first n bytes of a SET_OWNER message after the
// first k steps (a header cut short, or a header whose payload never
// comes), then disconnects.
func partialCycle(sock string, k, n int) error {
	c, err := frontend.Dial(sock)
	if err != nil {
		return err
	}
	f := &soakFrontend{c: c}
	defer f.close()
	for _, s := range soakSteps[:k] {
		if err := s.do(f); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	// GET_FEATURES (1) with a payload size of 8 that never comes.
	msg := []byte{1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0}
	_, err = c.Conn().UnixConn().Write(msg[:n])
	return err
}

// cycle connects to sock and runs the first k steps, then disconnects.
func soakCycle(sock string, k int) error {
	c, err := frontend.Dial(sock)
	if err != nil {
		return err
	}
	f := &soakFrontend{c: c}
	defer f.close()
	for _, s := range soakSteps[:k] {
		if err := s.do(f); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// zeroDisk writes a 16 MiB raw image of zeros in dir and returns it with
// the path of a socket beside it.
func zeroDisk(t *testing.T, dir string) (img, sock string) {
	t.Helper()
	img = filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return img, filepath.Join(dir, "blk.sock")
}

func TestServeLifecycleFrontendCycles(t *testing.T) {
	bin := soakBin(t, "blk-raw")
	dir := t.TempDir()
	img, sock := zeroDisk(t, dir)
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw")
	waitSocket(t, s, sock)
	plugin := servingPid(t, s)
	core := s.cmd.Process.Pid
	rounds, _ := strconv.Atoi(os.Getenv("KRUN_SOAK_ROUNDS"))
	if rounds == 0 {
		rounds = 30
	}
	warm := func() {
		for k := 0; k <= len(soakSteps); k++ {
			if err := soakCycle(sock, k); err != nil {
				t.Fatalf("warm-up, %d steps: %v", k, err)
			}
		}
	}
	warm()
	time.Sleep(time.Second)
	c0, p0 := usageOf(t, core), usageOf(t, plugin)
	f0 := fdTargets(plugin)
	start := time.Now()
	for i := 0; i < rounds; i++ {
		for k := 0; k <= len(soakSteps); k++ {
			if err := soakCycle(sock, k); err != nil {
				t.Fatalf("round %d, %d steps: %v", i, k, err)
			}
		}
		for _, k := range []int{0, 1, 7} {
			for _, n := range []int{3, 12} {
				if err := partialCycle(sock, k, n); err != nil {
					t.Fatalf("round %d, partial %d/%d: %v", i, k, n, err)
				}
			}
		}
		if (i+1)%(rounds/5+1) == 0 {
			t.Logf("round %d: krun-core %v plugin %v", i+1, usageOf(t, core), usageOf(t, plugin))
		}
	}
	// The last front-end's session ends on the plugin's goroutines
	// after its close: its fds are waited for (a leak keeps them for
	// good), not given a fixed time a loaded machine may overrun.
	settled := time.Now().Add(20 * time.Second)
	for time.Sleep(2 * time.Second); time.Now().Before(settled); time.Sleep(100 * time.Millisecond) {
		if usageOf(t, core).fds <= c0.fds && usageOf(t, plugin).fds <= p0.fds {
			break
		}
	}
	c1, p1 := usageOf(t, core), usageOf(t, plugin)
	t.Logf("%d cycles in %v", rounds*(len(soakSteps)+1), time.Since(start))
	t.Logf("krun-core: before %v after %v", c0, c1)
	t.Logf("plugin:    before %v after %v", p0, p1)
	f1 := fdTargets(plugin)
	for k, v := range f1 {
		if v != f0[k] {
			t.Logf("plugin fd %s: %d -> %d", k, f0[k], v)
		}
	}
	if c1.fds > c0.fds || p1.fds > p0.fds {
		t.Errorf("fds grew")
	}
	if c1.threads > c0.threads+2 || p1.threads > p0.threads+2 {
		t.Errorf("threads grew")
	}
	if c1.maps > c0.maps+8 || p1.maps > p0.maps+8 {
		t.Errorf("mappings grew")
	}
}

// TestServeLifecyclePluginRestarts kills serve's plugin (SIGKILL) many times, with
// a budget that allows every restart: krun-core must hold no more fds,
// threads or memory after N restarts than after a few, and leave nothing
// in its TMPDIR.
func TestServeLifecyclePluginRestarts(t *testing.T) {
	bin := soakBin(t, "blk-raw")
	dir := t.TempDir()
	tmp, err := os.MkdirTemp("/tmp", "s94")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	t.Setenv("TMPDIR", tmp)
	img, sock := zeroDisk(t, dir)
	n, _ := strconv.Atoi(os.Getenv("KRUN_SOAK_RESTARTS"))
	if n == 0 {
		n = 12
	}
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw", "--plugin-restarts", "10000/1s") // no back-off
	waitSocket(t, s, sock)
	pid := servingPid(t, s)
	core := s.cmd.Process.Pid
	var c0 procUsage
	var t0 map[string]int
	for i := 1; i <= n; i++ {
		if i == 4 {
			time.Sleep(time.Second)
			c0, t0 = usageOf(t, core), fdTargets(core)
		}
		pid = killPlugin(t, s, pid, i)
		if err := soakCycle(sock, len(soakSteps)); err != nil {
			t.Fatalf("after restart %d: %v", i, err)
		}
	}
	// As in TestServeLifecycleFrontendCycles: the fds of the last
	// restart's plugin and session are waited for, not given a fixed time.
	settled := time.Now().Add(20 * time.Second)
	for time.Sleep(3 * time.Second); time.Now().Before(settled); time.Sleep(100 * time.Millisecond) {
		if usageOf(t, core).fds <= c0.fds {
			break
		}
	}
	c1 := usageOf(t, core)
	t.Logf("krun-core after 3 restarts %v, after %d: %v", c0, n, c1)
	for k, v := range fdTargets(core) {
		if v != t0[k] {
			t.Logf("krun-core fd %s: %d -> %d", k, t0[k], v)
		}
	}
	if c1.fds > c0.fds {
		t.Errorf("krun-core's fds grew with restarts: %d -> %d", c0.fds, c1.fds)
	}
	if c1.threads > c0.threads+2 {
		t.Errorf("krun-core's threads grew with restarts: %d -> %d", c0.threads, c1.threads)
	}
	for _, n := range leftInTmp(tmp) {
		t.Errorf("left in TMPDIR: %s", n)
	}
}

// leftInTmp lists what is left in tmp, a test's $TMPDIR: the plugins'
// socket directories are in krun.UID, which stays (empty).
func leftInTmp(tmp string) []string {
	var names []string
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		if e.Name() != fmt.Sprintf("krun.%d", os.Geteuid()) {
			names = append(names, e.Name())
			continue
		}
		inner, _ := os.ReadDir(filepath.Join(tmp, e.Name()))
		for _, i := range inner {
			names = append(names, filepath.Join(e.Name(), i.Name()))
		}
	}
	return names
}

// TestServeLifecycleKilledDuringStartLeavesNoTempDir signals krun-core serve while
// its plugin is starting, at the moment the plugin's private socket
// directory (krun-KIND-* in $TMPDIR) exists, i.e. before the host has
// connected to the plugin's gRPC socket. Whatever the signal, nothing of
// serve's may be left in $TMPDIR afterwards, and a new serve must start on
// the same socket and image. pluginhost removes the directory once
// connected "so that a host that is killed (SIGKILL, the OOM killer) leaves
// none", but one killed before that left it for good: one per kill. Now
// the next launch removes it (pluginhost's sweepSockDirs).
func TestServeLifecycleKilledDuringStartLeavesNoTempDir(t *testing.T) {
	bin := soakBin(t, "blk-raw")
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			tmp, err := os.MkdirTemp("/tmp", "s94") // short: socket paths
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(tmp) })
			t.Setenv("TMPDIR", tmp)
			img := filepath.Join(dir, "disk.img")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, "blk.sock")
			args := []string{"--socket", sock, "--disk", "path=" + img + ",format=raw"}
			s := startServe(t, bin, args...)
			deadline := time.Now().Add(20 * time.Second)
			for {
				if m, _ := filepath.Glob(filepath.Join(tmp, "krun.*", "blk-raw-*")); len(m) > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the plugin's socket directory never appeared")
				}
				time.Sleep(200 * time.Microsecond)
			}
			s.cmd.Process.Signal(sig)
			select {
			case <-s.done:
			case <-time.After(40 * time.Second):
				t.Fatal("serve did not exit")
			}
			// A killed serve's plugin dies of its parent-death
			// signal, which a loaded machine delivers late: until
			// then it holds the image's lock (the next serve is
			// refused, as in CI run 30) and may still make its
			// socket in $TMPDIR.
			waitImageUnlocked(t, img, 20*time.Second)
			left := func() []string { return leftInTmp(tmp) }
			if names := left(); len(names) > 0 {
				if sig != syscall.SIGKILL {
					t.Errorf("left in $TMPDIR after %v during start-up: %v", sig, names)
				}
				// A killed serve cannot remove its directory; the next
				// launch removes it once it is old enough to be no
				// live host's (aged here rather than waited for).
				old := time.Now().Add(-time.Hour)
				for _, n := range names {
					os.Chtimes(filepath.Join(tmp, n), old, old)
				}
			}
			// A new serve starts on the same socket and image.
			s2 := startServe(t, bin, args...)
			waitSocket(t, s2, sock)
			servingPid(t, s2)
			if names := left(); len(names) > 0 {
				t.Errorf("left in $TMPDIR after %v during start-up, and after the next serve's launch: %v", sig, names)
			}
			s2.cmd.Process.Signal(syscall.SIGTERM)
			if code := s2.waitExit(t); code != 0 {
				t.Errorf("second serve: exit %d after SIGTERM", code)
			}
		})
	}
}

// waitImageUnlocked waits until no open file holds a lock on img that a
// read-write open would meet, i.e. every process that had the image open
// (a plugin that outlived its killed serve) has closed it or exited, and
// fails the test if that takes more than within.
func waitImageUnlocked(t *testing.T, img string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		f, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = imagelock.Lock(f, "image", img, imagelock.ReadWrite)
		f.Close() // releases what Lock took
		var inUse *imagelock.InUseError
		switch {
		case err == nil:
			return
		case !errors.As(err, &inUse):
			t.Fatal(err)
		case time.Now().After(deadline):
			t.Fatalf("%v, %v after serve exited", err, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServeLifecycleSIGTERMWhileBusy sends SIGTERM to serve in states a front-end
// or the restart logic can hold it in: serve must exit 0 promptly (the
// usage: "SIGTERM or SIGINT flushes the device and exits 0") and remove
// its socket. Six kills in a row (each within 60s/10 of the last) make the
// last restart's back-off DefaultRestartMaxBackoff, 4 s, longer than the
// case's limit: serve slept it out, and started a plugin, before it even
// looked at the signal (a 1 s back-off passed the limit unloaded, but a
// plugin's start on a loaded machine could push it over).
func TestServeLifecycleSIGTERMWhileBusy(t *testing.T) {
	bin := soakBin(t, "blk-raw")
	for _, tc := range []struct {
		name  string
		steps int // front-end steps before SIGTERM; -1 none
		kills int // plugin kills just before SIGTERM (restart back-off)
		limit time.Duration
	}{
		{"connected-no-owner", 0, 0, 5 * time.Second},
		{"rings-running", len(soakSteps), 0, 5 * time.Second},
		{"during-restart-backoff", -1, 6, 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk.img")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, "blk.sock")
			s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw", "--plugin-restarts", "10/60s")
			waitSocket(t, s, sock)
			pid := servingPid(t, s)
			if tc.steps >= 0 {
				c, err := frontend.Dial(sock)
				if err != nil {
					t.Fatal(err)
				}
				f := &soakFrontend{c: c}
				defer f.close()
				for _, st := range soakSteps[:tc.steps] {
					if err := st.do(f); err != nil {
						t.Fatalf("%s: %v", st.name, err)
					}
				}
			}
			for i := 1; i <= tc.kills; i++ {
				if i < tc.kills {
					pid = killPlugin(t, s, pid, i)
					continue
				}
				syscall.Kill(pid, syscall.SIGKILL)
				deadline := time.Now().Add(10 * time.Second)
				for !strings.Contains(s.log(), fmt.Sprintf("restart=%d", i)) {
					if time.Now().After(deadline) {
						t.Fatal("no restart line")
					}
					time.Sleep(5 * time.Millisecond)
				}
				if want := fmt.Sprintf("restart=%d delay=%v", i, pluginhost.DefaultRestartMaxBackoff); !strings.Contains(s.log(), want) {
					t.Fatalf("the last restart's back-off is not the longest (no %q in the log)", want)
				}
			}
			start := time.Now()
			s.cmd.Process.Signal(syscall.SIGTERM)
			code := s.waitExit(t)
			took := time.Since(start)
			t.Logf("exit %d after %v", code, took.Round(time.Millisecond))
			if code != 0 {
				t.Errorf("exit %d after SIGTERM, want 0", code)
			}
			if took > tc.limit {
				t.Errorf("SIGTERM took %v to end serve, want under %v", took.Round(time.Millisecond), tc.limit)
			}
			if tc.kills > 0 && !strings.Contains(s.log(), "shutting down: signal=terminated plugin=\"not running (restart back-off)\"") {
				t.Errorf("no line saying serve ended during the restart's back-off")
			}
			if _, err := os.Lstat(sock); err == nil {
				t.Errorf("socket left after SIGTERM")
			}
		})
	}
}

// TestServeSIGTERMDuringHungRestart: a SIGTERM that comes while serve
// restarts a plugin that hangs before its handshake ends serve at once
// (exit 0, the socket removed, the hung plugin killed), not after the
// handshake's timeout: serve waited for go-plugin's start, which nothing
// could end, for up to --handshake-timeout.
func TestServeSIGTERMDuringHungRestart(t *testing.T) {
	bin, plug := buildHangOnRestart(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw",
		"--plugin-restarts", "10/60s", "--handshake-timeout", "60s")
	waitSocket(t, s, sock)
	if err := syscall.Kill(servingPid(t, s), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The restart's plugin runs, and hangs.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(s.log(), "plugin lost; restarting it") || len(processesNamed(plug)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no restart with its plugin running within 20 s:\n%s", s.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if strings.Contains(s.log(), "plugin restarted") {
		t.Fatalf("the restarted plugin answered its handshake:\n%s", s.log())
	}
	start := time.Now()
	s.cmd.Process.Signal(syscall.SIGTERM)
	code := s.waitExit(t)
	took := time.Since(start)
	if code != 0 {
		t.Errorf("exit %d after SIGTERM, want 0:\n%s", code, s.log())
	}
	if took > 10*time.Second {
		t.Errorf("SIGTERM took %v to end serve (the handshake's timeout is 60 s)", took.Round(time.Millisecond))
	}
	if !strings.Contains(s.log(), `shutting down: signal=terminated plugin="not running (restart abandoned)"`) {
		t.Errorf("no line saying serve ended during the restart:\n%s", s.log())
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Errorf("socket left after SIGTERM")
	}
	waitPluginGone(t, plug)
}

// TestServeSIGTERMDuringHungStart: the same for serve's first start of its
// plugin: serve ends at once (exit 0, the plugin killed), where it waited
// for the handshake's timeout before it looked at the signal.
func TestServeSIGTERMDuringHungStart(t *testing.T) {
	bin, plug := buildHangOnRestart(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	marked := make([]byte, 1<<20)
	marked[0] = 'H' // as if started before: this start hangs
	if err := os.WriteFile(img, marked, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw", "--handshake-timeout", "60s")
	deadline := time.Now().Add(20 * time.Second)
	for len(processesNamed(plug)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the plugin never ran:\n%s", s.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	s.cmd.Process.Signal(syscall.SIGTERM)
	code := s.waitExit(t)
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("SIGTERM took %v to end serve (the handshake's timeout is 60 s)", took.Round(time.Millisecond))
	}
	if code != 0 {
		t.Errorf("exit %d after SIGTERM, want 0:\n%s", code, s.log())
	}
	if !strings.Contains(s.log(), `shutting down: signal=terminated plugin="not running (start abandoned)"`) {
		t.Errorf("no line saying serve ended during the plugin's start:\n%s", s.log())
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Errorf("socket made although nothing was served")
	}
	waitPluginGone(t, plug)
}

// buildHangOnRestart builds serve's binaries with testdata/hangonrestart
// as krun-plugin-blk-raw, and returns their directory and the plugin's path.
func buildHangOnRestart(t *testing.T) (bin, plug string) {
	t.Helper()
	bin = buildServeBinaries(t)
	plug = filepath.Join(bin, "krun-plugin-blk-raw")
	cmd := exec.Command("go", "build", "-trimpath", "-o", plug, "./testdata/hangonrestart")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return bin, plug
}

// waitPluginGone waits up to 5 s for no process to run plug.
func waitPluginGone(t *testing.T, plug string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(processesNamed(plug)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the hung plugin still runs: pids %v", processesNamed(plug))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// processesNamed lists the pids of running processes whose executable is
// exe.
func processesNamed(exe string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && target == exe {
			if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil {
				if i := bytes.LastIndexByte(st, ')'); i >= 0 && i+2 < len(st) && st[i+2] == 'Z' {
					continue
				}
			}
			pids = append(pids, pid)
		}
	}
	return pids
}
