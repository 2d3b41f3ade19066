package stdioframe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

func TestExecFramesRoundTrip(t *testing.T) {
	var g2h, h2g bytes.Buffer
	gw, hw := NewWriter(&g2h), NewWriter(&h2g)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(hw.WriteFrame(Start, nil))
	must(hw.WriteExec(Exec, 7, []byte(`{"args":["sh"]}`)))
	must(hw.WriteExec(ExecStdin, 7, []byte("in")))
	must(hw.WriteExec(ExecStdinEOF, 7, nil))
	must(hw.WriteExec(ExecWinsize, 7, []byte{24, 0, 80, 0}))
	must(hw.WriteExec(ExecSignal, 7, []byte{15}))
	must(hw.WriteExecAck(ExecOutputAck, 7, 4096))
	must(gw.WriteExec(ExecStdout, 7, []byte("out")))
	must(gw.WriteExec(ExecStderr, 7, []byte("err")))
	must(gw.WriteExec(ExecExit, 7, []byte{3}))
	must(gw.WriteExecAck(ExecStdinAck, 7, 2))

	hr := NewReader(&h2g, HostToGuest)
	next := func(r *Reader, want Type) Frame {
		t.Helper()
		f, err := r.Next()
		if err != nil || f.Type != want {
			t.Fatalf("got %v %v, want %v", f.Type, err, want)
		}
		if want != Start && f.ExecID() != 7 {
			t.Fatalf("%v: id %d", want, f.ExecID())
		}
		return f
	}
	next(hr, Start)
	if f := next(hr, Exec); string(f.ExecData()) != `{"args":["sh"]}` {
		t.Errorf("exec request %q", f.ExecData())
	}
	if f := next(hr, ExecStdin); string(f.ExecData()) != "in" {
		t.Errorf("stdin %q", f.ExecData())
	}
	next(hr, ExecStdinEOF)
	if r, c := next(hr, ExecWinsize).ExecWinsize(); r != 24 || c != 80 {
		t.Errorf("winsize %dx%d", r, c)
	}
	if s := next(hr, ExecSignal).ExecByte(); s != 15 {
		t.Errorf("signal %d", s)
	}
	if n := next(hr, ExecOutputAck).Ack(); n != 4096 {
		t.Errorf("ack %d", n)
	}
	gr := NewReader(&g2h, GuestToHost)
	next(gr, ExecStdout)
	next(gr, ExecStderr)
	if s := next(gr, ExecExit).ExecByte(); s != 3 {
		t.Errorf("exit %d", s)
	}
	if n := next(gr, ExecStdinAck).Ack(); n != 2 {
		t.Errorf("stdin ack %d", n)
	}
}

func TestExecFramesRejected(t *testing.T) {
	id := func(v uint32, rest ...byte) []byte {
		b := binary.LittleEndian.AppendUint32(nil, v)
		return append(b, rest...)
	}
	ack := func(n uint32) []byte { return binary.LittleEndian.AppendUint32(id(1), n) }
	for _, tc := range []struct {
		name string
		dir  Direction
		t    Type
		p    []byte
	}{
		{"no id", GuestToHost, ExecStdout, []byte{1, 2}},
		{"id 0", GuestToHost, ExecStdout, id(0, 'x')},
		{"exit short", GuestToHost, ExecExit, id(1)},
		{"ack above window", GuestToHost, ExecStdinAck, ack(ExecWindow + 1)},
		{"signal 0", HostToGuest, ExecSignal, id(1, 0)},
		{"signal 65", HostToGuest, ExecSignal, id(1, 65)},
		{"start with payload", HostToGuest, Start, []byte{1}},
		{"exec from the guest", GuestToHost, Exec, id(1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := append(hdr(tc.t, uint32(len(tc.p))), tc.p...)
			_, err := NewReader(bytes.NewReader(b), tc.dir).Next()
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("got %v, want a protocol error", err)
			}
		})
	}
	if err := NewWriter(&bytes.Buffer{}).WriteExec(ExecStdout, 1, make([]byte, MaxExecData+1)); err == nil {
		t.Error("an oversized exec data frame was written")
	}
	if err := NewWriter(&bytes.Buffer{}).WriteExec(Stdout, 1, nil); err == nil {
		t.Error("WriteExec of a non-exec type succeeded")
	}
}
