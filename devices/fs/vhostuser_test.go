package fs_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs"
	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// rig is a virtio-fs device on a temp directory served in-process over a
// socketpair and driven by the Go test guest through real rings.
type rig struct {
	dir    string
	dev    *fs.Device
	guest  *testguest.Guest
	req    *fuseclient.Client // on the first request queue
	hiprio *fuseclient.Client
	init   fuse.InitOut // the reply to the rig's INIT
}

func newRig(t testing.TB, cfg fs.Config, split int) *rig {
	t.Helper()
	return newRigWith(t, cfg, split, fuseclient.NewRing)
}

// newRigWith is newRig with the client's transport made by transport
// (fuseclient.NewRing or NewSyncRing).
func newRigWith(t testing.TB, cfg fs.Config, split int, transport func(*testguest.Memory, *testguest.Ring, int) *fuseclient.Ring) *rig {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg.Dir = f
	if cfg.Tag == "" {
		cfg.Tag = "share"
	}
	dev, err := fs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	back := os.NewFile(uintptr(fds[0]), "backend")
	front := os.NewFile(uintptr(fds[1]), "frontend")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- backend.Serve(ctx, back, dev, nil)
		back.Close()
	}()
	c, err := frontend.NewFromFile(front)
	front.Close()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	nq := 2
	if cfg.NumRequestQueues > 1 {
		nq = 1 + cfg.NumRequestQueues
	}
	ring := uint16(256)
	if cfg.QueueSize != 0 && cfg.QueueSize < 256 {
		ring = uint16(cfg.QueueSize)
	}
	g, err := testguest.Start(c, testguest.Options{NumQueues: nq, QueueSize: ring, MemSize: 64 << 20})
	if err != nil {
		c.Close()
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("backend.Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("back-end did not stop after the front-end disconnected")
		}
		cancel()
	})
	r := &rig{dir: dir, dev: dev, guest: g}
	rq, hq := transport(g.Mem, g.Rings[1], split), transport(g.Mem, g.Rings[0], split)
	t.Cleanup(func() { rq.Close(); hq.Close() })
	r.req, r.hiprio = fuseclient.New(rq), fuseclient.New(hq)
	var err2 error
	if r.init, err2 = r.req.Init(fuseclient.LinuxInitFlags); err2 != nil {
		t.Fatalf("INIT: %v", err2)
	}
	return r
}

func TestConfigSpace(t *testing.T) {
	r := newRig(t, fs.Config{Tag: "myfs", NumRequestQueues: 1}, 0)
	b, err := r.guest.Client.GetConfig(0, fs.ConfigSize)
	if err != nil {
		t.Fatal(err)
	}
	if string(bytes.TrimRight(b[:fs.TagSize], "\x00")) != "myfs" {
		t.Fatalf("tag %q", b[:fs.TagSize])
	}
	if n := binary.LittleEndian.Uint32(b[fs.TagSize:]); n != 1 {
		t.Fatalf("num_request_queues %d", n)
	}
	if got := r.dev.Info(); got.Type != fs.DeviceID || got.NumQueues != 2 {
		t.Fatalf("info %+v", got)
	}
}

func TestNewValidation(t *testing.T) {
	f, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nf, err := os.CreateTemp(t.TempDir(), "file")
	if err != nil {
		t.Fatal(err)
	}
	defer nf.Close()
	bad := []fs.Config{
		{ServerConfig: fs.ServerConfig{Dir: f}},
		{ServerConfig: fs.ServerConfig{Dir: f}, Tag: string(make([]byte, 37))},
		{ServerConfig: fs.ServerConfig{Dir: f}, Tag: "t", NumRequestQueues: 17},
		{ServerConfig: fs.ServerConfig{Dir: f}, Tag: "t", QueueSize: 1000},
		{ServerConfig: fs.ServerConfig{Dir: nf}, Tag: "t"},
		{ServerConfig: fs.ServerConfig{}, Tag: "t"},
		{ServerConfig: fs.ServerConfig{Dir: f, UIDMap: []fs.IDMap{{Guest: 0, Host: 1000, Count: 1}, {Guest: 0, Host: 2000, Count: 1}}}, Tag: "t"},
	}
	for i, c := range bad {
		if d, err := fs.New(c); err == nil {
			d.Close()
			t.Errorf("config %d accepted", i)
		}
	}
}

