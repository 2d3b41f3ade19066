package vmm

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/serial"
)

// TestPumpEventfdNotWrittenAfterClose: pumpFD closed its eventfd (defer
// unix.Close(stop)) without waiting for the goroutine that writes the
// eventfd when ctx ends. When the pump returns for a reason of its own
// while ctx is done (poll saw input and ctx.Err() != nil; receive saw
// ctx.Done), that goroutine's select has both ctx.Done and ended ready and
// may still pick ctx.Done: it then writes 8 bytes into a descriptor number
// that is closed - or, by then, another file's.
//
// From review, helper-105; fixed: the eventfd is closed once that
// goroutine has ended.
func TestPumpEventfdNotWrittenAfterClose(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	dir := t.TempDir()
	hits := 0
	for i := 0; i < 64 && hits == 0; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte("x")) // input ready: poll returns at once
		m := &machine{uart: serial.New(io.Discard, nil), log: hclog.NewNullLogger()}
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // the run has ended
		m.pumpInput(ctx, r)
		// The eventfd's number is free again: the next file opened gets it.
		p := filepath.Join(dir, "victim")
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond) // the pump's goroutine runs now
		f.Close()
		b, _ := os.ReadFile(p)
		if len(b) > 0 {
			hits++
			t.Errorf("iteration %d: the pump's eventfd goroutine wrote %d bytes %v into an unrelated file that took the eventfd's descriptor number after the pump closed it", i, len(b), b)
		}
		r.Close()
		w.Close()
	}
}
