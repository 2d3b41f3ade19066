package stdioframe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"testing"
)

func hdr(t Type, n uint32) []byte {
	b := []byte{byte(t), 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(b[1:], n)
	return b
}

func TestRoundTripBothDirections(t *testing.T) {
	var g2h, h2g bytes.Buffer
	gw, hw := NewWriter(&g2h), NewWriter(&h2g)
	big := bytes.Repeat([]byte("x"), MaxPayload+10)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(gw.WriteData(Stdout, []byte("out")))
	must(gw.WriteData(Stderr, big))
	must(gw.WriteData(Stdout, nil)) // nothing
	must(gw.WriteExit(137))
	must(gw.WriteFrame(CloseReq, nil))
	must(hw.WriteData(Stdin, []byte("in")))
	must(hw.WriteFrame(StdinEOF, nil))
	must(hw.WriteWinsize(24, 80))
	must(hw.WriteSignal(15))
	must(hw.WriteSignalAll(9))
	must(hw.WriteFrame(CloseAck, nil))

	gr := NewReader(&g2h, GuestToHost)
	want := []struct {
		t Type
		n int
	}{{Stdout, 3}, {Stderr, MaxPayload}, {Stderr, 10}, {Exit, 1}, {CloseReq, 0}}
	for i, w := range want {
		f, err := gr.Next()
		if err != nil || f.Type != w.t || len(f.Payload) != w.n {
			t.Fatalf("guest frame %d: %v %d %v, want %v %d", i, f.Type, len(f.Payload), err, w.t, w.n)
		}
		if f.Type == Exit && f.Status() != 137 {
			t.Errorf("status %d", f.Status())
		}
	}
	if _, err := gr.Next(); err != io.EOF {
		t.Fatalf("end: %v, want io.EOF", err)
	}

	hr := NewReader(&h2g, HostToGuest)
	f, err := hr.Next()
	if err != nil || f.Type != Stdin || string(f.Payload) != "in" {
		t.Fatalf("stdin: %v %q %v", f.Type, f.Payload, err)
	}
	if f, err = hr.Next(); err != nil || f.Type != StdinEOF {
		t.Fatalf("eof: %v %v", f.Type, err)
	}
	if f, err = hr.Next(); err != nil || f.Type != Winsize {
		t.Fatalf("winsize: %v %v", f.Type, err)
	}
	if r, c := f.Winsize(); r != 24 || c != 80 {
		t.Errorf("winsize %dx%d", r, c)
	}
	if f, err = hr.Next(); err != nil || f.Type != Signal || f.Signal() != 15 {
		t.Fatalf("signal: %v %v", f, err)
	}
	if f, err = hr.Next(); err != nil || f.Type != SignalAll || f.Signal() != 9 {
		t.Fatalf("signal all: %v %v", f, err)
	}
	if f, err = hr.Next(); err != nil || f.Type != CloseAck {
		t.Fatalf("ack: %v %v", f.Type, err)
	}
}

func TestReaderRejects(t *testing.T) {
	tests := []struct {
		name string
		dir  Direction
		in   []byte
		want any // pointer to the error type, or a sentinel
	}{
		{"unknown type", GuestToHost, hdr(99, 0), new(*UnknownTypeError)},
		{"type zero", HostToGuest, hdr(0, 0), new(*UnknownTypeError)},
		{"wrong direction to host", GuestToHost, hdr(Stdin, 0), new(*UnknownTypeError)},
		{"wrong direction to guest", HostToGuest, hdr(Stdout, 0), new(*UnknownTypeError)},
		{"too long", GuestToHost, hdr(Stdout, MaxPayload+1), new(*TooLongError)},
		{"huge", HostToGuest, hdr(Stdin, 0xffffffff), new(*TooLongError)},
		{"exit empty", GuestToHost, hdr(Exit, 0), new(*BadPayloadError)},
		{"exit two", GuestToHost, append(hdr(Exit, 2), 1, 2), new(*BadPayloadError)},
		{"close_req payload", GuestToHost, append(hdr(CloseReq, 1), 0), new(*BadPayloadError)},
		{"winsize short", HostToGuest, append(hdr(Winsize, 3), 1, 2, 3), new(*BadPayloadError)},
		{"eof payload", HostToGuest, append(hdr(StdinEOF, 1), 0), new(*BadPayloadError)},
		{"ack payload", HostToGuest, append(hdr(CloseAck, 1), 0), new(*BadPayloadError)},
		{"signal zero", HostToGuest, append(hdr(Signal, 1), 0), new(*BadPayloadError)},
		{"signal 65", HostToGuest, append(hdr(Signal, 1), 65), new(*BadPayloadError)},
		{"signal long", HostToGuest, append(hdr(Signal, 2), 9, 9), new(*BadPayloadError)},
		{"signal all zero", HostToGuest, append(hdr(SignalAll, 1), 0), new(*BadPayloadError)},
		{"signal all 65", HostToGuest, append(hdr(SignalAll, 1), 65), new(*BadPayloadError)},
		{"signal all empty", HostToGuest, hdr(SignalAll, 0), new(*BadPayloadError)},
		{"signal all to host", GuestToHost, append(hdr(SignalAll, 1), 9), new(*UnknownTypeError)},
		{"cut header", GuestToHost, []byte{1, 0, 0}, io.ErrUnexpectedEOF},
		{"cut payload", GuestToHost, append(hdr(Stdout, 10), 'a'), io.ErrUnexpectedEOF},
		{"cut empty payload", GuestToHost, hdr(Stdout, 10), io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tt.in), tt.dir)
			_, err := r.Next()
			switch w := tt.want.(type) {
			case error:
				if !errors.Is(err, w) {
					t.Fatalf("err = %v, want %v", err, w)
				}
				return
			case **UnknownTypeError:
				if !errors.As(err, w) {
					t.Fatalf("err = %v, want %T", err, *w)
				}
			case **TooLongError:
				if !errors.As(err, w) {
					t.Fatalf("err = %v, want %T", err, *w)
				}
			case **BadPayloadError:
				if !errors.As(err, w) {
					t.Fatalf("err = %v, want %T", err, *w)
				}
			}
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("%v does not wrap ErrProtocol", err)
			}
			// Sticky: a later valid frame is not read.
			if _, err2 := r.Next(); err2 != err {
				t.Fatalf("second Next = %v, want the same error", err2)
			}
		})
	}
}

