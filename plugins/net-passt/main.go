// Command krun-plugin-net-passt is the virtio-net device plugin whose
// network is a passt process. The host starts passt outside this plugin's
// sandbox and hands over one end of a socketpair ("passt"); the plugin opens
// nothing and has no network access of its own.
package main

import (
	"context"
	"fmt"
	stdnet "net"
	"os"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/net"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

type plugin struct{}

func (plugin) Kind() string { return devopts.KindNetPasst }

func (plugin) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("net", -1)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, devopts.OptMAC, devopts.OptMTU); err != nil {
		return nil, err
	}
	conn := files[devopts.FilePasst]
	if conn == nil {
		return nil, fmt.Errorf("no %q socket was passed", devopts.FilePasst)
	}
	mac, err := stdnet.ParseMAC(opts[devopts.OptMAC])
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("option mac=%q is not a 48-bit MAC address", opts[devopts.OptMAC])
	}
	// What the guest's driver would refuse (and Linux for an interface):
	// the guest would get a random address instead, not the one asked for.
	if mac[0]&1 != 0 || [6]byte(mac) == [6]byte{} {
		return nil, fmt.Errorf("option mac=%q is not a unicast address", opts[devopts.OptMAC])
	}
	mtu, err := pluginsdk.IntOption(opts, devopts.OptMTU, 0, devopts.MinMTU, devopts.MaxMTU)
	if err != nil {
		return nil, err
	}
	return net.New(net.Config{MAC: mac, MTU: uint16(mtu), Conn: conn, Logger: log})
}

func main() { pluginsdk.Serve(plugin{}) }