// TestMaxWriteFitsRing: on a device whose rings stop at 64, INIT offers
// max_pages (and max_write) that leave room for a request's headers in a
// chain of 64, and a write and a read of that size, one page per
// descriptor, go through.
func TestMaxWriteFitsRing(t *testing.T) {
	const ring = 64
	r := newRig(t, fs.Config{QueueSize: ring}, 4096)
	init := r.init
	if init.MaxPages == 0 || int(init.MaxPages)+4 > ring || init.MaxWrite != uint32(init.MaxPages)*4096 {
		t.Fatalf("INIT on rings of %d: max_pages %d, max_write %d", ring, init.MaxPages, init.MaxWrite)
	}
	en, fh, err := r.req.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), int(init.MaxWrite)/16)
	if n, err := r.req.Write(en.NodeID, fh, 0, data); err != nil || n != uint32(len(data)) {
		t.Fatalf("write of max_write: %d, %v", n, err)
	}
	got, err := r.req.Read(en.NodeID, fh, 0, init.MaxWrite)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read of max_write: %d bytes, %v", len(got), err)
	}
}

// TestOverVirtqueues runs a file's life through real rings, with requests
// and replies scattered over 4 KiB descriptors, and forgets on the hiprio
// queue.
func TestOverVirtqueues(t *testing.T) {
	for _, workers := range []int{1, 4} {
		t.Run(fmt.Sprintf("workers%d", workers), func(t *testing.T) {
			r := newRig(t, fs.Config{Workers: workers}, 4096)
			c := r.req
			en, fh, err := c.Create(fuse.RootID, "big", unix.O_RDWR, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			data := make([]byte, 1<<20)
			rand.New(rand.NewSource(2)).Read(data)
			if n, err := c.Write(en.NodeID, fh, 0, data); err != nil || int(n) != len(data) {
				t.Fatalf("WRITE: %d %v", n, err)
			}
			got, err := c.Read(en.NodeID, fh, 0, 1<<20)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("READ: %d bytes, %v", len(got), err)
			}
			if err := c.Release(en.NodeID, fh, false); err != nil {
				t.Fatal(err)
			}
			host, _ := os.ReadFile(r.dir + "/big")
			if !bytes.Equal(host, data) {
				t.Fatal("host file differs")
			}
			if err := r.hiprio.Forget(en.NodeID, 1); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Getattr(en.NodeID); err == nil {
				t.Fatal("node still known after FORGET on the hiprio queue")
			}
			if cnt := r.dev.Counters(); cnt["fs.nodes"] != 1 || cnt["fs.handles"] != 0 {
				t.Fatalf("counters %v", cnt)
			}
		})
	}
}

