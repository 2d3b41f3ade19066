// Package backend is the vhost-user back-end daemon: it owns the socket, the
// message loop, guest memory, the rings and their kick and call eventfds. A
// virtio device implements Device and calls Serve.
//
// Ring states follow the vhost-user specification: a ring is stopped until
// its kick descriptor (or the polling flag) arrives while it is configured
// (size, addresses and a memory table that covers them); it is stopped again
// by GET_VRING_BASE, RESET_OWNER or a disconnect. A started ring is enabled
// by SET_VRING_ENABLE, or from the start when VHOST_USER_F_PROTOCOL_FEATURES
// was not negotiated. While a ring is started and enabled, the ring engine
// serves it as Device.Queue says.
//
// Faults on guest memory (SIGBUS from a truncated memfd) and panics inside
// ring processing fail that ring only: the ring is stopped, the error logged
// and the ring's error eventfd signalled.
//
// Every control message goes through one choke point (session.handle:
// validate with vhostuser.ParseRequest, dispatch, reply or REPLY_ACK). A
// message that fails gets a failure ack when the front-end asked for one
// (need_reply with REPLY_ACK), an empty reply for GET_CONFIG, and otherwise
// closes the connection, since the front-end could not learn of the failure.
//
// Every virtqueue request goes through one ring engine (engine.go): one
// goroutine per running ring waits for kicks, takes chains, hands them to
// the device's Handler (inline or on a worker pool) and publishes their
// completions with batched notifications. A chain is taken in one place
// (engine.take) and completed in one place (engine.complete), where
// in-flight tracking for crash recovery (GET_INFLIGHT_FD/SET_INFLIGHT_FD)
// is meant to plug in. Every access to guest memory of every ring runs with
// faults caught (Protect).
package backend

import (
	"context"

	"github.com/krun-core/krun-core/vhostuser"
)

// DeviceInfo describes a device to the framework.
type DeviceInfo struct {
	Type         uint32 // virtio device ID: 1 net, 2 block, 26 fs
	NumQueues    int    // 1..vhostuser.MaxQueues
	MaxQueueSize int    // power of two, 1..32768 (0 means 1024)
	// MaxChain is the most buffers a chain may have, an indirect table's
	// entries included, on a ring smaller than it (a ring of n always
	// takes chains of n): 0 means MaxQueueSize; at most 32768. A
	// front-end reads the configuration before it sets ring sizes, so a
	// device whose configuration bounds its chains (virtio-blk's seg_max:
	// Linux builds indirect tables of seg_max+2 entries whatever the
	// ring) sets it to that bound.
	MaxChain         int
	Features         uint64 // device-specific virtio feature bits offered
	ProtocolFeatures uint64 // extra vhost-user protocol features (CONFIG, MQ)
}

// Device is what a virtio device back-end implements.
type Device interface {
	Info() DeviceInfo
	// ReadConfig fills p from the virtio config space at offset. The
	// front-end picks the length (GET_CONFIG): QEMU's vhost-user-blk
	// reads its virtio_blk_config, 60 bytes or more, whatever fields the
	// device defines, so answer bytes past them with zeros rather than an
	// error, which fails the front-end's device.
	ReadConfig(offset uint32, p []byte) error
	// WriteConfig writes p into the config space at offset.
	WriteConfig(offset uint32, p []byte) error
	// SetFeatures is called after SET_FEATURES with the acked features.
	SetFeatures(negotiated uint64) error
	// Queue says how ring idx is served. The framework calls it each time
	// the ring starts (after SET_FEATURES); ctx is done when the ring
	// stops (stopped, disabled, reset, memory change, disconnect), and
	// nothing the device does for the ring may block beyond it. An error
	// fails the ring.
	Queue(ctx context.Context, idx int) (QueueConfig, error)
	// Reset returns the device to its initial state (disconnect,
	// RESET_OWNER). Rings are stopped before it is called.
	Reset()
}

