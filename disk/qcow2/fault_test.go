package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// faultyBuffer returns a buffer of n bytes whose every access faults
// (SIGBUS): a mapping of a memfd that was then truncated, as guest memory
// is when a front-end shrinks its memfd under a running queue.
func faultyBuffer(t *testing.T, n int) []byte {
	t.Helper()
	fd, err := unix.MemfdCreate("qcow2-fault", 0)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// readFaulting reads into p the way the ring engine runs a request: with
// faults turned into panics, recovered.
func readFaulting(im *Image, p []byte, off int64) (faulted bool) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if recover() != nil {
			faulted = true
		}
	}()
	im.ReadAt(p, off)
	return false
}

// TestFaultDuringCompressedReadKeepsImageUsable reads a compressed cluster
// into memory that faults (guest memory a hostile front-end truncated; the
// back-end's ring engine recovers the fault and fails the queue) and then
// reads it again. The image must keep serving compressed clusters: a fault
// while copying out of the decompression cache left its lock held, and
// every later read of a compressed cluster, on any queue and for the next
// front-end too, waited for it for ever.
func TestFaultDuringCompressedReadKeepsImageUsable(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	p := filepath.Join(dir, "img.qcow2")
	const size = 1 << 20
	b := make([]byte, size)
	for i := range b {
		b[i] = "compressible "[i%13] ^ byte(i>>12)
	}
	if err := os.WriteFile(src, b, 0o600); err != nil {
		t.Fatal(err)
	}
	sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", src, p)
	want := qemuRaw(t, p)
	im := openImage(t, p, true)

	for _, cached := range []bool{true, false} {
		off := int64(0)
		if !cached {
			off = 4 << 16
		}
		if cached {
			// Fill the decompression cache with the cluster.
			got := make([]byte, 4096)
			if _, err := im.ReadAt(got, off); err != nil || !bytes.Equal(got, want[off:off+4096]) {
				t.Fatalf("read at %d: %v", off, err)
			}
		}
		if !readFaulting(im, faultyBuffer(t, 4096), off+4096) {
			t.Fatalf("cached=%v: reading into a truncated mapping did not fault", cached)
		}
		done := make(chan error, 1)
		got := make([]byte, 8192)
		go func() {
			_, err := im.ReadAt(got, off)
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil || !bytes.Equal(got, want[off:off+8192]) {
				t.Fatalf("cached=%v: read after the fault: %v", cached, err)
			}
		case <-time.After(10 * time.Second):
			// Not closed: Close would wait for the lock too.
			t.Fatalf("cached=%v: a read of a compressed cluster hangs after a fault on the reader's memory", cached)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}

// writeFaulting is readFaulting for a write.
func writeFaulting(im *Image, p []byte, off int64) (faulted bool) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if recover() != nil {
			faulted = true
		}
	}()
	im.WriteAt(p, off)
	return false
}

// TestFaultDuringWriteKeepsMetadataPending writes two clusters from memory
// whose second page faults. The first cluster's new L2 entry is then in
// the cache only, as after a write that failed midway: a later write into
// that cluster must take the path that writes the entry to the file before
// the write completes (metaPending), not be acknowledged in place and lost
// when the plugin is killed. A fault ended the request without that flag.
func TestFaultDuringWriteKeepsMetadataPending(t *testing.T) {
	const cs = 4096
	p := filepath.Join(t.TempDir(), "img.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 1 << 20, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im := openImage(t, p, false)
	defer im.Close()
	// Two allocated clusters, then zeroed with their allocation kept:
	// a write reuses each in place of its zero flag, copying the
	// request's bytes into a cluster-sized buffer (Go code, so a fault
	// on them panics).
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x11}, 2*cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.WriteZeroes(0, 2*cs, false); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}

	// Two clusters of data whose second one faults: the end of one page
	// of a memfd and the start of the next, past the memfd's end.
	ps := os.Getpagesize()
	fd, err := unix.MemfdCreate("qcow2-fault", 0)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(2*ps)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, 2*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	buf := m[ps-cs : ps+cs]
	copy(buf, bytes.Repeat([]byte{0x22}, cs))
	if err := unix.Ftruncate(fd, int64(ps)); err != nil {
		t.Fatal(err)
	}
	if !writeFaulting(im, buf, 0) {
		t.Fatal("writing from a truncated mapping did not fault")
	}
	if !im.metaPending.Load() {
		t.Fatal("a write that ended in a fault left its L2 entries in the cache with metaPending clear: a write into its clusters is acknowledged in place")
	}
	// The next write into the first cluster persists them.
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x33}, 512), 512); err != nil {
		t.Fatal(err)
	}
	if im.metaPending.Load() {
		t.Fatal("metaPending still set after a write that persisted the metadata")
	}
	got := make([]byte, 2*cs)
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{0x22}, cs), make([]byte, cs)...)
	copy(want[512:], bytes.Repeat([]byte{0x33}, 512))
	if !bytes.Equal(got, want) {
		t.Fatalf("content after the fault: first differing byte %d", firstDiff(got, want))
	}
}
