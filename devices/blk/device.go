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
		MaxChain:         int(d.limits.segMax) + 2,
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
	h := &queueHandler{ws: make([]*worker, workers+1), inlineWrites: d.serialW}
	for i := range h.ws {
		h.ws[i] = d.newWorker()
	}
	return backend.QueueConfig{Handler: h, Workers: workers}, nil
}

// queueHandler serves one queue's requests.
type queueHandler struct {
	ws []*worker // scratch space per ring goroutine (Request.Worker)
	// inlineWrites serves short writes on the ring's goroutine: with
	// SerialWrites they would only queue for the write lock on a worker.
	inlineWrites bool
}

// inlineWriteMax is the largest write (data bytes) served on the ring's
// goroutine; a longer one goes to a worker, so reads behind it in the
// ring are not held up by its copy.
const inlineWriteMax = 64 << 10

// Inline (backend.Inliner) picks short writes by the chain's shape alone:
// a header and at most inlineWriteMax bytes for the device to read, one
// status byte to write. Reads (16 bytes to read) and flushes (nothing
// after the header) go to workers. A chain that only looks like a write
// is served like any other request, on the ring's goroutine.
func (h *queueHandler) Inline(req *backend.Request) bool {
	if !h.inlineWrites {
		return false
	}
	c := req.Chain()
	return shortWrite(c.ReadableLen(), c.WritableLen())
}

// shortWrite reports whether a chain with rd bytes for the device to read
// and wr to write has the shape of a write (or discard) of at most
// inlineWriteMax bytes.
func shortWrite(rd, wr uint64) bool {
	return wr == 1 && rd > HeaderSize && rd-HeaderSize <= inlineWriteMax
}

func (h *queueHandler) Handle(req *backend.Request) {
	written, bad := h.ws[req.Worker()].handleChain(req.Chain())
	if bad != nil {
		req.Malformed(bad)
	}
	req.Complete(written)
}
