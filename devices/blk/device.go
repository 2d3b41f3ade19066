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
	d.syncState()
	workers := d.qworkers
	if workers == 1 {
		workers = 0 // synchronous, on the ring's goroutine
	}
	h := &queueHandler{ws: make([]*worker, workers+1), inlineWrites: d.serialW}
	if !d.readOnly {
		h.rangesMax = SegmentSize * uint64(max(d.limits.maxDiscardSeg, d.limits.maxWriteZeroesSeg))
	}
	for i := range h.ws {
		h.ws[i] = d.newWorker()
	}
	return backend.QueueConfig{Handler: h, Workers: workers}, nil
}

// queueHandler serves one queue's requests.
type queueHandler struct {
	ws []*worker // scratch space per ring goroutine (Request.Worker)
	// inlineWrites serves writes on the ring's goroutine: with
	// SerialWrites they would only queue for the write lock on a worker.
	inlineWrites bool
	// rangesMax is the longest payload of a DISCARD or WRITE_ZEROES
	// request (its ranges), 0 where the device offers neither: a chain
	// with the shape of a write whose payload may be such ranges goes to
	// a worker (see Inline).
	rangesMax uint64
	// streak counts the writes in a row the ring's goroutine has taken,
	// up to writeStreak; any other request resets it. Ring goroutine
	// only: every request passes Inline there, or is handled there.
	streak int
}

// inlineWriteMax is the largest write (data bytes) always served on the
// ring's goroutine. A longer one is served there only in a stream of
// writes (writeStreak); otherwise it goes to a worker, so that reads
// behind it in the ring are not held up by its copy.
const inlineWriteMax = 64 << 10

// writeStreak is how many writes in a row, with no other request on the
// queue meanwhile, make the ring's goroutine serve long writes too. A
// stream of long writes then costs no hand-off to a worker, no wake-up and
// one interrupt per round instead of one per write (issue #17: 1 MiB
// writes at depth 4 gain 10 to 13 %, docs/BENCHMARKS.md); the first read
// ends the streak, and waits at most for the writes queued before it.
const writeStreak = 64

// Inline (backend.Inliner) picks writes by the chain's shape alone: a
// header and data for the device to read, one status byte to write. Short
// ones always, long ones in a stream of writes (writeStreak). Reads (16
// bytes to read) and flushes (nothing after the header) go to workers. A
// chain that only looks like a write is served like any other request, on
// the ring's goroutine.
//
// DISCARD and WRITE_ZEROES have a write's shape too, with a payload of
// 16-byte ranges that may each cover gigabytes: served on the ring's
// goroutine, one kept every other request of the queue, reads included,
// waiting until it ended (the image serves it in pieces and lets other
// requests in between; found in review). So a payload that cannot be a
// write (not whole sectors) or may be ranges (whole sectors, but no longer
// than the most ranges a request may carry: 512 bytes with the default 32)
// goes to a worker; only 512-byte writes share the second shape.
func (h *queueHandler) Inline(req *backend.Request) bool {
	if !h.inlineWrites {
		return false
	}
	c := req.Chain()
	return h.inline(c.ReadableLen(), c.WritableLen())
}

// Offload (backend.Offloader) takes what may be a DISCARD or WRITE_ZEROES
// request (see Inline) for a long one: it goes to a worker even alone on
// an idle ring (served on the ring's goroutine, a long one kept the ring
// from taking the requests the driver added meanwhile until it ended), and
// such requests never take the queue's last worker (with every worker on
// one, a read waited until one ended).
func (h *queueHandler) Offload(req *backend.Request) bool {
	c := req.Chain()
	return h.mayBeRanges(c.ReadableLen(), c.WritableLen())
}

// mayBeRanges reports whether a chain with rd bytes for the device to read
// and wr to write may be a DISCARD or WRITE_ZEROES request: a header and
// at most rangesMax bytes of 16-byte ranges to read, one status byte.
func (h *queueHandler) mayBeRanges(rd, wr uint64) bool {
	return wr == 1 && rd > HeaderSize && rd-HeaderSize <= h.rangesMax && (rd-HeaderSize)%SegmentSize == 0
}

// inline is Inline's choice for a chain with rd bytes for the device to
// read and wr to write, counting the streak of writes.
func (h *queueHandler) inline(rd, wr uint64) bool {
	if !h.isWrite(rd, wr) {
		h.streak = 0
		return false
	}
	if h.streak < writeStreak {
		h.streak++
	}
	return rd-HeaderSize <= inlineWriteMax || h.streak >= writeStreak
}

// handledOnRing notes a request handled on the ring's goroutine without
// Inline having seen it (alone on an idle ring): all but writes end the
// streak.
func (h *queueHandler) handledOnRing(rd, wr uint64) {
	if !h.isWrite(rd, wr) {
		h.streak = 0
	}
}

// isWrite reports whether a chain with rd bytes for the device to read and
// wr to write has the shape of a write, and not that of a DISCARD or
// WRITE_ZEROES request: a header and whole sectors to read, more than a
// request's ranges may take, one status byte to write.
func (h *queueHandler) isWrite(rd, wr uint64) bool {
	return wr == 1 && rd > HeaderSize && (rd-HeaderSize)%SectorSize == 0 && rd-HeaderSize > h.rangesMax
}

func (h *queueHandler) Handle(req *backend.Request) {
	if h.inlineWrites && req.Worker() == 0 {
		c := req.Chain()
		h.handledOnRing(c.ReadableLen(), c.WritableLen())
	}
	written, bad := h.ws[req.Worker()].handleChain(req.Chain())
	if bad != nil {
		req.Malformed(bad)
	}
	req.Complete(written)
}
