package backend_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// funcBlk is a one-queue virtio-blk-typed device whose Handle is a func.
type funcBlk struct{ handle func(*backend.Request) }

func (d *funcBlk) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 2, NumQueues: 1, MaxQueueSize: 256, ProtocolFeatures: vhostuser.ProtocolConfig}
}
func (d *funcBlk) ReadConfig(off uint32, p []byte) error {
	if uint64(off)+uint64(len(p)) > 64 {
		return fmt.Errorf("beyond config")
	}
	clear(p)
	if off == 0 && len(p) >= 8 {
		p[1] = 1 // 256 sectors
	}
	return nil
}
func (d *funcBlk) WriteConfig(uint32, []byte) error { return fmt.Errorf("read-only") }
func (d *funcBlk) SetFeatures(uint64) error         { return nil }
func (d *funcBlk) Reset()                           {}
func (d *funcBlk) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d}, nil
}
func (d *funcBlk) Handle(r *backend.Request) { d.handle(r) }

// TestCompleteBeyondWritableIsClamped: a device (a third-party
// plugin's) that completes a request claiming more bytes written than the
// chain's device-writable buffers hold must not have that length published
// to the driver: virtio 1.2, 2.7.8.2 "the device MUST NOT set len to a
// value larger than the total writable buffer size"; a driver that trusts
// len (virtio-net's, virtio-console's receive) reads past its buffer. The
// framework owns the used ring and knows the chain's WritableLen, but
// publishes the plugin's number as given, and says nothing in its log.
//
// From review, helper-103; fixed: Request.Complete clamps written to the
// chain's WritableLen and logs the first such completion of each ring.
func TestCompleteBeyondWritableIsClamped(t *testing.T) {
	dev := &funcBlk{handle: func(r *backend.Request) {
		c := r.Chain()
		_ = c.SkipWrite(c.RemainingWrite() - 1)
		c.Write([]byte{0})
		r.Complete(uint32(c.WritableLen()) + 1<<20) // the plugin's bug
	}}
	srv, err := backend.NewServer(dev, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "blk.sock")
	backendtest.Serve(t, srv, sock)
	b, err := testguest.DialBlk(sock, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req := &testguest.BlkRequest{Type: testguest.BlkTIn, Data: make([]byte, 512)}
	if err := b.Do(ctx, []*testguest.BlkRequest{req}); err != nil {
		t.Fatal(err)
	}
	if writable := uint32(512 + 1); req.Written > writable {
		t.Errorf("the driver was told %d bytes were written into %d writable bytes", req.Written, writable)
	}
}
