package stdioframe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// TestStdinAck: STDIN_ACK travels guest to host with a 4-byte count of at
// most StdinWindow; a host-bound reader takes it, a guest-bound one
// refuses it, and a count above the window or a payload of another size
// is a protocol error.
func TestStdinAck(t *testing.T) {
	var buf bytes.Buffer
	if err := NewWriter(&buf).WriteStdinAck(4096); err != nil {
		t.Fatal(err)
	}
	f, err := NewReader(bytes.NewReader(buf.Bytes()), GuestToHost).Next()
	if err != nil || f.Type != StdinAck || f.StdinAcked() != 4096 {
		t.Fatalf("STDIN_ACK read back as %v %d, %v", f.Type, f.StdinAcked(), err)
	}
	if _, err := NewReader(bytes.NewReader(buf.Bytes()), HostToGuest).Next(); !errors.Is(err, ErrProtocol) {
		t.Errorf("a guest-bound reader took STDIN_ACK: %v", err)
	}
	for _, tc := range []struct {
		name    string
		payload []byte
	}{
		{"over the window", binary.LittleEndian.AppendUint32(nil, StdinWindow+1)},
		{"short", []byte{1, 0}},
		{"long", make([]byte, 8)},
	} {
		b, _ := Append(nil, Stdout, tc.payload) // any type: the header is rewritten
		b[0] = byte(StdinAck)
		if _, err := NewReader(bytes.NewReader(b), GuestToHost).Next(); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v, want a protocol error", tc.name, err)
		}
	}
}

// TestOutputAck: OUTPUT_ACK travels host to guest with a 4-byte count of
// at most OutputWindow; a guest-bound reader takes it, a host-bound one
// refuses it, and a count above the window or a payload of another size
// is a protocol error.
func TestOutputAck(t *testing.T) {
	var buf bytes.Buffer
	if err := NewWriter(&buf).WriteOutputAck(OutputWindow); err != nil {
		t.Fatal(err)
	}
	f, err := NewReader(bytes.NewReader(buf.Bytes()), HostToGuest).Next()
	if err != nil || f.Type != OutputAck || f.StdinAcked() != OutputWindow {
		t.Fatalf("OUTPUT_ACK read back as %v %d, %v", f.Type, f.StdinAcked(), err)
	}
	if _, err := NewReader(bytes.NewReader(buf.Bytes()), GuestToHost).Next(); !errors.Is(err, ErrProtocol) {
		t.Errorf("a host-bound reader took OUTPUT_ACK: %v", err)
	}
	for _, tc := range []struct {
		name    string
		payload []byte
	}{
		{"over the window", binary.LittleEndian.AppendUint32(nil, OutputWindow+1)},
		{"short", []byte{1, 0}},
		{"long", make([]byte, 8)},
	} {
		b, _ := Append(nil, Stdin, tc.payload)
		b[0] = byte(OutputAck)
		if _, err := NewReader(bytes.NewReader(b), HostToGuest).Next(); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v, want a protocol error", tc.name, err)
		}
	}
}
