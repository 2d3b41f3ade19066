package pluginsdk

// From review (helper sdkreview): docs/PLUGINS.md says Shutdown calls Flush
// "after the rings stopped" and Close "after Flush"; devices/blk's Close
// says "Queues must have stopped". Shutdown waits for the back-end at most
// shutdownWait (10 s) and then calls Flush and Close anyway, while a
// Handle still runs: a third-party device that trusted the docs (no lock
// between Handle and Close) closes, frees or unmaps what Handle is using.
// And `run` gives the whole Shutdown RPC 10 s (core/vmm
// pluginShutdownTimeout), the same 10 s: there the plugin is killed about
// when its Flush would start.

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// slowBlk is a virtio-blk-typed device whose Handle takes long (storage
// that hangs: an NFS server gone, a dying disk).
type slowBlk struct {
	release                   chan struct{}
	handling                  atomic.Bool
	flushedWhile, closedWhile atomic.Bool
	started                   chan struct{}
}

func (*slowBlk) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 2, NumQueues: 1, MaxQueueSize: 256, ProtocolFeatures: vhostuser.ProtocolConfig}
}
func (*slowBlk) ConfigSize() int                     { return 60 }
func (*slowBlk) ReadConfig(_ uint32, p []byte) error { clear(p); return nil }
func (*slowBlk) WriteConfig(uint32, []byte) error    { return errors.New("read-only") }
func (*slowBlk) SetFeatures(uint64) error            { return nil }
func (*slowBlk) Reset()                              {}
func (d *slowBlk) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d}, nil
}
func (d *slowBlk) Handle(req *backend.Request) {
	d.handling.Store(true)
	close(d.started)
	<-d.release
	d.handling.Store(false)
	req.Complete(0)
}
func (d *slowBlk) Flush() error { d.flushedWhile.Store(d.handling.Load()); return nil }
func (d *slowBlk) Close() error { d.closedWhile.Store(d.handling.Load()); return nil }

func TestShutdownFlushesAfterTheRingsStopped(t *testing.T) {
	if testing.Short() {
		t.Skip("waits shutdownWait (10 s)")
	}
	dev := &slowBlk{release: make(chan struct{}), started: make(chan struct{})}
	defer close(dev.release)
	s, _ := newTestServer(&devPlugin{dev: dev})
	if _, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true}); err != nil {
		t.Fatal(err)
	}
	// The vhost-user socket, a listening one, on an fd Start accepts.
	sock := filepath.Join(t.TempDir(), "blk.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	fd, err := unix.FcntlInt(lf.Fd(), unix.F_DUPFD_CLOEXEC, pluginpb.FirstResourceFD)
	if err != nil || fd >= pluginpb.FirstResourceFD+maxFiles {
		t.Skipf("no free fd in range: %d, %v", fd, err)
	}
	if _, err := s.Start(context.Background(), &pluginpb.StartRequest{SocketFd: uint32(fd)}); err != nil {
		t.Fatal(err)
	}
	b, err := testguest.DialBlk(sock, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = b.Read(ctx, 0, make([]byte, 512))
	}()
	select {
	case <-dev.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached Handle")
	}
	start := time.Now()
	if _, err := s.Shutdown(context.Background(), &pluginpb.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if dev.closedWhile.Load() {
		t.Errorf("Shutdown called Close while Handle still ran (Flush too: %v); docs/PLUGINS.md: Flush \"after the rings stopped\", Close \"after Flush\"",
			dev.flushedWhile.Load())
	}
	if took >= 9*time.Second {
		t.Errorf("Shutdown answered after %v: run gives the whole RPC 10 s (core/vmm pluginShutdownTimeout), so there it is killed before its Flush's result comes back", took.Round(100*time.Millisecond))
	}
}
