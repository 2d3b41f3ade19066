package devopts

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Control records of the container calls (core/vmm container.go). The
// control channel is a SOCK_SEQPACKET pair: one record per message, an
// exec's files attached with SCM_RIGHTS.
//
//	ControlStart       8 bytes: type, pad[7]
//	ControlExec        8-byte header (type, pad[3], id u32) + the exec request (JSON);
//	                   files: stdin, stdout, stderr, status
//	ControlExecSignal  8 bytes: type, signal u8, pad[2], id u32
//	ControlExecWinsize 12 bytes: type, pad, rows u16, cols u16, pad[2], id u32
const (
	ControlStart       = 3
	ControlExec        = 4
	ControlExecSignal  = 5
	ControlExecWinsize = 6

	// ExecFiles is the number of files an exec record carries.
	ExecFiles = 4
	// MaxExecRequest bounds an exec request: it must fit one EXEC frame
	// with its id.
	MaxExecRequest = 64<<10 - 4
)

// StartRecord encodes the record that releases a command waiting for
// START.
func StartRecord() []byte {
	b := make([]byte, ControlLen)
	b[0] = ControlStart
	return b
}

// ExecRecord encodes an exec request; its files go with it.
func ExecRecord(id uint32, req []byte) ([]byte, error) {
	if len(req) > MaxExecRequest {
		return nil, fmt.Errorf("exec request of %d bytes, at most %d", len(req), MaxExecRequest)
	}
	if id == 0 {
		return nil, errors.New("exec id 0")
	}
	b := make([]byte, ControlLen+len(req))
	b[0] = ControlExec
	binary.LittleEndian.PutUint32(b[4:], id)
	copy(b[ControlLen:], req)
	return b, nil
}

// ExecSignalRecord encodes a signal for an exec'd program.
func ExecSignalRecord(id uint32, sig uint8) []byte {
	b := make([]byte, ControlLen)
	b[0] = ControlExecSignal
	b[1] = sig
	binary.LittleEndian.PutUint32(b[4:], id)
	return b
}

// ExecWinsizeRecord encodes a window size for an exec'd program's
// terminal.
func ExecWinsizeRecord(id uint32, rows, cols uint16) []byte {
	b := make([]byte, ControlLen+4)
	b[0] = ControlExecWinsize
	binary.LittleEndian.PutUint16(b[2:], rows)
	binary.LittleEndian.PutUint16(b[4:], cols)
	binary.LittleEndian.PutUint32(b[8:], id)
	return b
}
