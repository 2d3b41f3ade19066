package main

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/boot/boottest"
)

// TestRunEarlyFailureKeepsItsLine: a run that fails after its output pipes
// were made (the command is not executable) still has its one line in the
// caller's buffer once the pipes' copies end. The copies used to outlive
// run, their write ends left to the garbage collector, and an io.Copy into
// the bytes.Buffer truncated it when the pipe closed (CI of stop 45:
// "exit 126, stderr \"\"").
func TestRunEarlyFailureKeepsItsLine(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/data"), []byte("x"), 0o644)
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	for i := range 20 {
		var out, errb bytes.Buffer
		rc := runCommand([]string{"--kernel", k, "--root", root, "--", "/bin/data"}, &out, &errb)
		// Whatever run left behind runs now: finalizers close
		// forgotten pipes, copies end.
		runtime.GC()
		runtime.GC()
		time.Sleep(5 * time.Millisecond)
		if got := errb.String(); rc != exitNotExecutable || !strings.Contains(got, "not executable") || strings.Count(got, "\n") != 1 {
			t.Fatalf("try %d: exit %d, stderr %q; want %d and one line saying not executable", i, rc, got, exitNotExecutable)
		}
	}
}

// TestOutputPipesCopyAllBeforeClose: what was written into a pipe's write
// end (the console plugin's copy) is in the buffer when close returns, and
// krun-core's own lines written meanwhile are kept with it.
func TestOutputPipesCopyAllBeforeClose(t *testing.T) {
	var buf bytes.Buffer
	p := &outputPipes{}
	w := p.lock(&buf)
	f, err := p.fileOf(&buf)
	if err != nil {
		t.Fatal(err)
	}
	// A second write end, as the console plugin holds one.
	other, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(int(f.Fd())), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	chunk := strings.Repeat("c", 1000) + "\n"
	for range 100 {
		other.WriteString(chunk)
		w.Write([]byte("own\n"))
	}
	other.Close()
	p.close()
	got := buf.String()
	if n := strings.Count(got, chunk); n != 100 {
		t.Errorf("%d of 100 chunks copied", n)
	}
	if n := strings.Count(got, "own\n"); n != 100 {
		t.Errorf("%d of 100 own lines kept", n)
	}
}
