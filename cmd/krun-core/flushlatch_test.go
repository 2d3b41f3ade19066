package main

import (
	"bufio"
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestFailedFlushSurvivesRestart: the disk plugins keep the
// "an fdatasync failed" latch (disk.ErrSyncFailed) in the process, so that
// every FLUSH after a failed one fails: Linux reports a lost writeback to
// one fdatasync only. A plugin that is killed and restarted by serve (the
// guest sees only a pause, its requests replayed) starts with a clear
// latch, on an image whose writeback was lost: the guest's next FLUSH is
// acknowledged OK, so the write it made before the failed flush is now
// promised durable although it never reached stable storage.
//
// The failing fdatasync is injected into the running plugin with strace
// (-e inject=fsync,fdatasync:error=EIO), for the first FLUSH only.
//
// From review, helper-101; fixed: the blk device records a failed sync in
// its state in the front-end's inflight region (backend.DeviceState), and
// a restarted plugin's device latches its disk from it.
func TestFailedFlushSurvivesRestart(t *testing.T) {
	for _, tool := range []string{"qemu-img", "strace"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk."+format)
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", format, img, "16M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
			sock := filepath.Join(dir, "blk.sock")
			s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format="+format, "--plugin-restarts", "5/60s")
			waitSocket(t, s, sock)
			pid := servingPid(t, s)
			b, err := testguest.DialBlk(sock, testguest.Options{Inflight: true, QueueSize: 64})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			data := make([]byte, 4096)
			for i := range data {
				data[i] = 0xa5
			}
			if err := b.Write(ctx, 8, data); err != nil {
				t.Fatal(err)
			}

			// The host's fdatasync fails for this FLUSH (a lost writeback).
			st := exec.Command("strace", "-f", "-p", strconv.Itoa(pid), "-e", "trace=fsync,fdatasync", "-e", "inject=fsync,fdatasync:error=EIO")
			se, _ := st.StderrPipe()
			if err := st.Start(); err != nil {
				t.Fatal(err)
			}
			attached, exited := make(chan struct{}), make(chan string, 1)
			go func() {
				sc := bufio.NewScanner(se)
				once := false
				var all []string
				for sc.Scan() {
					all = append(all, sc.Text())
					if !once && strings.Contains(sc.Text(), "attached") {
						once = true
						close(attached)
					}
				}
				exited <- strings.Join(all, "\n")
			}()
			select {
			case <-attached:
			case out := <-exited:
				t.Skipf("strace cannot attach to the plugin here: %s", out)
			case <-time.After(10 * time.Second):
				t.Fatal("strace did not attach")
			}
			time.Sleep(200 * time.Millisecond) // every thread attached
			err = b.Flush(ctx)
			st.Process.Signal(syscall.SIGTERM) // detach
			st.Wait()
			var se2 *testguest.BlkStatusError
			if !errors.As(err, &se2) {
				t.Fatalf("FLUSH with fdatasync failing: %v, want an I/O error status", err)
			}
			// The same plugin remembers it.
			if err := b.Flush(ctx); !errors.As(err, &se2) {
				t.Fatalf("second FLUSH in the same plugin: %v, want an I/O error (the latch)", err)
			}

			// The plugin dies and serve restarts it; the guest reconnects,
			// as QEMU's reconnect=1 does, and retries its FLUSH.
			killPlugin(t, s, pid, 1)
			c, err := frontend.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Guest().Reconnect(c); err != nil {
				t.Fatal(err)
			}
			if err := b.Flush(ctx); err == nil {
				t.Fatalf("FLUSH after the plugin's restart succeeded: the write acknowledged before the failed fdatasync is now reported durable, though its writeback was lost (the failed-sync latch lived only in the killed plugin)")
			}
		})
	}
}
