package blk

import (
	"context"
	"fmt"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

var _ backend.Device = (*Device)(nil)

// Info describes the device to the vhost-user back-end framework.
func (d *Device) Info() backend.DeviceInfo {
	return backend.DeviceInfo{
		Type:             DeviceID,
		NumQueues:        d.numQueues,
		MaxQueueSize:     d.queueSize,
		Features:         d.Features(),
		ProtocolFeatures: vhostuser.ProtocolConfig | vhostuser.ProtocolMQ,
	}
}

// ServeQueue serves request queue idx until ctx is cancelled, with up to
// Config.QueueWorkers requests in flight. Each request goroutine has its own
// scratch space; the disk is shared by all of them.
func (d *Device) ServeQueue(ctx context.Context, idx int, vr *backend.Vring) error {
	if idx < 0 || idx >= d.numQueues {
		return fmt.Errorf("blk: queue %d of %d", idx, d.numQueues)
	}
	if d.qworkers > 1 {
		return d.serveConcurrent(ctx, vr, d.qworkers)
	}
	w := d.newWorker()
	return vr.Run(ctx, func(c *virtq.Chain) (uint32, error) {
		return w.handleChain(c)
	})
}
