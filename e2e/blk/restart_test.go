package blk_test

import (
	"fmt"
	"math/rand/v2"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/vmtest"
)

const (
	// serveRestartKills is how many times each disk's plugin is killed.
	serveRestartKills = 20
	// serveRestartMiB is the size of each disk the guest's loop writes
	// and verifies per pass: the 64 MiB over two disks makes a
	// pass take minutes under TCG on a loaded 2-core machine; 32 MiB per
	// disk, every pass verified in full, as many passes as the kills take.
	serveRestartMiB = 32
)

// restartGuestScript is blkverify's write-then-verify loop (O_DIRECT,
// patterns unique per pass, device and offset) on both disks until the
// host types "stop" on the console; then the kernel log must hold no I/O
// error.
var restartGuestScript = fmt.Sprintf(`
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.5; done
[ -b /dev/vdb ] || e2e_fail "no /dev/vda and /dev/vdb"
blkverify -size %d -depth 8 -chunk 262144 -stop /tmp/stop /dev/vda /dev/vdb &
vpid=$!
read -t 3000 line || e2e_fail "no stop line on the console"
touch /tmp/stop
rc=0
wait $vpid || rc=$?
[ $rc = 0 ] || e2e_fail "blkverify exited $rc"
if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|critical'; then
	e2e_fail "the kernel logged I/O errors"
fi
echo "guest verify ok"
`, serveRestartMiB<<20)

var (
	serveRestartedRE = regexp.MustCompile(`plugin restarted; serving again: .*took=([0-9.]+[mµn]?s)`)
	regionRE         = regexp.MustCompile(`in-flight region from the front-end`)
	replayedRE       = regexp.MustCompile(`resubmitting requests a previous back-end left in flight: .*requests=([0-9]+)`)
)

