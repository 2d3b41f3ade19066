package net

import (
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// The device as a vhost-user back-end device that reports link changes.
var (
	_ backend.Device        = (*Device)(nil)
	_ backend.ConfigChanger = (*Device)(nil)
)

// MaxQueueSize is the largest ring the device accepts.
const MaxQueueSize = 1024

// Info describes the device to the vhost-user framework.
func (d *Device) Info() backend.DeviceInfo {
	return backend.DeviceInfo{
		Type:             DeviceType,
		NumQueues:        d.NumQueues(),
		MaxQueueSize:     MaxQueueSize,
		Features:         d.DeviceFeatures(),
		ProtocolFeatures: vhostuser.ProtocolConfig,
	}
}

// ConfigSize is the size of the config space (mac, status,
// max_virtqueue_pairs, mtu): what a plugin reports at Configure, and the
// core serves the guest from.
func (d *Device) ConfigSize() int { return configLen }
