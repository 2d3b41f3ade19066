package vmtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/initramfs/kmod/kmodtest"
)

// fakeBzImage builds a setup header pointing at payload.
func fakeBzImage(payload []byte, version uint16) []byte {
	const sects = 1
	img := make([]byte, (sects+1)*512+16+len(payload))
	img[bzSetupSects] = sects
	copy(img[bzHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(img[bzVersion:], version)
	binary.LittleEndian.PutUint32(img[bzPayloadOffset:], 16)
	binary.LittleEndian.PutUint32(img[bzPayloadLength:], uint32(len(payload)))
	copy(img[(sects+1)*512+16:], payload)
	return img
}

func TestBzPayload(t *testing.T) {
	good := fakeBzImage([]byte("PAYLOAD"), 0x20f)
	if p, err := bzPayload(good); err != nil || string(p) != "PAYLOAD" {
		t.Fatalf("bzPayload = %q, %v", p, err)
	}
	tooLong := bytes.Clone(good)
	binary.LittleEndian.PutUint32(tooLong[bzPayloadLength:], 0xffffffff)
	farOff := bytes.Clone(good)
	binary.LittleEndian.PutUint32(farOff[bzPayloadOffset:], 0xfffffff0)
	for name, img := range map[string][]byte{
		"short":        good[:0x100],
		"no magic":     append(make([]byte, 0x250), good[0x250:]...),
		"old protocol": fakeBzImage([]byte("P"), 0x206),
		"length":       tooLong,
		"offset":       farOff,
	} {
		if _, err := bzPayload(img); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := decompressPayload(context.Background(), []byte("BZh91AY")); err == nil {
		t.Errorf("bzip2 payload accepted")
	}
}

// TestExtractVmlinuxXZ checks the xz path and the PVH note check with an
// xz-compressed fake kernel (an ELF without the PVH note is refused).
func TestExtractVmlinuxXZ(t *testing.T) {
	if _, err := exec.LookPath("xz"); err != nil {
		t.Skip("xz not installed")
	}
	elfImg := kmodtest.Module("name=not-a-kernel")
	cmd := exec.Command("xz", "-c", "--check=crc32")
	cmd.Stdin = bytes.NewReader(elfImg)
	xzData, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decompressPayload(context.Background(), append(xzData, 0, 1, 2, 3)) // size trailer as in a bzImage
	if err != nil || !bytes.Equal(got, elfImg) {
		t.Fatalf("xz round trip: %v", err)
	}
	dir := t.TempDir()
	k := &Kernel{Release: "9.9.9-test", Vmlinuz: filepath.Join(dir, "vmlinuz-9.9.9-test")}
	if err := os.WriteFile(k.Vmlinuz, fakeBzImage(xzData, 0x20f), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := extractVmlinux(context.Background(), k); err == nil || !strings.Contains(err.Error(), "PVH") {
		t.Errorf("kernel without PVH note: err = %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "vmlinux*")); len(m) != 0 {
		t.Errorf("failed extraction left %v", m)
	}
}
