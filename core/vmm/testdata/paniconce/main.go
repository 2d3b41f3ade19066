// Command paniconce is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, whose device panics on the first request it is handed while
// the image's last byte is zero, after setting that byte: the plugin fails
// (its ring's panic), and the one krun-core starts in its place serves the
// replayed request.
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

// panicOnce is the blk device whose queues' handlers panic once.
type panicOnce struct {
	*blk.Device
	img *os.File
}

func (p panicOnce) Queue(ctx context.Context, i int) (backend.QueueConfig, error) {
	qc, err := p.Device.Queue(ctx, i)
	if err != nil || qc.Handler == nil {
		return qc, err
	}
	qc.Handler = panicking{Handler: qc.Handler, img: p.img}
	return qc, nil
}

type panicking struct {
	backend.Handler
	img *os.File
}

func (h panicking) Handle(req *backend.Request) {
	st, err := h.img.Stat()
	if err == nil && st.Size() > 0 {
		var b [1]byte
		if _, err := h.img.ReadAt(b[:], st.Size()-1); err == nil && b[0] == 0 {
			if _, err := h.img.WriteAt([]byte{1}, st.Size()-1); err == nil {
				panic("paniconce: the test's panic")
			}
		}
	}
	h.Handler.Handle(req)
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
	dev, err := blk.New(blk.Config{Disk: d, NumQueues: 1, Log: log, OwnsDisk: true})
	if err != nil {
		return nil, err
	}
	return panicOnce{Device: dev, img: img}, nil
}

func main() { pluginsdk.Serve(plugin{}) }