// QueueConfig is how one ring is served: either Handler (requests the
// driver makes, answered by the device: virtio-blk, virtio-fs, virtio-net
// transmit) or Producer (buffers the driver posts and the device fills when
// it has data: virtio-net receive).
type QueueConfig struct {
	// Handler serves each chain the driver makes available.
	Handler Handler
	// Workers is how many requests Handler serves at once, each on a
	// goroutine of a pool the ring owns; 0 or 1 serve them one after the
	// other on the ring's own goroutine, in order. With workers, a
	// request that arrives alone on an idle ring is still served on the
	// ring's goroutine (no hand-off at queue depth 1), and requests
	// complete out of order.
	Workers int
	// MaxInFlight bounds the requests taken from the ring and not yet
	// completed; 0 means the queue size. When it is reached the ring
	// takes no more chains until one completes.
	MaxInFlight int
	// Producer, instead of Handler, runs on the ring's goroutine and
	// takes buffers when it has something to put in them.
	Producer Producer
}

// Handler serves the requests of a ring.
type Handler interface {
	// Handle serves req. It runs on the ring's goroutine or on one of the
	// ring's workers, with faults on guest memory caught (see Protect).
	// It must complete req exactly once with req.Complete, before it
	// returns or later from any goroutine (a goroutine of the device
	// that touches guest memory must run under Protect), and must not
	// use req after that.
	Handle(req *Request)
}

// Inliner may be implemented by a Handler: Inline is called on the ring's
// goroutine for a request that would go to a worker; true serves it on the
// ring's goroutine instead, in the ring's order. For requests that would
// only wait on a worker (a write the device serializes anyway): no
// hand-off, no wake-up, and their completions are published with the
// ring's batch. While such a request is served, the ring takes no new
// chains, but what workers complete meanwhile is published at once.
// Inline may look at the chain's shape (Chain().ReadableLen,
// WritableLen) only, never at guest memory.
type Inliner interface{ Inline(req *Request) bool }

// Offloader may be implemented by a Handler: Offload is called on the
// ring's goroutine for every request of a queue with workers, and true
// says the request may take long (a virtio-blk DISCARD over gigabytes).
// Such a request always goes to a worker, also alone on an idle ring
// (where it would otherwise be served on the ring's goroutine, which
// would take no new chains meanwhile), whatever Inline says; and at most
// all workers but one serve such requests at once, the others waiting
// their turn in the ring's order, so that one worker is always left for
// the rest (a guest discarding a large disk sends many at once). Like
// Inline, Offload may look at the chain's shape only, never at guest
// memory. It has no effect on a queue without workers.
type Offloader interface{ Offload(req *Request) bool }

// Drainer may be implemented by a Handler: Drained is called on the ring's
// goroutine each time the ring has no more available chains, after every
// chain taken so far was given to Handle and before the used elements are
// published (a device that batches its output flushes it here), also when
// a broken ring ends the round early.
type Drainer interface{ Drained() }

// Producer fills a ring's buffers on the device's own schedule.
type Producer interface {
	// Produce runs on the ring's goroutine, with faults on guest memory
	// caught, while the ring runs. It returns nil once ctx is done, or an
	// error that fails the ring. Every request it took must be completed
	// or given back (Buffers.Untake) before it returns.
	Produce(ctx context.Context, b *Buffers) error
}

// ConfigChanger is implemented by a device whose config space changes on
// its own (a network link going down). When the device implements it, the
// framework offers VHOST_USER_PROTOCOL_F_BACKEND_REQ, and for every value
// ConfigChanges delivers while a front-end that gave a back-end request
// channel is connected, sends it VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
// without ever blocking: a front-end that does not read its channel loses
// the message (a warning says so), and the next change tells the same.
// The channel should be buffered (one pending change is enough). Closing
// it ends the reports: a closed channel is no change.
type ConfigChanger interface {
	ConfigChanges() <-chan struct{}
}

// FrameworkFeatures are the feature bits the framework adds to every
// device's offer.
const FrameworkFeatures = vhostuser.FeatureVersion1 | vhostuser.FeatureRingIndirectDesc |
	vhostuser.FeatureRingEventIdx | vhostuser.FeatureProtocolFeatures

// FrameworkProtocolFeatures are the protocol features always offered.
const FrameworkProtocolFeatures = vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck |
	vhostuser.ProtocolConfigureMemSlots | vhostuser.ProtocolInflightSHMFD | vhostuser.ProtocolResetDevice

// DeviceProtocolFeatures are the protocol features a device may add in
// DeviceInfo.ProtocolFeatures; others are not implemented by the framework.
const DeviceProtocolFeatures = vhostuser.ProtocolConfig | vhostuser.ProtocolMQ

// DefaultMaxQueueSize is used when DeviceInfo.MaxQueueSize is 0.
const DefaultMaxQueueSize = 1024
