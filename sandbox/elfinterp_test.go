package sandbox

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// buildELF makes a minimal ELF file: a header and phnum program headers
// of which the one at interpAt (if >= 0) is PT_INTERP for interp.
func buildELF(class elf.Class, bo binary.ByteOrder, phnum, interpAt int, interp string) []byte {
	hsize, entsize := 64, 56
	if class == elf.ELFCLASS32 {
		hsize, entsize = 52, 32
	}
	phoff := hsize
	dataOff := phoff + phnum*entsize
	b := make([]byte, dataOff+len(interp))
	copy(b, "\x7fELF")
	b[4] = byte(class)
	if bo == binary.LittleEndian {
		b[5] = byte(elf.ELFDATA2LSB)
	} else {
		b[5] = byte(elf.ELFDATA2MSB)
	}
	b[6] = byte(elf.EV_CURRENT)
	bo.PutUint16(b[16:], uint16(elf.ET_EXEC))
	bo.PutUint16(b[18:], uint16(elf.EM_X86_64))
	bo.PutUint32(b[20:], uint32(elf.EV_CURRENT))
	if class == elf.ELFCLASS32 {
		bo.PutUint32(b[28:], uint32(phoff))
		bo.PutUint16(b[40:], uint16(hsize))
		bo.PutUint16(b[42:], uint16(entsize))
		bo.PutUint16(b[44:], uint16(phnum))
	} else {
		bo.PutUint64(b[32:], uint64(phoff))
		bo.PutUint16(b[52:], uint16(hsize))
		bo.PutUint16(b[54:], uint16(entsize))
		bo.PutUint16(b[56:], uint16(phnum))
	}
	for i := 0; i < phnum; i++ {
		p := b[phoff+i*entsize:]
		typ := uint32(elf.PT_LOAD)
		if i == interpAt {
			typ = uint32(elf.PT_INTERP)
		}
		bo.PutUint32(p, typ)
		if i != interpAt {
			continue
		}
		if class == elf.ELFCLASS32 {
			bo.PutUint32(p[4:], uint32(dataOff))
			bo.PutUint32(p[16:], uint32(len(interp)))
		} else {
			bo.PutUint64(p[8:], uint64(dataOff))
			bo.PutUint64(p[32:], uint64(len(interp)))
		}
	}
	copy(b[dataOff:], interp)
	return b
}

func TestELFInterpreter(t *testing.T) {
	const ld = "/lib64/ld-linux-x86-64.so.2\x00"
	truncated := buildELF(elf.ELFCLASS64, binary.LittleEndian, 3, 1, ld)
	badEnt := buildELF(elf.ELFCLASS64, binary.LittleEndian, 2, 1, ld)
	binary.LittleEndian.PutUint16(badEnt[54:], 8)
	for _, c := range []struct {
		name   string
		file   []byte
		interp string
		ok     bool
	}{
		{"64-bit little-endian, dynamic", buildELF(elf.ELFCLASS64, binary.LittleEndian, 4, 2, ld), strings.TrimRight(ld, "\x00"), true},
		{"64-bit little-endian, static", buildELF(elf.ELFCLASS64, binary.LittleEndian, 4, -1, ""), "", false},
		{"32-bit big-endian, dynamic", buildELF(elf.ELFCLASS32, binary.BigEndian, 2, 0, "/lib/ld.so.1\x00"), "/lib/ld.so.1", true},
		{"32-bit little-endian, static", buildELF(elf.ELFCLASS32, binary.LittleEndian, 1, -1, ""), "", false},
		{"interpreter cut short by the file's end", truncated[:len(truncated)-10], "/lib64/ld-linux-x8", true},
		{"program headers past the end", truncated[:70], "", false},
		{"program header entries too small", badEnt, "", false},
		{"script", []byte("#!/bin/sh\necho hi\n"), "", false},
		{"empty", nil, "", false},
		{"bad class", append([]byte("\x7fELF\x07\x01"), make([]byte, 64)...), "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			interp, ok := elfInterpreter(bytes.NewReader(c.file))
			if interp != c.interp || ok != c.ok {
				t.Errorf("elfInterpreter = %q, %v; want %q, %v", interp, ok, c.interp, c.ok)
			}
		})
	}
}

// TestELFInterpreterOnRealBinaries: a dynamically linked system binary
// names its loader, as debug/elf reads it; the static test binary names
// none.
func TestELFInterpreterOnRealBinaries(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	paths := []string{self}
	if p, err := exec.LookPath("sh"); err == nil {
		paths = append(paths, p)
	}
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		want, wantOK := "", false
		if ef, err := elf.NewFile(f); err == nil {
			for _, ph := range ef.Progs {
				if ph.Type == elf.PT_INTERP {
					b := make([]byte, min(ph.Filesz, 256))
					n, _ := ph.ReadAt(b, 0)
					want, wantOK = strings.TrimRight(string(b[:n]), "\x00"), true
					break
				}
			}
		}
		got, ok := elfInterpreter(f)
		if got != want || ok != wantOK {
			t.Errorf("%s: elfInterpreter = %q, %v; debug/elf reads %q, %v", p, got, ok, want, wantOK)
		}
	}
}

// FuzzELFInterpreter: on any bytes it neither panics nor allocates past
// its bounds, and where debug/elf parses the file the two agree on
// whether it has a PT_INTERP segment.
func FuzzELFInterpreter(f *testing.F) {
	f.Add(buildELF(elf.ELFCLASS64, binary.LittleEndian, 4, 2, "/lib64/ld-linux-x86-64.so.2\x00"))
	f.Add(buildELF(elf.ELFCLASS32, binary.BigEndian, 2, 0, "/lib/ld.so.1\x00"))
	f.Add(buildELF(elf.ELFCLASS64, binary.LittleEndian, 1, -1, ""))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, ok := elfInterpreter(bytes.NewReader(b))
		ef, err := elf.NewFile(bytes.NewReader(b))
		if err != nil {
			return
		}
		want := false
		for _, p := range ef.Progs {
			if p.Type == elf.PT_INTERP {
				want = true
				break
			}
		}
		if ok != want {
			t.Errorf("elfInterpreter found PT_INTERP: %v; debug/elf: %v", ok, want)
		}
	})
}
