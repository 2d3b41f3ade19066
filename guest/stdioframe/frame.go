// Package stdioframe is the framed standard-I/O protocol of `krun-core run
// -- CMD` on the virtio-console port "krun.stdio", between krun-init in the
// guest and the console plugin on the host (notes/RUN-DESIGN.md):
//
//	frame = type u8 | length u32 little-endian | payload (length <= 64 KiB)
//
// guest -> host: 1 STDOUT data, 2 STDERR data, 3 EXIT (u8 status),
// 4 CLOSE_REQ (empty), 9 STDIN_ACK (u32 bytes of STDIN consumed). host ->
// guest: 16 STDIN data, 17 STDIN_EOF (empty), 18 WINSIZE (rows u16, cols
// u16, little-endian), 19 CLOSE_ACK (empty), 20 SIGNAL (u8 signal number,
// 1-64), 29 OUTPUT_ACK (u32 bytes of STDOUT and STDERR written out).
// STDIN_ACK is a credit: the host sends at most StdinWindow bytes of STDIN
// the guest has not acknowledged, so krun-init never blocks reading the
// port on a command that does not read its input, and a SIGNAL or WINSIZE
// behind that input still arrives. OUTPUT_ACK is the credit the other way:
// the guest sends at most OutputWindow bytes of STDOUT and STDERR the host
// has not written out, so a slow reader of the command's output (a paused
// terminal) stalls the command, as a pipe would, and never the port: an
// exec's output, an EXEC_EXIT and a STDIN_ACK still pass.
//
// Containers (krun-oci, exec.go): host -> guest 21 START (empty) releases a
// command that waits for it; the exec frames carry a process id (u32, not
// 0) first: host -> guest 22 EXEC (id, JSON request), 23 EXEC_STDIN (id,
// data), 24 EXEC_STDIN_EOF (id), 25 EXEC_WINSIZE (id, rows, cols), 26
// EXEC_SIGNAL (id, u8), 27 EXEC_OUTPUT_ACK (id, u32 bytes written out);
// guest -> host 5 EXEC_STDOUT (id, data), 6 EXEC_STDERR (id, data), 7
// EXEC_EXIT (id, u8 status), 8 EXEC_STDIN_ACK (id, u32 bytes consumed).
// The acks are credits: each end sends at most ExecWindow bytes of an
// exec's data the other has not acknowledged, so a slow reader of one
// stream never stalls the port.
//
// Each end treats the other as hostile: a Reader checks the type against
// the direction, the length against MaxPayload before reading, and the
// payload size of the fixed-size frames, and returns a typed error.
package stdioframe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Type is a frame type.
type Type uint8

// Frame types.
const (
	Stdout   Type = 1
	Stderr   Type = 2
	Exit     Type = 3
	CloseReq Type = 4

	ExecStdout   Type = 5
	ExecStderr   Type = 6
	ExecExit     Type = 7
	ExecStdinAck Type = 8
	StdinAck     Type = 9

	Stdin         Type = 16
	StdinEOF      Type = 17
	Winsize       Type = 18
	CloseAck      Type = 19
	Signal        Type = 20
	Start         Type = 21
	Exec          Type = 22
	ExecStdin     Type = 23
	ExecStdinEOF  Type = 24
	ExecWinsize   Type = 25
	ExecSignal    Type = 26
	ExecOutputAck Type = 27
	SignalAll     Type = 28
	OutputAck     Type = 29
)

// ExecWindow is how many bytes of one exec stream may be in flight
// (sent and not acknowledged) in each direction.
const ExecWindow = 256 << 10

// Version is the protocol's version (initconfig.Version names it for
// krun-init, devopts.OptStdio for the console plugin): 2 has STDIN_ACK, 3
// OUTPUT_ACK.
const Version = 3

// OutputWindow is how many bytes of the command's stdout and stderr
// together may be in flight (sent by the guest and not acknowledged by
// OUTPUT_ACK).
const OutputWindow = 256 << 10

// StdinWindow is how many bytes of the command's stdin may be in flight
// (sent by the host and not acknowledged by STDIN_ACK).
const StdinWindow = 256 << 10

// MaxExecData is the largest data chunk of one exec data frame.
const MaxExecData = MaxPayload - 4

// HeaderLen is the size of a frame header; MaxPayload the largest payload.
const (
	HeaderLen  = 5
	MaxPayload = 64 << 10
)

// MaxSignal is the largest signal number a SIGNAL frame may carry.
const MaxSignal = 64

