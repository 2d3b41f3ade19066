package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is one end of a vhost-user connection: a SOCK_STREAM unix socket
// carrying messages and, in their ancillary data, file descriptors.
//
// Send may be called from several goroutines; Recv from one at a time.
// Close unblocks a pending Recv.
type Conn struct {
	uc *net.UnixConn

	sendMu sync.Mutex

	recvMu     sync.Mutex
	hdr        [HeaderSize]byte
	oob        []byte
	msgTimeout time.Duration
}

// SetMessageTimeout makes Recv fail when a message whose first bytes have
// arrived is not complete within d (0: no limit, the default). Recv then
// manages the read deadline itself: the wait for a message's first byte
// has none, so an idle peer is fine, but one that stops halfway through a
// message is not.
func (c *Conn) SetMessageTimeout(d time.Duration) {
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	c.msgTimeout = d
}

// SetReadDeadline sets the deadline for Recv (see net.Conn); with a
// message timeout it is overridden per message.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.uc.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline for Send (see net.Conn): a peer that
// does not read its replies makes Send fail then instead of blocking.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.uc.SetWriteDeadline(t) }

// oobSize fits exactly MaxFDs descriptors: a sender attaching more makes
// the kernel truncate the control data (MSG_CTRUNC) and close the rest.
var oobSize = unix.CmsgSpace(4 * MaxFDs)

// NewConn makes a Conn from a connected unix socket. The file is
// duplicated; the caller keeps ownership of f.
func NewConn(f *os.File) (*Conn, error) {
	nc, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("vhost-user socket: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("vhost-user socket: %T is not a unix socket", nc)
	}
	return NewUnixConn(uc), nil
}

// NewUnixConn wraps a connected unix socket; the Conn owns uc.
func NewUnixConn(uc *net.UnixConn) *Conn {
	return &Conn{uc: uc, oob: make([]byte, oobSize)}
}

// Dial connects to a vhost-user back-end listening at path.
func Dial(path string) (*Conn, error) {
	uc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("dial vhost-user socket: %w", err)
	}
	return NewUnixConn(uc), nil
}

// Pair returns two connected Conns (a socketpair), for tests and in-process
// wiring.
func Pair() (*Conn, *Conn, error) {
	fa, fb, err := SocketPair()
	if err != nil {
		return nil, nil, err
	}
	defer fa.Close()
	defer fb.Close()
	a, err := NewConn(fa)
	if err != nil {
		return nil, nil, err
	}
	b, err := NewConn(fb)
	if err != nil {
		a.Close()
		return nil, nil, err
	}
	return a, b, nil
}

// SocketPair returns a connected pair of close-on-exec unix stream sockets
// as files (one end for a back-end, the other for a front-end).
func SocketPair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "vhost-user-a"), os.NewFile(uintptr(fds[1]), "vhost-user-b"), nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.uc.Close() }

// UnixConn returns the underlying socket.
func (c *Conn) UnixConn() *net.UnixConn { return c.uc }

// ErrNotSent is wrapped by a Send error found before anything was
// written (too many descriptors, a payload too large, a closed or nil
// file): the caller's mistake, with the connection as it was, not a peer
// gone.
var ErrNotSent = errors.New("message not sent")

// Send writes one message: header, payload and files in one sendmsg. The
// files stay owned by the caller. An error wrapping ErrNotSent left the
// connection untouched.
func (c *Conn) Send(req Request, flags uint32, payload []byte, files []*os.File) error {
	if len(files) > MaxFDs {
		return fmt.Errorf("send %v: %w: %w: %d", req, ErrNotSent, ErrTooManyFDs, len(files))
	}
	buf, err := encodeMessage(req, flags, payload)
	if err != nil {
		return fmt.Errorf("%w (%w)", err, ErrNotSent)
	}

	var oob []byte
	if len(files) > 0 {
		fds := make([]int, 0, len(files))
		for _, f := range files {
			if f == nil {
				return fmt.Errorf("send %v: %w: nil file", req, ErrNotSent)
			}
			fd, err := rawFD(f)
			if err != nil {
				return fmt.Errorf("send %v: %w: %w", req, ErrNotSent, err)
			}
			fds = append(fds, fd)
		}
		oob = unix.UnixRights(fds...)
	}

	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	n, _, err := c.uc.WriteMsgUnix(buf, oob, nil)
	runtime.KeepAlive(files)
	if err != nil {
		return fmt.Errorf("send %v: %w", req, err)
	}
	for n < len(buf) { // a stream socket may take a message in pieces
		k, err := c.uc.Write(buf[n:])
		if err != nil {
			return fmt.Errorf("send %v: %w", req, err)
		}
		n += k
	}
	return nil
}

