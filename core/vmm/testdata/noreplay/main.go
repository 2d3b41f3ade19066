// Command noreplay is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, whose device says its requests must not be carried out twice
// (pluginsdk.Restarter), so krun-core must never restart it.
package main

import (
	"os"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/internal/testplugin"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// noReplay is the blk device, all its methods promoted, and Restartable.
type noReplay struct{ *blk.Device }

func (noReplay) Restartable() bool { return false }

func main() {
	pluginsdk.Serve(testplugin.RawDisk{Wrap: func(d *blk.Device, _ *os.File) backend.Device { return noReplay{d} }})
}