var typeNames = map[Type]string{
	Stdout: "STDOUT", Stderr: "STDERR", Exit: "EXIT", CloseReq: "CLOSE_REQ", StdinAck: "STDIN_ACK",
	Stdin: "STDIN", StdinEOF: "STDIN_EOF", Winsize: "WINSIZE", CloseAck: "CLOSE_ACK", Signal: "SIGNAL",
	ExecStdout: "EXEC_STDOUT", ExecStderr: "EXEC_STDERR", ExecExit: "EXEC_EXIT", ExecStdinAck: "EXEC_STDIN_ACK",
	Start: "START", Exec: "EXEC", ExecStdin: "EXEC_STDIN", ExecStdinEOF: "EXEC_STDIN_EOF",
	ExecWinsize: "EXEC_WINSIZE", ExecSignal: "EXEC_SIGNAL", ExecOutputAck: "EXEC_OUTPUT_ACK",
	SignalAll: "SIGNAL_ALL", OutputAck: "OUTPUT_ACK",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Direction says which end sends a frame.
type Direction int

const (
	GuestToHost Direction = iota // krun-init -> console plugin
	HostToGuest                  // console plugin -> krun-init
)

func (d Direction) String() string {
	if d == HostToGuest {
		return "host-to-guest"
	}
	return "guest-to-host"
}

// Direction returns the direction t travels in, and false for an unknown
// type.
func (t Type) Direction() (Direction, bool) {
	switch t {
	case Stdout, Stderr, Exit, CloseReq, ExecStdout, ExecStderr, ExecExit, ExecStdinAck, StdinAck:
		return GuestToHost, true
	case Stdin, StdinEOF, Winsize, CloseAck, Signal, Start, Exec, ExecStdin, ExecStdinEOF, ExecWinsize, ExecSignal, ExecOutputAck, SignalAll, OutputAck:
		return HostToGuest, true
	}
	return 0, false
}

// payloadLen returns the exact payload size of a fixed-size frame type, or
// -1 for data frames.
func payloadLen(t Type) int {
	switch t {
	case Exit, Signal, SignalAll:
		return 1
	case CloseReq, StdinEOF, CloseAck, Start:
		return 0
	case Winsize, ExecStdinEOF, StdinAck, OutputAck:
		return 4
	case ExecExit, ExecSignal:
		return 5
	case ExecWinsize, ExecStdinAck, ExecOutputAck:
		return 8
	}
	return -1
}

// IsExec reports whether frames of type t carry an exec id first.
func (t Type) IsExec() bool {
	switch t {
	case ExecStdout, ExecStderr, ExecExit, ExecStdinAck, Exec, ExecStdin, ExecStdinEOF, ExecWinsize, ExecSignal, ExecOutputAck:
		return true
	}
	return false
}

// ErrProtocol is wrapped by every error about a malformed frame; after it
// the stream is out of sync and must not be read further.
var ErrProtocol = errors.New("stdio frame protocol violation")

// UnknownTypeError: a type that is undefined, or defined for the other
// direction.
type UnknownTypeError struct {
	Type Type
	Dir  Direction // the direction the reader accepts
}

func (e *UnknownTypeError) Error() string {
	return fmt.Sprintf("stdio frame: unknown %s frame type %d", e.Dir, uint8(e.Type))
}
func (e *UnknownTypeError) Unwrap() error { return ErrProtocol }

// TooLongError: a length above MaxPayload.
type TooLongError struct {
	Type Type
	Len  uint32
}

func (e *TooLongError) Error() string {
	return fmt.Sprintf("stdio frame: %v frame of %d bytes exceeds the %d-byte limit", e.Type, e.Len, MaxPayload)
}
func (e *TooLongError) Unwrap() error { return ErrProtocol }

// BadPayloadError: a fixed-size frame of the wrong size, or a bad value.
type BadPayloadError struct {
	Type   Type
	Len    uint32
	Reason string
}

func (e *BadPayloadError) Error() string {
	return fmt.Sprintf("stdio frame: %v frame with %d-byte payload: %s", e.Type, e.Len, e.Reason)
}
func (e *BadPayloadError) Unwrap() error { return ErrProtocol }

// Frame is one decoded frame. Payload is only valid until the Reader's next
// call.
type Frame struct {
	Type    Type
	Payload []byte
}

// Status returns an EXIT frame's status byte.
func (f Frame) Status() uint8 { return f.byte0() }

// Signal returns a SIGNAL frame's signal number.
func (f Frame) Signal() uint8 { return f.byte0() }

func (f Frame) byte0() uint8 {
	if len(f.Payload) < 1 {
		return 0
	}
	return f.Payload[0]
}

// Winsize returns a WINSIZE frame's rows and columns.
func (f Frame) Winsize() (rows, cols uint16) {
	if len(f.Payload) < 4 {
		return 0, 0
	}
	return binary.LittleEndian.Uint16(f.Payload), binary.LittleEndian.Uint16(f.Payload[2:])
}

// ExecID returns an exec frame's process id.
func (f Frame) ExecID() uint32 {
	if len(f.Payload) < 4 {
		return 0
	}
	return binary.LittleEndian.Uint32(f.Payload)
}

// ExecData returns what follows an exec frame's id: the data, the
// request, or the fixed fields.
func (f Frame) ExecData() []byte {
	if len(f.Payload) < 4 {
		return nil
	}
	return f.Payload[4:]
}

// ExecByte returns EXEC_EXIT's status or EXEC_SIGNAL's signal.
func (f Frame) ExecByte() uint8 {
	if len(f.Payload) < 5 {
		return 0
	}
	return f.Payload[4]
}

// ExecWinsize returns EXEC_WINSIZE's rows and columns.
func (f Frame) ExecWinsize() (rows, cols uint16) {
	if len(f.Payload) < 8 {
		return 0, 0
	}
	return binary.LittleEndian.Uint16(f.Payload[4:]), binary.LittleEndian.Uint16(f.Payload[6:])
}

// StdinAcked returns a STDIN_ACK or OUTPUT_ACK frame's byte count.
func (f Frame) StdinAcked() uint32 {
	if len(f.Payload) < 4 {
		return 0
	}
	return binary.LittleEndian.Uint32(f.Payload)
}

// Ack returns an exec acknowledgement frame's byte count.
func (f Frame) Ack() uint32 {
	if len(f.Payload) < 8 {
		return 0
	}
	return binary.LittleEndian.Uint32(f.Payload[4:])
}

// Reader decodes frames sent in one direction from a byte stream.
type Reader struct {
	r   io.Reader
	dir Direction
	hdr [HeaderLen]byte
	buf []byte
	err error // sticky protocol error
}

// NewReader returns a Reader accepting the frames that travel in dir.
func NewReader(r io.Reader, dir Direction) *Reader {
	return &Reader{r: r, dir: dir}
}

// Next reads one frame. It returns io.EOF at a clean end of stream (between
// frames), io.ErrUnexpectedEOF for a stream cut inside a frame, an error
// wrapping ErrProtocol for a malformed frame (sticky: every later call
// returns it too), and read errors as they come.
func (r *Reader) Next() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		return Frame{}, err
	}
	t := Type(r.hdr[0])
	n := binary.LittleEndian.Uint32(r.hdr[1:])
	if d, ok := t.Direction(); !ok || d != r.dir {
		r.err = &UnknownTypeError{Type: t, Dir: r.dir}
		return Frame{}, r.err
	}
	if n > MaxPayload {
		r.err = &TooLongError{Type: t, Len: n}
		return Frame{}, r.err
	}
	if want := payloadLen(t); want >= 0 && n != uint32(want) {
		r.err = &BadPayloadError{Type: t, Len: n, Reason: fmt.Sprintf("want %d bytes", want)}
		return Frame{}, r.err
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n, max(int(n), 4096))
	}
	p := r.buf[:n]
	if _, err := io.ReadFull(r.r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if (t == StdinAck && binary.LittleEndian.Uint32(p) > StdinWindow) || (t == OutputAck && binary.LittleEndian.Uint32(p) > OutputWindow) {
		r.err = &BadPayloadError{Type: t, Len: n, Reason: "acknowledges more than the window"}
		return Frame{}, r.err
	}
	if (t == Signal || t == SignalAll) && (p[0] == 0 || p[0] > MaxSignal) {
		r.err = &BadPayloadError{Type: t, Len: n, Reason: fmt.Sprintf("signal %d outside 1-%d", p[0], MaxSignal)}
		return Frame{}, r.err
	}
	if t.IsExec() {
		if n < 4 || binary.LittleEndian.Uint32(p) == 0 {
			r.err = &BadPayloadError{Type: t, Len: n, Reason: "no exec id"}
			return Frame{}, r.err
		}
		if t == ExecSignal && (p[4] == 0 || p[4] > MaxSignal) {
			r.err = &BadPayloadError{Type: t, Len: n, Reason: fmt.Sprintf("signal %d outside 1-%d", p[4], MaxSignal)}
			return Frame{}, r.err
		}
		if (t == ExecStdinAck || t == ExecOutputAck) && binary.LittleEndian.Uint32(p[4:]) > ExecWindow {
			r.err = &BadPayloadError{Type: t, Len: n, Reason: "acknowledges more than the window"}
			return Frame{}, r.err
		}
	}
	return Frame{Type: t, Payload: p}, nil
}

