// Package backend is the vhost-user back-end daemon: it owns the socket, the
// message loop, guest memory, the rings and their kick and call eventfds. A
// virtio device implements Device and calls Serve.
//
// Ring states follow the vhost-user specification: a ring is stopped until
// its kick descriptor (or the polling flag) arrives while it is configured
// (size, addresses and a memory table that covers them); it is stopped again
// by GET_VRING_BASE, RESET_OWNER or a disconnect. A started ring is enabled
// by SET_VRING_ENABLE, or from the start when VHOST_USER_F_PROTOCOL_FEATURES
// was not negotiated. While a ring is started and enabled, one goroutine runs
// Device.ServeQueue for it.
//
// Faults on guest memory (SIGBUS from a truncated memfd) and panics inside
// ring processing fail that ring only: the ring is stopped, the error logged
// and the ring's error eventfd signalled.
//
// Every request goes through one choke point (session.handle: validate with
// vhostuser.ParseRequest, dispatch, reply or REPLY_ACK). A request that fails
// gets a failure ack when the front-end asked for one (need_reply with
// REPLY_ACK), an empty reply for GET_CONFIG, and otherwise closes the
// connection, since the front-end could not learn of the failure. In-flight
// tracking for crash recovery (GET_INFLIGHT_FD/SET_INFLIGHT_FD) is meant to
// plug in there and in Vring.Run (mark popped heads, clear pushed ones).
package backend

import (
	"context"

	"github.com/krun-core/krun-core/vhostuser"
)

// DeviceInfo describes a device to the framework.
type DeviceInfo struct {
	Type             uint32 // virtio device ID: 1 net, 2 block, 26 fs
	NumQueues        int    // 1..vhostuser.MaxQueues
	MaxQueueSize     int    // power of two, 1..32768 (0 means 1024)
	Features         uint64 // device-specific virtio feature bits offered
	ProtocolFeatures uint64 // extra vhost-user protocol features (CONFIG, MQ)
}

// Device is what a virtio device back-end implements.
type Device interface {
	Info() DeviceInfo
	// ReadConfig fills p from the virtio config space at offset.
	ReadConfig(offset uint32, p []byte) error
	// WriteConfig writes p into the config space at offset.
	WriteConfig(offset uint32, p []byte) error
	// SetFeatures is called after SET_FEATURES with the acked features.
	SetFeatures(negotiated uint64) error
	// ServeQueue runs on its own goroutine while ring idx is started and
	// enabled; it must return once ctx is cancelled (ring stopped, reset,
	// memory change, disconnect), and must not touch vr or guest memory
	// after returning. Goroutines it starts that touch guest memory should
	// run their work under Protect.
	ServeQueue(ctx context.Context, idx int, vr *Vring) error
	// Reset returns the device to its initial state (disconnect,
	// RESET_OWNER). Rings are stopped before it is called.
	Reset()
}

// ConfigChanger is implemented by a device whose config space changes on
// its own (a network link going down). When the device implements it, the
// framework offers VHOST_USER_PROTOCOL_F_BACKEND_REQ, and for every value
// ConfigChanges delivers while a front-end that gave a back-end request
// channel is connected, sends it VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. The
// channel should be buffered (one pending change is enough).
type ConfigChanger interface {
	ConfigChanges() <-chan struct{}
}

// FrameworkFeatures are the feature bits the framework adds to every
// device's offer.
const FrameworkFeatures = vhostuser.FeatureVersion1 | vhostuser.FeatureRingIndirectDesc |
	vhostuser.FeatureRingEventIdx | vhostuser.FeatureProtocolFeatures

// FrameworkProtocolFeatures are the protocol features always offered.
const FrameworkProtocolFeatures = vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck |
	vhostuser.ProtocolConfigureMemSlots

// DeviceProtocolFeatures are the protocol features a device may add in
// DeviceInfo.ProtocolFeatures; others are not implemented by the framework.
const DeviceProtocolFeatures = vhostuser.ProtocolConfig | vhostuser.ProtocolMQ

// DefaultMaxQueueSize is used when DeviceInfo.MaxQueueSize is 0.
const DefaultMaxQueueSize = 1024