// TestServeRestartUnderIO serves a raw and a qcow2 disk with `krun-core
// serve` to QEMU (vhost-user-blk-pci, -chardev socket,...,reconnect=1)
// while a guest runs a write-then-verify loop on both, and kills each
// serve's plugin with SIGKILL 20 times at random moments. serve restarts
// its plugin on the same socket, QEMU reconnects and replays the requests
// in flight through the inflight region (VHOST_USER_PROTOCOL_F_
// INFLIGHT_SHMFD); the guest's loop must finish with every byte right and
// no I/O error in its kernel log, and qemu-img check must find no
// corruption in the qcow2 image.
func TestServeRestartUnderIO(t *testing.T) {
	a := vmtest.Require(t)
	qemuImg := tool(t, "qemu-img")
	dir := t.TempDir()
	raw := newRawImage(t, dir, "restart.raw", serveRestartMiB<<20, nil)
	q := dir + "/restart.qcow2"
	run(t, qemuImg, "create", "-q", "-f", "qcow2", q, strconv.Itoa(serveRestartMiB<<20))
	servers := []*server{
		serve(t, "path="+raw+",format=raw", "--plugin-restarts", "1000/10m", "--log-level", "debug"),
		serve(t, "path="+q+",format=qcow2", "--plugin-restarts", "1000/10m", "--log-level", "debug"),
	}

	ib := a.NewInitramfs()
	ib.AddFile("/bin/blkverify", vmtest.BuildStatic(t, "github.com/krun-core/krun-core/internal/vmtest/blkverify"), 0o755)
	ib.AddModules(a.Kernel, "virtio_pci", "virtio_blk")
	ib.SetInit(restartGuestScript)
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 30 * time.Minute})
	for i, s := range servers {
		id := fmt.Sprintf("vubr%d", i)
		vm.AddArgs("-chardev", fmt.Sprintf("socket,id=%s,path=%s,reconnect=1", id, s.Socket),
			"-device", "vhost-user-blk-pci,chardev="+id+",num-queues=1")
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	vm.MustExpect(`BLKVERIFY start`, 5*time.Minute)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	for k := 1; k <= serveRestartKills; k++ {
		for _, s := range servers {
			// QEMU is connected to this plugin (it reconnects within a
			// second of a restart); then a random moment, up to a
			// second into the guest's I/O.
			s.waitConnected(t, k)
			time.Sleep(time.Duration(rng.IntN(1000)) * time.Millisecond)
			s.killPlugin(t)
			s.waitRestarts(t, k)
		}
	}
	// One more pass after the last kill, then stop.
	n := strings.Count(vm.Console(), "BLKVERIFY /dev/vdb pass")
	// A FAIL line ends the wait: the device that failed has no next pass.
	m := vm.MustExpect(fmt.Sprintf(`BLKVERIFY /dev/vdb pass %d ok|BLKVERIFY FAIL [^\n]*`, n+1), 15*time.Minute)
	if strings.HasPrefix(m[0], "BLKVERIFY FAIL") {
		vm.Kill()
		t.Fatalf("guest: %s", m[0])
	}
	if err := vm.Send("stop\n"); err != nil {
		t.Fatal(err)
	}
	r := vm.MustWait()
	for _, want := range []string{"BLKVERIFY done", "guest verify ok"} {
		if !strings.Contains(r.Console, want) {
			t.Fatalf("guest console lacks %q", want)
		}
	}
	var took []time.Duration
	replayed := 0
	for _, s := range servers {
		for _, m := range serveRestartedRE.FindAllStringSubmatch(s.Out.String(), -1) {
			if d, err := time.ParseDuration(m[1]); err == nil {
				took = append(took, d)
			}
		}
		// QEMU hands the in-flight region to every new plugin (the
		// first one and one per kill), so the plugins the kills started
		// can replay what their predecessors had taken.
		if n := len(regionRE.FindAllString(s.Out.String(), -1)); n < serveRestartKills+1 {
			t.Errorf("serve %s: %d plugins got an in-flight region from QEMU, want %d (one per connection)", s.Socket, n, serveRestartKills+1)
		}
		for _, m := range replayedRE.FindAllStringSubmatch(s.Out.String(), -1) {
			n, _ := strconv.Atoi(m[1])
			replayed += n
		}
		s.Stop()
	}
	// How many requests a kill caught in flight is up to timing (an
	// emulated guest leaves its rings idle most of the time; 0 or 1 in 40
	// kills here): replay itself is tested deterministically in
	// vhostuser/backend and core/vmm; here the guest's verify pass shows
	// that none was lost or done twice.
	t.Logf("requests in flight replayed after the kills: %d", replayed)
	if len(took) != 2*serveRestartKills {
		t.Errorf("%d restarts logged, want %d", len(took), 2*serveRestartKills)
	}
	if len(took) > 0 {
		sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
		t.Logf("serve restarts: %d, plugin death to serving again: median %v, worst %v", len(took), took[len(took)/2], took[len(took)-1])
	}
	out, _ := exec.Command(qemuImg, "check", "--output=json", q).Output()
	if !strings.Contains(string(out), `"check-errors": 0`) || strings.Contains(string(out), `"corruptions"`) {
		t.Fatalf("qemu-img check of the qcow2 image:\n%s", out)
	}
	t.Logf("qemu-img check: %s", strings.Join(strings.Fields(string(out)), " "))
}

// killPlugin SIGKILLs the server's plugin process.
func (s *server) killPlugin(t *testing.T) {
	t.Helper()
	for _, pid := range daemontest.Children(s.Cmd.Process.Pid) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			return
		}
	}
	t.Fatalf("krun-core serve (pid %d) has no plugin to kill\n%s", s.Cmd.Process.Pid, s.Out)
}

// waitRestarts waits until serve has restarted its plugin n times.
func (s *server) waitRestarts(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for strings.Count(s.Out.String(), "plugin restarted; serving again") < n {
		select {
		case <-s.Done():
			t.Fatalf("krun-core serve exited: %v\n%s", s.Err(), s.Out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("restart %d did not complete\n%s", n, s.Out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitConnected waits until the server's plugins have accepted n front-end
// connections (QEMU's first, and one after each of n-1 restarts).
// It waits for the n-th connection's queue to start, not for the
// connection alone: QEMU does not recover from a back-end that dies while
// it sets the device up again (its start fails with "Failed to set msg
// fds", and the disk stays stopped through every later reconnection; seen
// once in CI under load, the kill 137 ms after the connection). That is
// QEMU's limit, not the restart this test is about: the kills land once
// the guest's I/O runs.
func (s *server) waitConnected(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !nthStarted(s.Out.String(), n) {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU did not connect (%d)\n%s", n, s.Out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nthStarted says whether out shows a queue started after the n-th
// "vhost-user front-end connected" line.
func nthStarted(out string, n int) bool {
	for range n {
		i := strings.Index(out, "vhost-user front-end connected")
		if i < 0 {
			return false
		}
		out = out[i+1:]
	}
	return strings.Contains(out, "queue started")
}