// SendNoWait sends one message without files and never waits for room:
// a peer that does not read gets the message dropped (ErrWouldBlock), not
// a sender blocked for good. It does not rely on the socket's O_NONBLOCK,
// which a peer that shares the open file (a socket it handed over with
// SCM_RIGHTS) can clear: each send says MSG_DONTWAIT itself. A message
// the socket took in part is finished within partialWait, or the socket
// is left mid-message and the error says so.
func (c *Conn) SendNoWait(req Request, flags uint32, payload []byte) error {
	buf, err := encodeMessage(req, flags, payload)
	if err != nil {
		return err
	}
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("send %v: %w", req, err)
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	deadline := time.Now().Add(partialWait)
	for n := 0; n < len(buf); {
		var k int
		var serr error
		if err := rc.Write(func(fd uintptr) bool {
			k, serr = unix.SendmsgN(int(fd), buf[n:], nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			return true
		}); err != nil {
			return fmt.Errorf("send %v: %w", req, err)
		}
		switch {
		case serr == unix.EINTR:
		case serr == unix.EAGAIN && n == 0:
			return fmt.Errorf("send %v: %w", req, ErrWouldBlock)
		case serr == unix.EAGAIN:
			if time.Now().After(deadline) {
				return fmt.Errorf("send %v: %w after %d of %d bytes", req, ErrPartialSend, n, len(buf))
			}
			time.Sleep(time.Millisecond)
		case serr != nil:
			return fmt.Errorf("send %v: %w", req, serr)
		default:
			n += k
		}
	}
	return nil
}

// partialWait bounds how long SendNoWait finishes a message the socket
// took in part.
const partialWait = time.Second

// ErrWouldBlock: the peer's socket buffer is full, and nothing was sent
// (SendNoWait).
var ErrWouldBlock = errors.New("the peer is not reading: its socket buffer is full")

// ErrPartialSend: SendNoWait sent part of a message and could not finish
// it; the stream is left mid-message.
var ErrPartialSend = errors.New("the peer stopped reading in the middle of a message")

// encodeMessage lays out one message: header, then payload.
func encodeMessage(req Request, flags uint32, payload []byte) ([]byte, error) {
	if len(payload) > MaxPayloadSize {
		return nil, fmt.Errorf("send %v: %w: %d bytes", req, ErrPayloadTooBig, len(payload))
	}
	buf := make([]byte, HeaderSize+len(payload))
	Header{Request: req, Flags: flags, Size: uint32(len(payload))}.Encode(buf)
	copy(buf[HeaderSize:], payload)
	return buf, nil
}

// SendMessage sends m (Request, Flags, Payload, Files).
func (c *Conn) SendMessage(m *Message) error {
	return c.Send(m.Request, m.Flags, m.Payload, m.Files)
}

// rawFD returns f's descriptor without switching it to blocking mode (as
// f.Fd would). f must stay open until the descriptor is no longer used.
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("file %s: %w", f.Name(), err)
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, fmt.Errorf("file %s: %w", f.Name(), err)
	}
	return fd, nil
}

// Recv reads one message. It returns io.EOF when the peer closed the
// connection between messages. Any other error leaves the stream in an
// unknown state: the caller must close the connection. The header is
// checked (DecodeHeader), at most MaxFDs descriptors are accepted, and
// received descriptors are close-on-exec. The payload is not validated
// against the request (see ParseRequest and ParseReply).
func (c *Conn) Recv() (*Message, error) {
	c.recvMu.Lock()
	defer c.recvMu.Unlock()

	var files []*os.File
	truncated := false
	fail := func(err error) (*Message, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	started := false
	if c.msgTimeout > 0 {
		c.uc.SetReadDeadline(time.Time{})
		defer c.uc.SetReadDeadline(time.Time{})
	}
	read := func(b []byte) (int, error) {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(b, c.oob)
		if n > 0 && !started {
			started = true
			if c.msgTimeout > 0 {
				c.uc.SetReadDeadline(time.Now().Add(c.msgTimeout))
			}
		}
		if oobn > 0 {
			got, perr := parseRights(c.oob[:oobn])
			files = append(files, got...)
			if perr != nil && err == nil {
				err = perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			truncated = true
		}
		if len(files) > MaxFDs && err == nil {
			// A message sent in pieces carries descriptors with each;
			// refuse as soon as there are too many, not once the
			// payload is complete (a peer could make us hold 8 per
			// byte until then).
			err = fmt.Errorf("%w: more than %d", ErrTooManyFDs, MaxFDs)
		}
		return n, err
	}

	got := 0
	for got < HeaderSize {
		n, err := read(c.hdr[got:])
		got += n
		if err != nil || n == 0 {
			if got == 0 && (err == nil || errors.Is(err, io.EOF)) {
				return fail(io.EOF)
			}
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fail(fmt.Errorf("receive vhost-user header: %w", err))
		}
	}
	h, err := DecodeHeader(c.hdr[:])
	if err != nil {
		return fail(fmt.Errorf("receive vhost-user message: %w", err))
	}
	payload := make([]byte, h.Size)
	got = 0
	for got < len(payload) {
		n, err := read(payload[got:])
		got += n
		if err != nil || n == 0 {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fail(fmt.Errorf("receive %v payload: %w", h.Request, err))
		}
	}
	if truncated {
		// The kernel drops descriptors it cannot install: more than the
		// buffer holds, or more than this process may have open.
		return fail(fmt.Errorf("receive %v: %w: descriptors dropped (more than %d, or this process's open-file limit reached)", h.Request, ErrTooManyFDs, MaxFDs))
	}
	if len(files) > MaxFDs {
		return fail(fmt.Errorf("receive %v: %w: more than %d", h.Request, ErrTooManyFDs, MaxFDs))
	}
	return &Message{Request: h.Request, Flags: h.Flags, Payload: payload, Files: files}, nil
}

// parseRights extracts the descriptors of every SCM_RIGHTS message in oob
// and wraps them as files (so they are closed even if the caller fails).
func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var files []*os.File
	var firstErr error
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			if firstErr == nil {
				firstErr = fmt.Errorf("parse SCM_RIGHTS: %w", err)
			}
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "vhost-user-fd"))
		}
	}
	return files, firstErr
}
