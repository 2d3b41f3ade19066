package stdio

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestAlternatingExecOutputBounded: one-byte EXEC_STDOUT and
// EXEC_STDERR frames in turn never join (a chunk joins only the last one
// of its own stream), so while the session's writer lags each byte of the
// window is a chunk of its own: an execChunk in the queue (32 bytes, up to
// twice that in the slice's spare capacity) and an 8-byte allocation. The
// queue is said to be bounded by the window's bytes (256 KiB); here a
// guest holds far more than that in the plugin for one exec, and 16 execs
// at once multiply it.
//
// From review, helper-96; fixed: the output is one byte slice and runs of
// two bytes each (queueOutput); the bound here is the window's 256 KiB
// plus 2 bytes a run at most, with the slices' growth.
func TestAlternatingExecOutputBounded(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	e := newExecFiles(t)
	rec, _ := devopts.ExecRecord(6, []byte(`{}`))
	sendRecord(t, core, rec, e.send)
	if f := r.next(t); f.Type != stdioframe.Exec {
		t.Fatalf("frame %v, want EXEC", f.Type)
	}
	// One byte whose acknowledgement blocks the session's writer: the
	// guest reads no host frames from here on.
	r.guestW.WriteExec(stdioframe.ExecStdout, 6, []byte("x"))
	s := r.bridge.lookupExec(6)
	if s == nil {
		t.Fatal("session gone")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		q := s.queued
		n := len(s.runs)
		s.mu.Unlock()
		if n == 0 && q <= 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// The frames as the bridge's reader hands them over (the same
	// function fromGuest calls; the port is skipped only for speed).
	sent := 0
	payload := []byte{6, 0, 0, 0, 'a'}
	for i := 0; sent < stdioframe.ExecWindow-1; i++ {
		typ := stdioframe.ExecStdout
		if i%2 == 1 {
			typ = stdioframe.ExecStderr
		}
		r.bridge.fromGuestExec(stdioframe.Frame{Type: typ, Payload: payload})
		sent++
	}
	s.mu.Lock()
	chunks, queued := len(s.runs), s.queued
	s.mu.Unlock()
	runtime.GC()
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d one-byte frames, alternating streams: %d bytes queued in %d chunks; heap grew %d KiB (window %d KiB)",
		sent, queued, chunks, grew>>10, stdioframe.ExecWindow>>10)
	if limit := int64(4 * stdioframe.ExecWindow); grew > limit {
		t.Fatalf("one exec's queue holds %d KiB for a window of %d KiB (%d chunks): the window does not bound its memory; %d execs at once: about %d MiB",
			grew>>10, stdioframe.ExecWindow>>10, chunks, MaxExecs, grew*MaxExecs>>20)
	}
	runtime.KeepAlive(s)
}

// TestOutputRuns: the output comes back in the order it came, each run of
// one stream at most runMax bytes, consecutive frames of a stream joined.
func TestOutputRuns(t *testing.T) {
	s := &execSession{}
	big := make([]byte, 40000)
	for i := range big {
		big[i] = byte(i)
	}
	type in struct {
		data   []byte
		stderr bool
	}
	for _, f := range []in{{[]byte("ab"), false}, {[]byte("c"), false}, {[]byte("E"), true}, {big, false}, {big, false}, {[]byte("F"), true}} {
		s.queueOutput(f.data, f.stderr)
	}
	var out, errs []byte
	var got []int
	for len(s.runs) > 0 {
		data, stderr := s.nextRun()
		if len(data) > runMax {
			t.Fatalf("a run of %d bytes", len(data))
		}
		if stderr {
			errs = append(errs, data...)
			got = append(got, -len(data))
		} else {
			out = append(out, data...)
			got = append(got, len(data))
		}
	}
	want := []int{3, -1, runMax, runMax, 2*len(big) - 2*runMax, -1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("runs %v, want %v (negative: stderr)", got, want)
	}
	if string(out) != "abc"+string(big)+string(big) || string(errs) != "EF" {
		t.Error("the output's bytes came back changed")
	}
	if s.out != nil {
		t.Error("a drained output keeps its buffer")
	}
}
