package main

import (
	"context"
	"errors"
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
	needTools(t, "qemu-img", "strace")
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			si := serveImage(t, bin, format, "")
			b := si.blk
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
			detach := injectFaults(t, si.pid, "-e", "trace=fsync,fdatasync", "-e", "inject=fsync,fdatasync:error=EIO")
			err := b.Flush(ctx)
			detach()
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
			killPlugin(t, si.serve, si.pid, 1)
			c, err := frontend.Dial(si.sock)
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
