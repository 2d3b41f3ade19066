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
