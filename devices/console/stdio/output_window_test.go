package stdio

import (
	"bytes"
	"io"
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestSlowStdoutDoesNotStallExec: the command's stdout is a pipe nobody
// reads (a terminal paused with ^S, a stalled log reader). The bridge
// wrote main output as it read the port, so that write blocked the port:
// an exec's output, and everything else the guest sent, waited behind it
// (left open last session). Now main output has a writer and a credit of
// its own (OUTPUT_ACK): the exec's output goes through while stdout is
// stalled, and the main output follows, acknowledged, once it is read.
func TestSlowStdoutDoesNotStallExec(t *testing.T) {
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer outR.Close()
	defer outW.Close()
	plugin, core := controlPair(t)
	r := newRigOut(t, nil, plugin, outW)
	r.next(t)                                  // STDIN_EOF
	main := bytes.Repeat([]byte("m"), 200<<10) // more than a pipe holds, within the window
	r.writeOut(t, stdioframe.Stdout, main)

	e := newExecFiles(t)
	rec, err := devopts.ExecRecord(3, []byte(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	sendRecord(t, core, rec, e.send)
	var acked int
	for got := false; !got; {
		switch f := r.next(t); f.Type {
		case stdioframe.Exec:
			r.guestW.WriteExec(stdioframe.ExecStdout, 3, []byte("exec output"))
			r.guestW.WriteExec(stdioframe.ExecExit, 3, []byte{0})
		case stdioframe.ExecOutputAck:
			got = true
		case stdioframe.OutputAck:
			acked += int(f.StdinAcked())
		default:
			t.Fatalf("host frame %v", f.Type)
		}
	}
	if b := readAllTimeout(t, e.stdoutR); string(b) != "exec output" {
		t.Fatalf("exec stdout %q while main stdout is stalled", b)
	}
	if acked >= len(main) {
		t.Fatalf("%d bytes acknowledged, but stdout was never read", acked)
	}

	// The reader comes back: every byte arrives, and is acknowledged.
	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, 0, len(main))
		tmp := make([]byte, 64<<10)
		for len(buf) < len(main) {
			n, err := outR.Read(tmp)
			if err != nil {
				break
			}
			buf = append(buf, tmp[:n]...)
		}
		got <- buf
	}()
	for acked < len(main) {
		f := r.next(t)
		if f.Type != stdioframe.OutputAck {
			t.Fatalf("host frame %v, want OUTPUT_ACK", f.Type)
		}
		acked += int(f.StdinAcked())
	}
	if b := <-got; !bytes.Equal(b, main) {
		t.Fatalf("main stdout: %d bytes, want %d", len(b), len(main))
	}
	r.guestW.WriteFrame(stdioframe.CloseReq, nil)
	if f := r.next(t); f.Type != stdioframe.CloseAck {
		t.Fatalf("host frame %v, want CLOSE_ACK", f.Type)
	}
}

// TestOutputWindowOverrun: a guest that sends more output than the
// window without waiting for OUTPUT_ACK breaks the protocol: the host
// keeps at most the window queued (its memory stays bounded) and drops
// the rest, and the port is still served: CLOSE_REQ is answered once the
// queue is written.
func TestOutputWindowOverrun(t *testing.T) {
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer outR.Close()
	defer outW.Close()
	r := newRigOut(t, nil, nil, outW)
	r.next(t) // STDIN_EOF
	closed := make(chan struct{})
	go func() {
		for {
			f, err := r.guestR.Next()
			if err != nil {
				return
			}
			if f.Type == stdioframe.CloseAck {
				close(closed)
			}
		}
	}()
	// Nobody reads stdout yet: the writer blocks once the pipe is full.
	chunk := make([]byte, stdioframe.MaxPayload)
	for i := 0; i < 3*stdioframe.OutputWindow/len(chunk); i++ {
		if err := r.guestW.WriteData(stdioframe.Stdout, chunk); err != nil {
			t.Fatal(err)
		}
	}
	b := r.bridge
	b.outMu.Lock()
	queued, overrun := b.mainOut.queued, b.overrun
	b.outMu.Unlock()
	if queued > stdioframe.OutputWindow || !overrun {
		t.Fatalf("%d bytes queued (overrun %v) after three windows sent without waiting, want at most %d", queued, overrun, stdioframe.OutputWindow)
	}
	go io.Copy(io.Discard, outR)
	r.guestW.WriteFrame(stdioframe.CloseReq, nil)
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("no CLOSE_ACK after an overrun")
	}
}