// TestConcurrentRequests drives the request queue from many goroutines at
// once (each its own file) through a shared ring.
func TestConcurrentRequests(t *testing.T) {
	r := newRig(t, fs.Config{Workers: 8}, 0)
	c := r.req
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("f%d", i)
			for k := 0; k < 20; k++ {
				en, fh, err := c.Create(fuse.RootID, name, unix.O_RDWR|unix.O_TRUNC, 0o644)
				if err != nil {
					errs <- err
					return
				}
				payload := bytes.Repeat([]byte{byte(i)}, 1000+k)
				if _, err := c.Write(en.NodeID, fh, 0, payload); err != nil {
					errs <- err
					return
				}
				got, err := c.Read(en.NodeID, fh, 0, 4096)
				if err != nil || !bytes.Equal(got, payload) {
					errs <- fmt.Errorf("%s: read %d bytes: %v", name, len(got), err)
					return
				}
				c.Release(en.NodeID, fh, false)
				r.hiprio.Forget(en.NodeID, 1)
				if err := c.Unlink(fuse.RootID, name); err != nil {
					errs <- err
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if cnt := r.dev.Counters(); cnt["fs.nodes"] != 1 || cnt["fs.handles"] != 0 {
		t.Fatalf("counters %v", cnt)
	}
}

// BenchmarkCreateStatUnlink measures the whole in-process path (testguest
// rings, vhost-user back-end, device, server) for one file's life.
func BenchmarkCreateStatUnlink(b *testing.B) {
	for _, workers := range []int{1, 8} {
		b.Run(fmt.Sprintf("workers%d", workers), func(b *testing.B) {
			r := newRig(b, fs.Config{Workers: workers}, 4096)
			c := r.req
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				name := fmt.Sprintf("f%d", i)
				en, fh, err := c.Create(fuse.RootID, name, unix.O_RDWR, 0o644)
				if err != nil {
					b.Fatal(err)
				}
				c.Release(en.NodeID, fh, false)
				if _, err := c.Getattr(en.NodeID); err != nil {
					b.Fatal(err)
				}
				if err := c.Unlink(fuse.RootID, name); err != nil {
					b.Fatal(err)
				}
				r.hiprio.Forget(en.NodeID, 1)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "files/s")
		})
	}
}

// BenchmarkGetattr is the round trip of the smallest request, through the
// client's reaper goroutine (NewRing) and waited for by the caller itself
// (NewSyncRing, as krun-bench's fs suite does).
func BenchmarkGetattr(b *testing.B) {
	for _, workers := range []int{1, 8} {
		for _, tr := range []struct {
			name string
			ring func(*testguest.Memory, *testguest.Ring, int) *fuseclient.Ring
		}{{"reaper", fuseclient.NewRing}, {"sync", fuseclient.NewSyncRing}} {
			b.Run(fmt.Sprintf("workers%d/%s", workers, tr.name), func(b *testing.B) {
				r := newRigWith(b, fs.Config{Workers: workers}, 0, tr.ring)
				for i := 0; i < b.N; i++ {
					if _, err := r.req.Getattr(fuse.RootID); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// TestSyncRing: the transport that waits in the caller's goroutine
// (krun-bench's) carries a file's whole life, scattered replies and the
// hiprio queue's FORGET (no reply) included.
func TestSyncRing(t *testing.T) {
	r := newRigWith(t, fs.Config{}, 4096, fuseclient.NewSyncRing)
	c := r.req
	en, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("CREATE: %v", err)
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), 1024) // 16 KiB: four descriptors each way
	if n, err := c.Write(en.NodeID, fh, 0, data); err != nil || int(n) != len(data) {
		t.Fatalf("WRITE: %d bytes, %v", n, err)
	}
	got, err := c.Read(en.NodeID, fh, 0, uint32(len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("READ: %d bytes (equal %v), %v", len(got), bytes.Equal(got, data), err)
	}
	if err := c.Release(en.NodeID, fh, false); err != nil {
		t.Fatalf("RELEASE: %v", err)
	}
	a, err := c.Getattr(en.NodeID)
	if err != nil || a.Size != uint64(len(data)) {
		t.Fatalf("GETATTR: size %d, %v", a.Size, err)
	}
	if _, err := c.Lookup(fuse.RootID, "missing"); err == nil {
		t.Fatal("LOOKUP of a missing name succeeded")
	}
	if err := c.Unlink(fuse.RootID, "f"); err != nil {
		t.Fatalf("UNLINK: %v", err)
	}
	if err := r.hiprio.Forget(en.NodeID, 1); err != nil {
		t.Fatalf("FORGET: %v", err)
	}
	// The FORGET was served: the node is gone.
	deadline := time.Now().Add(5 * time.Second)
	for r.dev.Counters()["fs.nodes"] != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("counters %v after FORGET, want the root alone", r.dev.Counters())
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkRead1M reads 1 MiB per request into 4 KiB scattered buffers.
func BenchmarkRead1M(b *testing.B) {
	r := newRig(b, fs.Config{}, 4096)
	if err := os.WriteFile(r.dir+"/data", make([]byte, 16<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	en, err := r.req.Lookup(fuse.RootID, "data")
	if err != nil {
		b.Fatal(err)
	}
	fh, err := r.req.Open(en.NodeID, unix.O_RDONLY)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(1 << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		got, err := r.req.Read(en.NodeID, fh, uint64(i%16)<<20, 1<<20)
		if err != nil || len(got) != 1<<20 {
			b.Fatalf("READ: %d %v", len(got), err)
		}
	}
}
