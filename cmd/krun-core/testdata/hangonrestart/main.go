// Command hangonrestart is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, that hangs before its go-plugin handshake when it is started
// again. Its first start marks the image (an 'H' in its first byte, through
// the image's inherited descriptor, fd 4); a start that finds the mark never
// answers. A serve that restarts it waits for its handshake.
package main

import (
	"context"
	"errors"
	"os"
	"time"

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

func (plugin) Configure(_ context.Context, _ map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	img := files[devopts.FileImage]
	if img == nil {
		return nil, errors.New("no image")
	}
	d, err := raw.Open(img, raw.Options{})
	if err != nil {
		return nil, err
	}
	return blk.New(blk.Config{Disk: d, NumQueues: 1, Log: log, OwnsDisk: true})
}

func main() {
	img := os.NewFile(4, "image")
	mark := make([]byte, 1)
	if _, err := img.ReadAt(mark, 0); err == nil && mark[0] == 'H' {
		time.Sleep(time.Hour)
	}
	if _, err := img.WriteAt([]byte{'H'}, 0); err != nil {
		os.Exit(3)
	}
	pluginsdk.Serve(plugin{})
}
