package vhostuser

import (
	"bytes"
	"errors"
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func pair(t *testing.T) (*Conn, *Conn) {
	t.Helper()
	a, b, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// rawSend writes bytes with the given descriptors directly on the socket,
// bypassing Conn.Send's checks.
func rawSend(t *testing.T, c *Conn, b []byte, fds []int) {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.UnixConn().WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func header(req Request, flags, size uint32) []byte {
	b := make([]byte, HeaderSize)
	Header{req, flags, size}.Encode(b)
	return b
}

func TestConnSendRecvFDs(t *testing.T) {
	a, b := pair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	payload := EncodeVringFD(3, false)
	if err := a.Send(SetVringCall, Version|FlagNeedReply, payload, []*os.File{w, w}); err != nil {
		t.Fatal(err)
	}
	m, err := b.Recv()
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseFiles()
	if m.Request != SetVringCall || m.Flags != Version|FlagNeedReply || !bytes.Equal(m.Payload, payload) || len(m.Files) != 2 {
		t.Fatalf("got %+v", m)
	}
	// The received descriptor is the pipe's write end.
	if _, err := m.Files[1].Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := r.Read(buf); err != nil || buf[0] != 'x' {
		t.Fatalf("read %q %v", buf, err)
	}
	// Received descriptors are close-on-exec.
	fd, err := rawFD(m.Files[0])
	if err != nil {
		t.Fatal(err)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("FD_CLOEXEC not set: %#x %v", flags, err)
	}
}

func TestConnSendLimits(t *testing.T) {
	a, _ := pair(t)
	if err := a.Send(SetMemTable, Version, make([]byte, MaxPayloadSize+1), nil); !errors.Is(err, ErrPayloadTooBig) {
		t.Fatalf("err = %v", err)
	}
	fs := make([]*os.File, MaxFDs+1)
	for i := range fs {
		fs[i] = os.Stdin
	}
	if err := a.Send(SetMemTable, Version, nil, fs); !errors.Is(err, ErrTooManyFDs) {
		t.Fatalf("err = %v", err)
	}
}

func TestConnRecvTooManyFDs(t *testing.T) {
	for _, n := range []int{MaxFDs, MaxFDs + 1, 64} {
		a, b := pair(t)
		fds := make([]int, n)
		for i := range fds {
			fds[i] = int(os.Stdin.Fd())
		}
		before := openFDs(t)
		rawSend(t, a, header(SetMemTable, Version, 0), fds)
		m, err := b.Recv()
		if n <= MaxFDs {
			if err != nil || len(m.Files) != n {
				t.Fatalf("%d fds: %v", n, err)
			}
			m.CloseFiles()
		} else if !errors.Is(err, ErrTooManyFDs) {
			t.Fatalf("%d fds: err = %v, want ErrTooManyFDs", n, err)
		}
		if after := openFDs(t); after != before {
			t.Fatalf("%d fds: %d descriptors open before, %d after: leak", n, before, after)
		}
	}
}

func TestConnRecvErrors(t *testing.T) {
	tests := []struct {
		name    string
		data    []byte
		wantErr error
	}{
		{"eof", nil, io.EOF},
		{"short header", []byte{1, 0, 0}, io.ErrUnexpectedEOF},
		{"short payload", append(header(SetFeatures, Version, 8), 1, 2), io.ErrUnexpectedEOF},
		{"too big", header(SetMemTable, Version, MaxPayloadSize+1), ErrPayloadTooBig},
		{"bad version", header(SetOwner, 2, 0), ErrBadHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := pair(t)
			if len(tt.data) > 0 {
				rawSend(t, a, tt.data, []int{int(os.Stdin.Fd())})
			}
			a.UnixConn().CloseWrite()
			before := openFDs(t)
			m, err := b.Recv()
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v (msg %+v), want %v", err, m, tt.wantErr)
			}
			if after := openFDs(t); after > before {
				t.Fatalf("descriptor leak: %d -> %d", before, after)
			}
		})
	}
}

func TestConnRecvPieces(t *testing.T) {
	a, b := pair(t)
	msg := append(header(SetFeatures, Version, 8), EncodeU64(42)...)
	// Header split in two writes, the descriptor on the first piece, then
	// a second message right behind the first.
	rawSend(t, a, msg[:5], []int{int(os.Stdin.Fd())})
	rawSend(t, a, msg[5:], nil)
	rawSend(t, a, header(SetOwner, Version, 0), nil)
	m, err := b.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if v, err := DecodeU64(m.Payload); err != nil || v != 42 || len(m.Files) != 1 {
		t.Fatalf("got %+v %v", m, err)
	}
	m.CloseFiles()
	m, err = b.Recv()
	if err != nil || m.Request != SetOwner || len(m.Files) != 0 {
		t.Fatalf("second message: %+v %v", m, err)
	}
}

func TestConnCloseUnblocksRecv(t *testing.T) {
	_, b := pair(t)
	done := make(chan error, 1)
	go func() { _, err := b.Recv(); done <- err }()
	b.Close()
	if err := <-done; err == nil {
		t.Fatal("Recv returned no error after Close")
	}
}

func TestMessageTakeFile(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	m := &Message{Files: []*os.File{w}}
	if m.TakeFile(1) != nil || m.TakeFile(-1) != nil {
		t.Fatal("TakeFile out of range returned a file")
	}
	f := m.TakeFile(0)
	m.CloseFiles()
	if _, err := f.Write([]byte("y")); err != nil {
		t.Fatalf("taken file was closed: %v", err)
	}
	f.Close()
}
