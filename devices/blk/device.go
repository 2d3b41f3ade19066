package blk

import (
	"context"
	"fmt"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
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

// Queue serves request queue idx through the back-end's ring engine with up
// to Config.QueueWorkers requests on the disk at once (reads and writes
// alike, but one write at a time with Config.SerialWrites), completing them
// out of order as virtio-blk allows. Each of the
// ring's goroutines has its own scratch space; the disk is shared.
func (d *Device) Queue(_ context.Context, idx int) (backend.QueueConfig, error) {
	if idx < 0 || idx >= d.numQueues {
		return backend.QueueConfig{}, fmt.Errorf("blk: queue %d of %d", idx, d.numQueues)
	}
	workers := d.qworkers
	if workers == 1 {
		workers = 0 // synchronous, on the ring's goroutine
	}
	h := &queueHandler{ws: make([]*worker, workers+1)}
	for i := range h.ws {
		h.ws[i] = d.newWorker()
	}
	return backend.QueueConfig{Handler: h, Workers: workers}, nil
}

// queueHandler serves one queue's requests.
type queueHandler struct {
	ws []*worker // scratch space per ring goroutine (Request.Worker)
}

func (h *queueHandler) Handle(req *backend.Request) {
	written, bad := h.ws[req.Worker()].handleChain(req.Chain())
	if bad != nil {
		req.Malformed(bad)
	}
	req.Complete(written)
}
