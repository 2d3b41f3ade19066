package console

import (
	"context"
	"fmt"
	"sync"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

var _ backend.Device = (*Device)(nil)

// MaxQueueSize is the largest ring the device accepts.
const MaxQueueSize = 1024

// Info describes the device to the vhost-user framework.
func (d *Device) Info() backend.DeviceInfo {
	return backend.DeviceInfo{
		Type:             DeviceType,
		NumQueues:        numQueues,
		MaxQueueSize:     MaxQueueSize,
		Features:         d.DeviceFeatures(),
		ProtocolFeatures: vhostuser.ProtocolConfig, // the driver reads max_nr_ports
	}
}

// Queue serves one of the four rings through the back-end's ring engine:
// the transmit queues as handlers (in order, on the ring's goroutine), the
// receive queues as producers that take the guest's buffers when there is
// something to put in them.
func (d *Device) Queue(ctx context.Context, idx int) (backend.QueueConfig, error) {
	switch idx {
	case portRx:
		return backend.QueueConfig{Producer: producer{d.rxMu, d.serveRx}}, nil
	case portTx:
		return backend.QueueConfig{Handler: handler{ctx, d.handleTx}}, nil
	case controlRx:
		return backend.QueueConfig{Producer: producer{d.crxMu, d.serveControlRx}}, nil
	case controlTx:
		return backend.QueueConfig{Handler: handler{ctx, d.handleControlTx}}, nil
	}
	return backend.QueueConfig{}, fmt.Errorf("virtio-console has no queue %d", idx)
}

// producer runs a receive ring, one at a time across ring restarts.
type producer struct {
	mu    *sync.Mutex
	serve func(ctx context.Context, b *backend.Buffers) error
}

func (p producer) Produce(ctx context.Context, b *backend.Buffers) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.serve(ctx, b)
}

// handler serves a transmit ring's chains; each is completed with nothing
// written.
type handler struct {
	ctx    context.Context // the ring's
	handle func(ctx context.Context, c *virtq.Chain)
}

func (h handler) Handle(req *backend.Request) {
	h.handle(h.ctx, req.Chain())
	req.Complete(0)
}
