// Command noreplay is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, whose device says its requests must not be carried out twice
// (pluginsdk.Restarter), so krun-core must never restart it.
package main

import (
	"context"
	"errors"
	"os"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

type plugin struct{}

func (plugin) Kind() string { return devopts.KindBlkRaw }

func (plugin) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("blk", -1)
	return p
}

// noReplay is the blk device, all its methods promoted, and Restartable.
type noReplay struct{ *blk.Device }

func (noReplay) Restartable() bool { return false }

func (plugin) Configure(_ context.Context, _ map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	img := files[devopts.FileImage]
	if img == nil {
		return nil, errors.New("no image")
	}
	d, err := raw.Open(img, raw.Options{})
	if err != nil {
		return nil, err
	}
	dev, err := blk.New(blk.Config{Disk: d, NumQueues: 1, Log: log, OwnsDisk: true})
	if err != nil {
		return nil, err
	}
	return noReplay{dev}, nil
}

func main() { pluginsdk.Serve(plugin{}) }
