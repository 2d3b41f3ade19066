package imgserver

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRawSinkNotFullLengthBeforeFinish: a raw output reaches its final
// length only at finish. A convert killed mid-way (SIGKILL, power loss)
// would otherwise leave a file of the image's size whose unwritten part
// reads as zeros: output that looks complete (from review).
func TestRawSinkNotFullLengthBeforeFinish(t *testing.T) {
	out, err := os.Create(filepath.Join(t.TempDir(), "out.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	const size = 64 << 20
	s, err := newSink(out, "raw", OutputOptions{}, size)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xa5}, chunkBytes)
	if err := s.write(data, 0); err != nil {
		t.Fatal(err)
	}
	if st, _ := out.Stat(); st.Size() != chunkBytes {
		t.Fatalf("after 1 of %d chunks the raw output is %d bytes, want %d (the data written so far)", size/chunkBytes, st.Size(), chunkBytes)
	}
	if err := s.finish(size); err != nil {
		t.Fatal(err)
	}
	if st, _ := out.Stat(); st.Size() != size {
		t.Fatalf("after finish the raw output is %d bytes, want %d", st.Size(), size)
	}
}

// TestRawSinkRefusesASizeTheFileSystemCannotHold: the size is checked
// when the output is made, before any data is written.
func TestRawSinkRefusesASizeTheFileSystemCannotHold(t *testing.T) {
	dir := t.TempDir()
	probe, err := os.Create(filepath.Join(dir, "probe"))
	if err != nil {
		t.Fatal(err)
	}
	err = probe.Truncate(1 << 62)
	probe.Close()
	if err == nil {
		t.Skip("the file system of the test's temporary directory holds a 4 EiB sparse file (tmpfs): nothing to refuse")
	}
	out, err := os.Create(filepath.Join(dir, "out.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := newSink(out, "raw", OutputOptions{}, 1<<62); err == nil {
		t.Fatal("a raw output of 4 EiB was accepted")
	}
	if st, _ := out.Stat(); st.Size() != 0 {
		t.Fatalf("the refused output is %d bytes, want 0", st.Size())
	}
}

// TestRawSourceThatShrinks: a raw input cut short while it is converted
// fails the read; the part it lost is not made up with zeros (from
// review).
func TestRawSourceThatShrinks(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "in.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(bytes.Repeat([]byte{7}, 8192)); err != nil {
		t.Fatal(err)
	}
	src := &rawSource{f: f, size: 8192}
	buf := make([]byte, 4096)
	if _, err := src.ReadAt(buf, 4096); err != nil {
		t.Fatalf("read within the file: %v", err)
	}
	if err := f.Truncate(6000); err != nil {
		t.Fatal(err)
	}
	_, err = src.ReadAt(buf, 4096)
	if err == nil || !strings.Contains(err.Error(), "shrank while it was read") || !strings.Contains(err.Error(), "ends at 6000") {
		t.Fatalf("read across the new end: %v, want an error that says the file shrank", err)
	}
}
