package acpi

import (
	"encoding/binary"
	"fmt"
)

// A few AML encodings (ACPI 6.5, chapter 20), enough for the DSDT the core
// needs: names, integers, strings, packages, buffers, devices and scopes.

const (
	amlZeroOp    = 0x00
	amlOneOp     = 0x01
	amlNameOp    = 0x08
	amlBytePfx   = 0x0a
	amlWordPfx   = 0x0b
	amlDWordPfx  = 0x0c
	amlStringPfx = 0x0d
	amlQWordPfx  = 0x0e
	amlScopeOp   = 0x10
	amlBufferOp  = 0x11
	amlPackageOp = 0x12
	amlExtOpPfx  = 0x5b
	amlDeviceOp  = 0x82 // after amlExtOpPfx
	amlRootChar  = '\\'
)

// pkgLength encodes the PkgLength of a package whose content (everything
// after the PkgLength itself) is n bytes. The encoded value counts its own
// bytes too.
func pkgLength(n int) ([]byte, error) {
	for size := 1; size <= 4; size++ {
		total := n + size
		switch {
		case size == 1 && total < 1<<6:
			return []byte{byte(total)}, nil
		case size > 1 && total < 1<<(4+8*(size-1)):
			b := make([]byte, size)
			b[0] = byte(size-1)<<6 | byte(total&0xf)
			for i := 1; i < size; i++ {
				b[i] = byte(total >> (4 + 8*(i-1)))
			}
			return b, nil
		}
	}
	return nil, fmt.Errorf("AML package of %d bytes is too long", n)
}

// withPkg prefixes body with its PkgLength, after op.
func withPkg(op []byte, body []byte) ([]byte, error) {
	pl, err := pkgLength(len(body))
	if err != nil {
		return nil, err
	}
	out := append(append(append([]byte{}, op...), pl...), body...)
	return out, nil
}

// nameSeg checks a 4-character AML name segment.
func nameSeg(s string) ([]byte, error) {
	if len(s) != 4 {
		return nil, fmt.Errorf("AML name %q is not 4 characters", s)
	}
	for i := 0; i < 4; i++ {
		c := s[i]
		ok := c == '_' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9'
		if !ok {
			return nil, fmt.Errorf("AML name %q has invalid character %q", s, c)
		}
	}
	return []byte(s), nil
}

func amlInteger(v uint64) []byte {
	switch {
	case v == 0:
		return []byte{amlZeroOp}
	case v == 1:
		return []byte{amlOneOp}
	case v <= 0xff:
		return []byte{amlBytePfx, byte(v)}
	case v <= 0xffff:
		return binary.LittleEndian.AppendUint16([]byte{amlWordPfx}, uint16(v))
	case v <= 0xffffffff:
		return binary.LittleEndian.AppendUint32([]byte{amlDWordPfx}, uint32(v))
	}
	return binary.LittleEndian.AppendUint64([]byte{amlQWordPfx}, v)
}

func amlString(s string) []byte {
	return append(append([]byte{amlStringPfx}, s...), 0)
}

// amlName is Name(name, value).
func amlName(name string, value []byte) ([]byte, error) {
	seg, err := nameSeg(name)
	if err != nil {
		return nil, err
	}
	return append(append([]byte{amlNameOp}, seg...), value...), nil
}

// amlPackage is Package(){elements...}.
func amlPackage(elements ...[]byte) ([]byte, error) {
	if len(elements) > 255 {
		return nil, fmt.Errorf("AML package with %d elements", len(elements))
	}
	body := []byte{byte(len(elements))}
	for _, e := range elements {
		body = append(body, e...)
	}
	return withPkg([]byte{amlPackageOp}, body)
}

// amlBuffer is Buffer(){data}.
func amlBuffer(data []byte) ([]byte, error) {
	body := append(amlInteger(uint64(len(data))), data...)
	return withPkg([]byte{amlBufferOp}, body)
}

// amlDevice is Device(name){body}.
func amlDevice(name string, body []byte) ([]byte, error) {
	seg, err := nameSeg(name)
	if err != nil {
		return nil, err
	}
	return withPkg([]byte{amlExtOpPfx, amlDeviceOp}, append(seg, body...))
}

// amlRootScope is Scope(\name){body}.
func amlRootScope(name string, body []byte) ([]byte, error) {
	seg, err := nameSeg(name)
	if err != nil {
		return nil, err
	}
	return withPkg([]byte{amlScopeOp}, append(append([]byte{amlRootChar}, seg...), body...))
}

// Resource descriptors for _CRS (ACPI 6.5, 6.4).
const (
	resMemory32Fixed = 0x86
	resExtendedIRQ   = 0x89
	resEndTag        = 0x79
)

// memory32Fixed is Memory32Fixed(ReadWrite, base, size).
func memory32Fixed(base, size uint32) []byte {
	b := []byte{resMemory32Fixed, 9, 0, 1}
	b = binary.LittleEndian.AppendUint32(b, base)
	return binary.LittleEndian.AppendUint32(b, size)
}

// Extended interrupt descriptor flags.
const (
	irqConsumer   = 1 << 0
	irqEdge       = 1 << 1
	irqActiveLow  = 1 << 2
	irqShared     = 1 << 3
	irqWakeCapabl = 1 << 4
)

// extendedIRQ is Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive){gsi}.
func extendedIRQ(gsi uint32) []byte {
	b := []byte{resExtendedIRQ, 6, 0, irqConsumer | irqEdge, 1}
	return binary.LittleEndian.AppendUint32(b, gsi)
}

// endTag closes a resource template (checksum 0: "treat as correct").
func endTag() []byte { return []byte{resEndTag, 0} }
