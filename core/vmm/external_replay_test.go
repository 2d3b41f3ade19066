package vmm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// replayHelperEnv, set in the environment of the test binary run again as
// a child (TestExternalReplayHelperProcess), names the socket, the image
// and the byte offset of the write the child's back-end takes and never
// completes, one a line.
const replayHelperEnv = "KRUN_VMM_TEST_REPLAY_BACKEND"

// replayLimit bounds each wait of TestExternalReplay: a broken replay
// fails the test with a message instead of hanging it.
const replayLimit = 20 * time.Second

// TestExternalReplayHelperProcess is not a test: run as a child of
// TestExternalReplay (replayHelperEnv set) it is the first back-end, the
// same in-process blk back-end as TestExternalReconnect's but over a disk
// whose write at the chosen offset never returns. It prints "listening"
// once its socket listens and "taken" when that write reached the disk
// (its request is taken off the ring and marked in the inflight region),
// and kills itself with SIGKILL as soon as anything (a byte, or EOF)
// arrives on its standard input: the parent decides when it dies, and the
// child cannot outlive it.
func TestExternalReplayHelperProcess(t *testing.T) {
	env := os.Getenv(replayHelperEnv)
	if env == "" {
		return // an ordinary run: nothing to do
	}
	parts := strings.Split(env, "\n")
	if len(parts) != 3 {
		fmt.Fprintf(os.Stderr, "%s=%q: want socket, image and offset\n", replayHelperEnv, env)
		os.Exit(2)
	}
	sock, img := parts[0], parts[1]
	off, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	die := func() { syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	go func() {
		var b [1]byte
		os.Stdin.Read(b[:]) // the parent's word, or its end
		die()
	}()
	time.AfterFunc(2*time.Minute, die) // a watchdog, whatever happens

	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	dk, err := raw.Open(f, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := blk.New(blk.Config{Disk: &stuckWriteDisk{Disk: dk, off: off}})
	if err != nil {
		t.Fatal(err)
	}
	ln := backendtest.Listen(t, sock)
	fmt.Println("listening")
	err = backend.Serve(context.Background(), ln, dev, nil)
	fmt.Fprintf(os.Stderr, "Serve returned: %v\n", err)
	select {} // the parent kills this process
}

// stuckWriteDisk is a disk whose write at off never returns. It embeds
// only disk.Disk, so blk sees no vectored write path and every write goes
// through WriteAt.
type stuckWriteDisk struct {
	disk.Disk
	off int64
}

func (d *stuckWriteDisk) WriteAt(p []byte, off int64) (int, error) {
	if off == d.off {
		fmt.Println("taken")
		select {}
	}
	return d.Disk.WriteAt(p, off)
}

// replayChild is the first back-end's process (TestExternalReplayHelperProcess).
type replayChild struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *syncbuf.Buffer
	exited chan struct{}
}

func startReplayChild(t *testing.T, sock, img string, off int64) *replayChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestExternalReplayHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), replayHelperEnv+"="+sock+"\n"+img+"\n"+strconv.FormatInt(off, 10))
	c := &replayChild{cmd: cmd, lines: make(chan string, 16), stderr: &syncbuf.Buffer{}, exited: make(chan struct{})}
	cmd.Stderr = c.stderr
	var err error
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			c.lines <- s.Text()
		}
		close(c.lines)
		cmd.Wait() // only once stdout is read to its end
		close(c.exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-c.exited
		if t.Failed() {
			t.Logf("first back-end (pid %d) stderr:\n%s", cmd.Process.Pid, c.stderr.String())
		}
	})
	return c
}

// expect waits for the child to print want.
func (c *replayChild) expect(t *testing.T, want string) {
	t.Helper()
	timeout := time.After(replayLimit)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				t.Fatalf("first back-end exited before printing %q (%v)", want, c.cmd.ProcessState)
			}
			if l == want {
				return
			}
		case <-timeout:
			t.Fatalf("first back-end did not print %q within %v", want, replayLimit)
		}
	}
}

// kill has the child kill itself (SIGKILL) and waits for it to be gone.
func (c *replayChild) kill(t *testing.T) {
	t.Helper()
	c.stdin.Write([]byte{1})
	select {
	case <-c.exited:
	case <-time.After(replayLimit):
		t.Fatalf("first back-end still runs %v after it was told to die", replayLimit)
	}
	ws, ok := c.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("first back-end ended with %v, not SIGKILL", c.cmd.ProcessState)
	}
}

