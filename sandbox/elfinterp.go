package sandbox

import (
	"encoding/binary"
	"io"
	"strings"
)

// elfInterpreter reads the program headers of the ELF file in r and
// returns the path its PT_INTERP segment names (at most 256 bytes of it),
// and whether it has one. Anything it cannot read as ELF reports false:
// exec then decides. It replaces debug/elf, whose dependencies (DWARF,
// zlib) would more than double what the trampoline binary links.
func elfInterpreter(r io.ReaderAt) (string, bool) {
	const (
		ptInterp  = 3
		pnXNum    = 0xffff // the real count is in section header 0: not for executables we launch
		maxPhdrs  = 1 << 20
		maxInterp = 256
	)
	var id [16]byte
	if _, err := r.ReadAt(id[:], 0); err != nil || string(id[:4]) != "\x7fELF" {
		return "", false
	}
	var bo binary.ByteOrder
	switch id[5] {
	case 1:
		bo = binary.LittleEndian
	case 2:
		bo = binary.BigEndian
	default:
		return "", false
	}
	var phoff uint64
	var phentsize, phnum, minEnt uint64
	switch id[4] {
	case 1: // ELF32
		var h [52]byte
		if _, err := r.ReadAt(h[:], 0); err != nil {
			return "", false
		}
		phoff = uint64(bo.Uint32(h[28:]))
		phentsize, phnum, minEnt = uint64(bo.Uint16(h[42:])), uint64(bo.Uint16(h[44:])), 32
	case 2: // ELF64
		var h [64]byte
		if _, err := r.ReadAt(h[:], 0); err != nil {
			return "", false
		}
		phoff = bo.Uint64(h[32:])
		phentsize, phnum, minEnt = uint64(bo.Uint16(h[54:])), uint64(bo.Uint16(h[56:])), 56
	default:
		return "", false
	}
	if phnum == 0 || phnum == pnXNum || phentsize < minEnt || phnum*phentsize > maxPhdrs || phoff > 1<<62 {
		return "", false
	}
	ph := make([]byte, phnum*phentsize)
	if _, err := r.ReadAt(ph, int64(phoff)); err != nil {
		return "", false
	}
	for i := uint64(0); i < phnum; i++ {
		p := ph[i*phentsize : (i+1)*phentsize]
		if bo.Uint32(p) != ptInterp {
			continue
		}
		var off, size uint64
		if id[4] == 1 {
			off, size = uint64(bo.Uint32(p[4:])), uint64(bo.Uint32(p[16:]))
		} else {
			off, size = bo.Uint64(p[8:]), bo.Uint64(p[32:])
		}
		if off > 1<<62 {
			return "", true
		}
		b := make([]byte, min(size, maxInterp))
		n, _ := r.ReadAt(b, int64(off))
		return strings.TrimRight(string(b[:n]), "\x00"), true
	}
	return "", false
}