// Writer encodes frames. It is safe for concurrent use: each frame goes out
// in one Write call under a lock, so frames never interleave.
type Writer struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Append appends the encoding of one frame to dst. It fails for an unknown
// type, a payload above MaxPayload or a fixed-size frame of the wrong size.
func Append(dst []byte, t Type, payload []byte) ([]byte, error) {
	if _, ok := t.Direction(); !ok {
		return dst, fmt.Errorf("stdio frame: encode unknown type %d", uint8(t))
	}
	if len(payload) > MaxPayload {
		return dst, fmt.Errorf("stdio frame: encode %v: %d bytes exceed the %d-byte limit", t, len(payload), MaxPayload)
	}
	if want := payloadLen(t); want >= 0 && len(payload) != want {
		return dst, fmt.Errorf("stdio frame: encode %v: %d-byte payload, want %d", t, len(payload), want)
	}
	dst = append(dst, byte(t), 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(dst[len(dst)-4:], uint32(len(payload)))
	return append(dst, payload...), nil
}

// WriteFrame writes one frame.
func (w *Writer) WriteFrame(t Type, payload []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	b, err := Append(w.buf[:0], t, payload)
	if err != nil {
		return err
	}
	w.buf = b
	if _, err := w.w.Write(b); err != nil {
		return fmt.Errorf("write %v frame: %w", t, err)
	}
	return nil
}

// WriteData writes p as data frames of type t (STDOUT, STDERR or STDIN),
// split at MaxPayload. Nothing is written for an empty p.
func (w *Writer) WriteData(t Type, p []byte) error {
	if t != Stdout && t != Stderr && t != Stdin {
		return fmt.Errorf("stdio frame: %v is not a data frame", t)
	}
	for len(p) > 0 {
		n := min(len(p), MaxPayload)
		if err := w.WriteFrame(t, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// WriteExec writes an exec frame: the id, then rest.
func (w *Writer) WriteExec(t Type, id uint32, rest []byte) error {
	if !t.IsExec() {
		return fmt.Errorf("stdio frame: %v is not an exec frame", t)
	}
	if len(rest) > MaxExecData {
		return fmt.Errorf("stdio frame: encode %v: %d bytes exceed the %d-byte limit", t, len(rest), MaxExecData)
	}
	p := make([]byte, 4+len(rest))
	binary.LittleEndian.PutUint32(p, id)
	copy(p[4:], rest)
	return w.WriteFrame(t, p)
}

// WriteExecAck writes an acknowledgement of n bytes for exec id.
func (w *Writer) WriteExecAck(t Type, id, n uint32) error {
	var p [4]byte
	binary.LittleEndian.PutUint32(p[:], n)
	return w.WriteExec(t, id, p[:])
}

// WriteStdinAck acknowledges n bytes of STDIN.
func (w *Writer) WriteStdinAck(n uint32) error {
	var p [4]byte
	binary.LittleEndian.PutUint32(p[:], n)
	return w.WriteFrame(StdinAck, p[:])
}

// WriteOutputAck writes an OUTPUT_ACK frame: n bytes of STDOUT and STDERR
// were written out.
func (w *Writer) WriteOutputAck(n uint32) error {
	var p [4]byte
	binary.LittleEndian.PutUint32(p[:], n)
	return w.WriteFrame(OutputAck, p[:])
}

// WriteExit writes an EXIT frame.
func (w *Writer) WriteExit(status uint8) error { return w.WriteFrame(Exit, []byte{status}) }

// WriteSignal writes a SIGNAL frame.
func (w *Writer) WriteSignal(sig uint8) error {
	if sig == 0 || sig > MaxSignal {
		return fmt.Errorf("stdio frame: signal %d outside 1-%d", sig, MaxSignal)
	}
	return w.WriteFrame(Signal, []byte{sig})
}

// WriteSignalAll writes a SIGNAL_ALL frame: sig for every process of the
// guest but krun-init.
func (w *Writer) WriteSignalAll(sig uint8) error {
	if sig == 0 || sig > MaxSignal {
		return fmt.Errorf("stdio frame: signal %d outside 1-%d", sig, MaxSignal)
	}
	return w.WriteFrame(SignalAll, []byte{sig})
}

// WriteWinsize writes a WINSIZE frame.
func (w *Writer) WriteWinsize(rows, cols uint16) error {
	var p [4]byte
	binary.LittleEndian.PutUint16(p[:], rows)
	binary.LittleEndian.PutUint16(p[2:], cols)
	return w.WriteFrame(Winsize, p[:])
}

// Stream returns an io.Writer that sends what is written to it as data
// frames of type t.
func (w *Writer) Stream(t Type) io.Writer { return streamWriter{w, t} }

type streamWriter struct {
	w *Writer
	t Type
}

func (s streamWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, MaxPayload)
		if err := s.w.WriteFrame(s.t, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}