func TestTooLongDoesNotAllocate(t *testing.T) {
	r := NewReader(bytes.NewReader(hdr(Stdin, 0xfffffff0)), HostToGuest)
	allocs := testing.AllocsPerRun(1, func() { r.err = nil; r.r = bytes.NewReader(hdr(Stdin, 0xfffffff0)); r.Next() })
	if allocs > 3 {
		t.Errorf("%v allocations for a rejected frame", allocs)
	}
	if cap(r.buf) != 0 {
		t.Errorf("buffer of %d bytes allocated for a rejected frame", cap(r.buf))
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter(io.Discard)
	if err := w.WriteFrame(7, nil); err == nil {
		t.Error("unknown type accepted")
	}
	if err := w.WriteFrame(Stdout, make([]byte, MaxPayload+1)); err == nil {
		t.Error("oversized frame accepted")
	}
	if err := w.WriteFrame(Exit, nil); err == nil {
		t.Error("empty EXIT accepted")
	}
	if err := w.WriteData(Exit, []byte{1}); err == nil {
		t.Error("WriteData of EXIT accepted")
	}
	if err := w.WriteSignal(0); err == nil {
		t.Error("signal 0 accepted")
	}
	if err := w.WriteSignalAll(65); err == nil {
		t.Error("signal 65 to all accepted")
	}
}

// failAfter fails writes after n bytes.
type failAfter struct{ n int }

func (f *failAfter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		return 0, io.ErrClosedPipe
	}
	f.n -= len(p)
	return len(p), nil
}

func TestStreamPartialWrite(t *testing.T) {
	w := NewWriter(&failAfter{n: HeaderLen + MaxPayload})
	n, err := w.Stream(Stdout).Write(make([]byte, MaxPayload+5))
	if n != MaxPayload || !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Write = %d, %v", n, err)
	}
}

func TestConcurrentWritersDoNotInterleave(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte('a' + i)}, 1000+i)
			for range 50 {
				w.WriteData(Stdout, p)
			}
		}()
	}
	wg.Wait()
	r := NewReader(&buf, GuestToHost)
	for n := 0; ; n++ {
		f, err := r.Next()
		if err == io.EOF {
			if n != 400 {
				t.Fatalf("%d frames", n)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		c := f.Payload[0]
		if len(f.Payload) != 1000+int(c-'a') || bytes.Count(f.Payload, []byte{c}) != len(f.Payload) {
			t.Fatalf("frame %d mixed", n)
		}
	}
}

func FuzzReader(f *testing.F) {
	var seed bytes.Buffer
	w := NewWriter(&seed)
	w.WriteData(Stdin, []byte("hello"))
	w.WriteWinsize(1, 2)
	w.WriteSignal(2)
	w.WriteFrame(StdinEOF, nil)
	w.WriteFrame(CloseAck, nil)
	f.Add(seed.Bytes(), true)
	f.Add(append(hdr(Stdout, 2), 'h', 'i'), false)
	f.Add(hdr(Stdin, 0xffffffff), true)
	f.Fuzz(func(t *testing.T, in []byte, toGuest bool) {
		dir := GuestToHost
		if toGuest {
			dir = HostToGuest
		}
		r := NewReader(bytes.NewReader(in), dir)
		var again []byte
		for {
			fr, err := r.Next()
			if err != nil {
				if err == io.EOF && !bytes.Equal(again, in) {
					t.Fatalf("clean EOF but re-encoding differs")
				}
				return
			}
			if len(fr.Payload) > MaxPayload {
				t.Fatalf("payload of %d bytes", len(fr.Payload))
			}
			if d, ok := fr.Type.Direction(); !ok || d != dir {
				t.Fatalf("frame %v in direction %v", fr.Type, dir)
			}
			var eerr error
			again, eerr = Append(again, fr.Type, fr.Payload)
			if eerr != nil {
				t.Fatalf("decoded frame does not re-encode: %v", eerr)
			}
			if !bytes.HasPrefix(in, again) {
				t.Fatalf("re-encoding is not a prefix of the input")
			}
		}
	})
}
