package vmm

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestRunEndNotHeldByStolenInput: poll said the caller's input was ready,
// but another reader of the same file took it first, so the pump's read
// blocks until the user types again. The run's end waited for the pump
// without a bound, and Start never returned; it now waits inputPumpGrace
// and warns (left open in the last note; fixed here).
func TestRunEndNotHeldByStolenInput(t *testing.T) {
	r, w := inputPipe(t)
	logs := &syncbuf.Buffer{}
	m := consoleMachine()
	m.log = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Warn})
	inRead := make(chan struct{})
	release := make(chan struct{})
	m.readInput = func(fd int, p []byte) (int, error) {
		close(inRead)
		<-release // what poll saw is gone: the read waits for more
		return 0, nil
	}
	defer close(release)
	stop := startPumpUntilRead(t, m, r, w, inRead)
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(inputPumpGrace + 5*time.Second):
		t.Fatal("the run's end waits for a console input pump blocked in read: Start would not return until the user typed")
	}
	if !strings.Contains(logs.String(), "console input: its pump waits in a read") {
		t.Errorf("no warning about the pump left in read; log: %q", logs.String())
	}
}

// startPumpUntilRead starts m's console input pump on r, writes a byte to
// w and waits until the pump's read (m.readInput, which closes inRead)
// has begun; it returns what ends the run (Start's deferred call).
func startPumpUntilRead(t *testing.T, m *machine, r, w *os.File, inRead <-chan struct{}) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stop = m.startInputPump(ctx, cancel, r)
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inRead:
	case <-time.After(5 * time.Second):
		t.Fatal("the pump never read the input poll reported")
	}
	return stop
}
