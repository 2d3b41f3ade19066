package stdio

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// FuzzBridge feeds the bridge arbitrary bytes from the guest, with two
// exec sessions running (ids 1 and 2, their files /dev/null): it never
// panics, it ends when the port does (with an error only for a port
// that ends inside a frame), and the command's output and
// status are what the frames before the first protocol violation said
// (while they stay within the output window, as krun-init's do).
func FuzzBridge(f *testing.F) {
	var seed bytes.Buffer
	w := stdioframe.NewWriter(&seed)
	w.WriteData(stdioframe.Stdout, []byte("out"))
	w.WriteData(stdioframe.Stderr, []byte("err"))
	w.WriteExec(stdioframe.ExecStdout, 1, []byte("exec out"))
	w.WriteExec(stdioframe.ExecStderr, 2, []byte("exec err"))
	w.WriteExecAck(stdioframe.ExecStdinAck, 1, 100)
	w.WriteExec(stdioframe.ExecExit, 1, []byte{3})
	w.WriteExec(stdioframe.ExecStdout, 7, []byte("no such exec"))
	w.WriteStdinAck(10)
	w.WriteFrame(stdioframe.CloseReq, nil)
	w.WriteExit(5)
	f.Add(seed.Bytes())
	f.Add(append(append([]byte{}, seed.Bytes()...), 1, 0xff, 0xff, 0xff, 0xff, 'x'))
	f.Add([]byte{byte(stdioframe.ExecStdout), 4, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		var stdout, stderr syncbuf.Buffer
		b := New(Config{Port: port{bytes.NewReader(in), io.Discard}, Stdout: &stdout, Stderr: &stderr})
		for id := uint32(1); id <= 2; id++ {
			files := make([]*os.File, 4)
			for i := range files {
				flag := os.O_WRONLY
				if i == 0 {
					flag = os.O_RDONLY
				}
				nf, err := os.OpenFile(os.DevNull, flag, 0)
				if err != nil {
					t.Fatal(err)
				}
				files[i] = nf
			}
			b.startExec(id, []byte(`{}`), files)
		}
		done := make(chan error, 1)
		go func() { done <- b.Run(context.Background()) }()
		select {
		case err := <-done:
			// A stream cut inside a frame is an error; nothing else is.
			if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the bridge did not end with the port")
		}

		// The model: the frames up to the first error.
		var wantOut, wantErr []byte
		wantExit, exited := 0, false
		r := stdioframe.NewReader(bytes.NewReader(in), stdioframe.GuestToHost)
		for {
			fr, err := r.Next()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, stdioframe.ErrProtocol) {
					t.Fatalf("model: %v", err)
				}
				break
			}
			switch fr.Type {
			case stdioframe.Stdout:
				wantOut = append(wantOut, fr.Payload...)
			case stdioframe.Stderr:
				wantErr = append(wantErr, fr.Payload...)
			case stdioframe.Exit:
				wantExit, exited = int(fr.Status()), true
			}
		}
		if len(wantOut)+len(wantErr) > stdioframe.OutputWindow {
			return // beyond the window, output may be dropped
		}
		if got := stdout.String(); got != string(wantOut) {
			t.Errorf("stdout %q, want %q", got, wantOut)
		}
		if got := stderr.String(); got != string(wantErr) {
			t.Errorf("stderr %q, want %q", got, wantErr)
		}
		if st, ok := b.Exit(); ok != exited || st != wantExit && exited {
			t.Errorf("exit %d (%v), want %d (%v)", st, ok, wantExit, exited)
		}
	})
}