// usedRing returns the used index and the ids of the used elements
// below it.
func usedRing(r *ringDriver) (uint16, []uint32) {
	idx := r.idx(rdUsed + 2)
	ids := make([]uint32, idx)
	for i := range ids {
		ids[i] = binary.LittleEndian.Uint32(r.get(rdUsed+4+8*uint64(i%rdQueueSize), 4))
	}
	return idx, ids
}

// TestExternalReplay: an external back-end (reconnect=, with an inflight
// region) is SIGKILLed while it holds a write it took off the avail ring
// and never completed, after a write made available behind it completed:
// the used index then stands past the held write. The core notices the
// hang-up, connects to the socket again and gives the back-end listening
// there the inflight region, from which it replays the held write. The
// write completes exactly once with status OK and reads back, and the
// completed one is not served again. Without the replay the new back-end
// would start at the used index, serve the completed write a second time
// and never the held one.
func TestExternalReplay(t *testing.T) {
	dir := shortDir(t)
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	const (
		slotA, sectorA = 0, 16 // held by the first back-end
		slotB, sectorB = 1, 24 // completed by it
		headA, headB   = slotA * 3, slotB * 3
	)
	child := startReplayChild(t, sock, img, sectorA*512)
	child.expect(t, "listening")
	d, drv, logs := reconnectRig(t, "type=blk,reconnect=0.05,socket="+sock)
	if d.inflight == nil {
		t.Fatal("no inflight region from a back-end that offers INFLIGHT_SHMFD")
	}
	drv.start()

	// Both writes become available at once (one avail index store, one
	// kick): the back-end takes A and hands it to a worker (more is
	// pending), then takes B, which completes while A is stuck in the
	// disk.
	a := bytes.Repeat([]byte{0xa5}, 512)
	b := bytes.Repeat([]byte{0xb6}, 512)
	drv.stage(slotA, sectorA, a)
	drv.stage(slotB, sectorB, b)
	drv.publish()
	child.expect(t, "taken")
	for deadline := time.Now().Add(replayLimit); ; time.Sleep(5 * time.Millisecond) {
		if idx, ids := usedRing(drv); idx == 1 && ids[0] == headB {
			break
		} else if idx > 1 || (idx == 1 && ids[0] != headB) {
			t.Fatalf("before the kill: used index %d, used ids %v; want only B (head %d)", idx, ids, headB)
		}
		if time.Now().After(deadline) {
			t.Fatalf("write B not completed by the first back-end within %v", replayLimit)
		}
	}
	if st := drv.get(uint64(rdBufs+slotA*0x1000+0x100), 1)[0]; st != 0xff {
		t.Fatalf("held write A has status %d before the kill", st)
	}

	// The back-end dies holding A; a new one listens on the socket.
	child.kill(t)
	waitLog(t, d, logs, "vhost-user back-end lost; reconnecting", 1)
	os.Remove(sock) // the dead back-end's
	srv, err := backend.NewServer(blkTestDevice(t, img), nil)
	if err != nil {
		t.Fatal(err)
	}
	backendtest.Serve(t, srv, sock)
	waitLog(t, d, logs, reconnected, 1)

	// A completes, once, with status OK; B is not served again.
	for deadline := time.Now().Add(replayLimit); ; time.Sleep(5 * time.Millisecond) {
		if idx, _ := usedRing(drv); idx >= 2 {
			break
		}
		if time.Now().After(deadline) {
			idx, ids := usedRing(drv)
			t.Fatalf("nothing completed by the new back-end within %v (used index %d, used ids %v): write A (head %d) not replayed",
				replayLimit, idx, ids, headA)
		}
	}
	time.Sleep(200 * time.Millisecond) // room for a second, wrong completion
	if idx, ids := usedRing(drv); idx != 2 || ids[0] != headB || ids[1] != headA {
		t.Fatalf("used index %d, used ids %v; want 2, [%d %d] (B, then A replayed once)", idx, ids, headB, headA)
	}
	if st := drv.get(uint64(rdBufs+slotA*0x1000+0x100), 1)[0]; st != 0 {
		t.Fatalf("replayed write A: status %d", st)
	}
	if st := srv.Stats(); len(st) < 1 || st[0].Resubmitted != 1 || st[0].Requests != 1 {
		t.Fatalf("new back-end's queue 0: %+v; want 1 request, resubmitted from the inflight region", st)
	}

	// Both writes read back through the new back-end, and are on the image.
	drv.readBack(2, sectorA, 3, a, replayLimit)
	drv.readBack(3, sectorB, 4, b, replayLimit)
	imageHolds(t, img, map[uint64][]byte{sectorA: a, sectorB: b})
}
