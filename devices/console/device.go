package console

import (
	"context"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
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

// ServeQueue serves one of the four rings while it runs.
func (d *Device) ServeQueue(ctx context.Context, idx int, vr *backend.Vring) error {
	return d.Serve(ctx, idx, vr)
}
