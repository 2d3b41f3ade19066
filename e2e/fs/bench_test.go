package fs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// The benchmarks drive krun-core serve --fs and QEMU's C virtiofsd with the
// same Go driver (testguest + fuseclient over real virtqueues, requests
// scattered over 4 KiB descriptors as a guest's pages are, one request in
// flight) on directories of the same host file system:
//
//	BenchmarkCreateStatUnlink: CREATE, RELEASE, GETATTR, UNLINK, FORGET
//	BenchmarkSeqWrite1M / BenchmarkSeqRead1M: 1 MiB per operation, split
//	into requests of the size each server negotiated (max_write, max_pages)
//
// Run: go test -run XXX -bench . -benchtime 3s ./e2e/fs/

type benchTarget struct {
	name  string
	start func(b *testing.B, dir string) *daemon
}

var benchTargets = []benchTarget{
	{"krun", func(b *testing.B, dir string) *daemon { return serveFS(b, "path="+dir+",tag=bench") }},
	// The same plugin without its sandbox, to show what seccomp and
	// landlock cost per request.
	{"krun-nosandbox", func(b *testing.B, dir string) *daemon {
		return serveFS(b, "path="+dir+",tag=bench", "--sandbox", "off")
	}},
	{"virtiofsd", func(b *testing.B, dir string) *daemon { return virtiofsd(b, dir) }},
}

func benchShare(b *testing.B) string {
	b.Helper()
	dir := filepath.Join(b.TempDir(), "share")
	if err := os.Mkdir(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	return dir
}

func BenchmarkCreateStatUnlink(b *testing.B) {
	for _, tg := range benchTargets {
		b.Run(tg.name, func(b *testing.B) {
			dir := benchShare(b)
			d := tg.start(b, dir)
			g := dialFS(b, d.Socket, 4096)
			c := g.req
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				name := fmt.Sprintf("f%d", i)
				en, fh, err := c.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Release(en.NodeID, fh, false); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Getattr(en.NodeID); err != nil {
					b.Fatal(err)
				}
				if err := c.Unlink(fuse.RootID, name); err != nil {
					b.Fatal(err)
				}
				if err := g.hiprio.Forget(en.NodeID, 1); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "files/s")
		})
	}
}

const seqFileSize = 64 << 20

func benchSeq(b *testing.B, write bool) {
	for _, tg := range benchTargets {
		b.Run(tg.name, func(b *testing.B) {
			dir := benchShare(b)
			if !write {
				buf := make([]byte, seqFileSize)
				for i := range buf {
					buf[i] = byte(i * 7)
				}
				if err := os.WriteFile(filepath.Join(dir, "data"), buf, 0o644); err != nil {
					b.Fatal(err)
				}
			}
			d := tg.start(b, dir)
			g := dialFS(b, d.Socket, 4096)
			c := g.req
			// Renegotiate to learn this server's limits (INIT is idempotent
			// on a fresh session).
			init, err := c.Init(0xffffffff)
			if err != nil {
				b.Fatal(err)
			}
			chunk := int(init.MaxWrite)
			if !write && init.MaxPages > 0 {
				chunk = int(init.MaxPages) * 4096
			}
			chunk = min(chunk, 1<<20)
			var node, fh uint64
			if write {
				en, h, err := c.Create(fuse.RootID, "data", unix.O_RDWR, 0o644)
				if err != nil {
					b.Fatal(err)
				}
				node, fh = en.NodeID, h
			} else {
				en, err := c.Lookup(fuse.RootID, "data")
				if err != nil {
					b.Fatal(err)
				}
				node = en.NodeID
				if fh, err = c.Open(node, unix.O_RDONLY); err != nil {
					b.Fatal(err)
				}
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(1 << 20)
			b.ResetTimer()
			off := uint64(0)
			for i := 0; i < b.N; i++ {
				if off+1<<20 > seqFileSize {
					off = 0
				}
				for k := 0; k < 1<<20; k += chunk {
					if write {
						n, err := c.Write(node, fh, off+uint64(k), buf[k:k+chunk])
						if err != nil || int(n) != chunk {
							b.Fatalf("WRITE: %d %v", n, err)
						}
					} else {
						got, err := c.Read(node, fh, off+uint64(k), uint32(chunk))
						if err != nil || len(got) != chunk {
							b.Fatalf("READ: %d %v", len(got), err)
						}
					}
				}
				off += 1 << 20
			}
			b.StopTimer()
			b.ReportMetric(float64(chunk), "bytes/request")
		})
	}
}

func BenchmarkSeqWrite1M(b *testing.B) { benchSeq(b, true) }
func BenchmarkSeqRead1M(b *testing.B)  { benchSeq(b, false) }

// BenchmarkGetattr is the round trip of the smallest request.
func BenchmarkGetattr(b *testing.B) {
	for _, tg := range benchTargets {
		b.Run(tg.name, func(b *testing.B) {
			d := tg.start(b, benchShare(b))
			g := dialFS(b, d.Socket, 0)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := g.req.Getattr(fuse.RootID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
