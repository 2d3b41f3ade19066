package vmm

// From review (helper-97): a guest's console output after the reader of
// krun-core's standard output went away (`krun-core run --kernel K | head`,
// a `| tee` or a log collector that exited) kills the whole core with
// SIGPIPE. The UART means to survive this ("keep running; the console just
// stops": serial.UART.OutputError, and Start's "console output failed"
// warning), but Go's runtime turns EPIPE from a write on file descriptor 1
// or 2 through an *os.File into a SIGPIPE death unless the program
// handles SIGPIPE (os/signal: "If the program is not calling signal.Notify
// for SIGPIPE ... a broken pipe causes the program to exit with SIGPIPE").
// Nothing in krun-core does for `run --kernel`, so the core dies in the
// middle of the guest's run: no tear-down, plugins SIGKILLed by their
// Pdeathsig (no flush, no graceful shutdown), the terminal left in the raw
// mode run put stdin in, no Result.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/serial"
)

const brokenStdoutHelperEnv = "KRUN_VMM_TEST_BROKEN_STDOUT"

// TestConsoleOnBrokenStdoutHelperProcess is not a test: run as a child of
// TestConsoleOnBrokenStdoutKeepsCoreAlive it makes its standard output a
// pipe nobody reads, wires the console as Start does for a caller that
// passed os.Stdout to SetConsoleOutput (what `krun-core run --kernel`
// does), and has the guest transmit bytes on COM1.
func TestConsoleOnBrokenStdoutHelperProcess(t *testing.T) {
	if os.Getenv(brokenStdoutHelperEnv) == "" {
		return
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		fmt.Fprintln(os.Stderr, "pipe:", err)
		os.Exit(2)
	}
	unix.Close(p[0]) // the reader went away
	if err := unix.Dup3(p[1], 1, 0); err != nil {
		fmt.Fprintln(os.Stderr, "dup3:", err)
		os.Exit(2)
	}
	c := NewContext(nil)
	c.SetConsoleOutput(os.Stdout)
	m := newTestMachine(&bytes.Buffer{})
	m.uart.SetOutput(&markerWriter{w: c.consoleOut, marker: []byte(c.bootMarker)})
	for _, b := range []byte("guest output\n") {
		m.pio(serial.COM1Base, true, []byte{b})
	}
	if m.uart.OutputError() == nil {
		fmt.Fprintln(os.Stderr, "no output error recorded")
		os.Exit(3)
	}
	fmt.Fprintln(os.Stderr, "core still alive")
	os.Exit(0)
}

func TestConsoleOnBrokenStdoutKeepsCoreAlive(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestConsoleOnBrokenStdoutHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), brokenStdoutHelperEnv+"=1")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("helper did not finish within 30 s")
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		t.Fatalf("the core died of %v when the guest wrote to its console after stdout's reader went away (want: the console stops, the VM runs on); stderr: %q",
			ws.Signal(), errb.String())
	}
	if err != nil || !strings.Contains(errb.String(), "core still alive") {
		t.Fatalf("helper: %v; stderr: %q", err, errb.String())
	}
}

// TestRawFileWriter: the console's writer for a file passes every byte,
// also when the pipe is full and Go's poller must wait (os.Pipe's ends
// are non-blocking), and reports a reader's going away as EPIPE.
func TestRawFileWriter(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	want := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB, past any pipe's buffer
	errc := make(chan error, 1)
	go func() {
		n, err := rawFileWriter{w}.Write(want)
		if err == nil && n != len(want) {
			err = fmt.Errorf("wrote %d of %d bytes", n, len(want))
		}
		w.Close()
		errc <- err
	}()
	var got bytes.Buffer
	if _, err := got.ReadFrom(r); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("read %d bytes, not the %d written", got.Len(), len(want))
	}
	r2, w2, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	r2.Close()
	if _, err := (rawFileWriter{w2}).Write([]byte("x")); err != unix.EPIPE {
		t.Fatalf("write to a pipe without a reader: %v, want EPIPE", err)
	}
}
