package stdio

import (
	"context"
	"fmt"
	"io"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// errWriter fails every write with err.
type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

// When the reader of krun-core's stdout or stderr goes away (`krun-core
// run -- yes | head -1`), the command is told the way a pipe tells a
// writer, with SIGPIPE: dropping its output alone left a command that
// writes for ever (yes) running for ever, and run with it. Other write
// errors (a terminal hung up: EIO, which brings its own SIGHUP) send
// nothing. At most one signal a stream, however much more it writes.
func TestBrokenPipeSignalsTheCommand(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream stdioframe.Type
		err    error
		signal bool
	}{
		{"stdout EPIPE", stdioframe.Stdout, syscall.EPIPE, true},
		{"stderr EPIPE", stdioframe.Stderr, fmt.Errorf("write /dev/stdout: %w", syscall.EPIPE), true},
		{"stdout EIO", stdioframe.Stdout, syscall.EIO, false},
		{"stderr closed", stdioframe.Stderr, io.ErrClosedPipe, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g2hR, g2hW := io.Pipe()
			h2gR, h2gW := io.Pipe()
			defer g2hW.Close()
			defer h2gR.Close()
			cfg := Config{Port: port{g2hR, h2gW}, Stdout: io.Discard, Stderr: io.Discard}
			if tc.stream == stdioframe.Stdout {
				cfg.Stdout = errWriter{tc.err}
			} else {
				cfg.Stderr = errWriter{tc.err}
			}
			b := New(cfg)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go b.Run(ctx)
			frames := make(chan stdioframe.Frame, 16)
			go func() {
				r := stdioframe.NewReader(h2gR, stdioframe.HostToGuest)
				for {
					f, err := r.Next()
					if err != nil {
						close(frames)
						return
					}
					frames <- stdioframe.Frame{Type: f.Type, Payload: append([]byte(nil), f.Payload...)}
				}
			}()
			w := stdioframe.NewWriter(g2hW)
			// The guest goes on writing; the bridge must go on draining it
			// whether or not anybody reads what the host sends.
			for range 3 {
				if err := w.WriteData(tc.stream, []byte("y\n")); err != nil {
					t.Fatal(err)
				}
			}
			if err := w.WriteFrame(stdioframe.CloseReq, nil); err != nil {
				t.Fatal(err)
			}
			// Every frame before CLOSE_REQ is handled once CLOSE_ACK comes;
			// the signal may follow it (it is sent on a goroutine of its
			// own): wait for it, or a while for a wrong one.
			var signals []uint8
			acked := false
			wait := time.After(5 * time.Second)
		collect:
			for {
				select {
				case f, ok := <-frames:
					if !ok {
						break collect
					}
					switch f.Type {
					case stdioframe.Signal:
						signals = append(signals, f.Signal())
					case stdioframe.CloseAck:
						acked = true
						if !tc.signal || len(signals) > 0 {
							wait = time.After(300 * time.Millisecond)
						}
					}
					if acked && tc.signal && len(signals) == 1 {
						wait = time.After(300 * time.Millisecond)
					}
				case <-wait:
					break collect
				}
			}
			if !acked {
				t.Fatal("no CLOSE_ACK")
			}
			switch {
			case tc.signal && (len(signals) != 1 || signals[0] != uint8(syscall.SIGPIPE)):
				t.Errorf("signals sent %v, want one SIGPIPE (%d)", signals, syscall.SIGPIPE)
			case !tc.signal && len(signals) != 0:
				t.Errorf("signals sent %v, want none", signals)
			}
		})
	}
}

// The signal never holds up the guest's output: with the host-to-guest
// direction full (a guest that reads nothing), the bridge still drains
// what the guest writes.
func TestBrokenPipeSignalDoesNotBlock(t *testing.T) {
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe() // never read
	defer g2hW.Close()
	defer h2gR.Close()
	b := New(Config{Port: port{g2hR, h2gW}, Stdout: errWriter{syscall.EPIPE}, Stderr: io.Discard})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.Run(ctx)
	w := stdioframe.NewWriter(g2hW)
	done := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 100 && err == nil; i++ {
			err = w.WriteData(stdioframe.Stdout, make([]byte, 1000))
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the guest's output blocked behind the SIGPIPE for a broken stdout")
	}
}

// The same for an exec'd program (krun-oci exec hands the caller's own
// files to the plugin): a broken pipe on its stdout gets it one
// EXEC_SIGNAL SIGPIPE, before the acknowledgement of the output that
// failed; its other stream is unaffected.
func TestExecBrokenPipeSignalsTheProgram(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	e := newExecFiles(t)
	rec, err := devopts.ExecRecord(7, []byte(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	sendRecord(t, core, rec, e.send)
	if f := r.next(t); f.Type != stdioframe.Exec {
		t.Fatalf("frame %v, want EXEC", f.Type)
	}
	e.stdoutR.Close() // the reader went away (| head -1)
	r.guestW.WriteExec(stdioframe.ExecStdout, 7, []byte("y\n"))
	r.guestW.WriteExec(stdioframe.ExecStdout, 7, []byte("y\n"))
	r.guestW.WriteExec(stdioframe.ExecStderr, 7, []byte("e\n"))
	// Runs of one stream may join (one acknowledgement for both "y\n"):
	// what counts is one SIGPIPE, before any acknowledgement, and all 6
	// bytes acknowledged.
	var signals []uint8
	acked := 0
	for acked < 6 {
		f := r.next(t)
		if f.ExecID() != 7 {
			t.Fatalf("frame %v for exec %d, want exec 7", f.Type, f.ExecID())
		}
		switch f.Type {
		case stdioframe.ExecSignal:
			if acked != 0 {
				t.Errorf("EXEC_SIGNAL after %d bytes acknowledged, want it before", acked)
			}
			signals = append(signals, f.ExecByte())
		case stdioframe.ExecOutputAck:
			acked += int(f.Ack())
		default:
			t.Fatalf("frame %v", f.Type)
		}
	}
	if len(signals) != 1 || signals[0] != uint8(unix.SIGPIPE) {
		t.Errorf("signals %v, want one SIGPIPE (%d)", signals, unix.SIGPIPE)
	}
	r.guestW.WriteExec(stdioframe.ExecExit, 7, []byte{141})
	if b := readAllTimeout(t, e.stderrR); string(b) != "e\n" {
		t.Errorf("stderr %q", b)
	}
}
