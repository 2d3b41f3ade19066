package devopts

import "encoding/binary"

// Names of the files and options a console plugin is configured with.
const (
	FileStdin   = "stdin"
	FileStdout  = "stdout"
	FileStderr  = "stderr"
	FileControl = "control" // read end of the core's control pipe (window size, signals)
	OptName     = "name"    // the virtio-console port's name
	OptTTY      = "tty"     // on: the guest program has a terminal (stdout carries stderr too)
	// OptHoldStdin ("hold-stdin=on"): stdin is read only after the core
	// releases a command waiting for START (a container's).
	OptHoldStdin = "hold-stdin"
	// OptStdio ("stdio=N") is the version of the stdio frame protocol
	// (guest/stdioframe.Version) the core's krun-init speaks. The plugin
	// refuses another, and a plugin older than the option refuses it as
	// unknown: a console plugin that does not speak the same frames as
	// krun-init (STDIN_ACK) fails at start instead of stalling input or
	// discarding output and never acknowledging the guest's CLOSE_REQ.
	OptStdio = "stdio"
)

// Control records, core to console plugin, on the control pipe
// (FileControl): ControlLen bytes, little-endian: type u8, a pad byte, then
// for ControlWinsize rows u16 and cols u16, for ControlSignal and
// ControlSignalAll the signal number u8.
const (
	ControlLen     = 8
	ControlWinsize = 1
	ControlSignal  = 2
	// ControlSignalAll: the signal for every process of the guest but
	// its init (the command, exec'd programs, what they started).
	ControlSignalAll = 7
)

// WinsizeRecord encodes a window-size record for the control pipe.
func WinsizeRecord(rows, cols uint16) []byte {
	b := make([]byte, ControlLen)
	b[0] = ControlWinsize
	binary.LittleEndian.PutUint16(b[2:], rows)
	binary.LittleEndian.PutUint16(b[4:], cols)
	return b
}

// SignalRecord encodes a signal record for the control pipe.
func SignalRecord(sig uint8) []byte {
	b := make([]byte, ControlLen)
	b[0] = ControlSignal
	b[2] = sig
	return b
}

// SignalAllRecord encodes a record of a signal for every process of the
// guest but its init.
func SignalAllRecord(sig uint8) []byte {
	b := SignalRecord(sig)
	b[0] = ControlSignalAll
	return b
}
