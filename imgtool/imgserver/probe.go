package imgserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// signature is a format's magic bytes at an offset.
type signature struct {
	format string
	off    int
	magic  []byte
}

// signatures of formats krun-core does not serve, so that probe can say
// what a file is instead of calling it raw. Offsets and bytes come from
// each format's published layout.
var signatures = []signature{
	{"qed", 0, []byte("QED\x00")},
	{"vmdk", 0, []byte("KDMV")},
	{"vmdk", 0, []byte("COWD")},
	{"vmdk", 0, []byte("# Disk DescriptorFile")},
	{"vhdx", 0, []byte("vhdxfile")},
	{"vpc", 0, []byte("conectix")},
	{"vdi", 0, []byte("<<< Oracle VM VirtualBox Disk Image >>>")},
	{"vdi", 0x40, []byte{0x7f, 0x10, 0xda, 0xbe}},
	{"luks", 0, []byte("LUKS\xba\xbe")},
	{"parallels", 0, []byte("WithoutFreeSpace")},
	{"parallels", 0, []byte("WithouFreSpacExt")},
	{"bochs", 0, []byte("Bochs Virtual HD Image")},
	{"cloop", 0, []byte("#!/bin/sh\n#V2.0 Format")},
	{"dmg", -512, []byte("koly")},
	{"vpc", -512, []byte("conectix")},
}

const probeBytes = 512

// Probe guesses a file's format from its first (and last) 512 bytes. It is
// the only place krun-core guesses; the answer is for a user to record.
func Probe(f *os.File) (*imagepb.ProbeResponse, error) {
	length, _, err := sizes(f)
	if err != nil {
		return nil, err
	}
	head := make([]byte, probeBytes)
	n, err := f.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read: %w", err)
	}
	head = head[:n]
	var tail []byte
	if length >= probeBytes {
		tail = make([]byte, probeBytes)
		if _, err := f.ReadAt(tail, length-probeBytes); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read: %w", err)
		}
	}
	if length == 0 {
		return &imagepb.ProbeResponse{Format: "raw", Supported: true, Detail: "empty file"}, nil
	}
	if len(head) >= 8 && binary.BigEndian.Uint32(head) == 0x514649fb {
		v := binary.BigEndian.Uint32(head[4:])
		switch v {
		case 2, 3:
		case 1:
			return &imagepb.ProbeResponse{Format: "qcow", Detail: "qcow version 1 header"}, nil
		default:
			return &imagepb.ProbeResponse{Format: "qcow2",
				Detail: fmt.Sprintf("qcow2 magic with unknown version %d: not a usable image of any format", v)}, nil
		}
		detail := fmt.Sprintf("qcow2 version %d header", v)
		if _, err := qcow2.ReadInfo(f); err != nil {
			detail += fmt.Sprintf(" that does not parse (%s)", oneLine(err))
		}
		return &imagepb.ProbeResponse{Format: "qcow2", Supported: true, Detail: detail}, nil
	}
	for _, s := range signatures {
		b, off := head, s.off
		if off < 0 {
			b, off = tail, len(tail)+off
		}
		if off >= 0 && off+len(s.magic) <= len(b) && bytes.Equal(b[off:off+len(s.magic)], s.magic) {
			return &imagepb.ProbeResponse{Format: s.format,
				Detail: fmt.Sprintf("%s signature at offset %d; krun-core serves raw and qcow2 only: convert it with a tool you trust", s.format, s.off)}, nil
		}
	}
	return &imagepb.ProbeResponse{Format: "raw", Supported: true, Detail: "no known image header"}, nil
}
