// Command paniconce is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, whose device panics on the first request it is handed while
// the image's last byte is zero, after setting that byte: the plugin fails
// (its ring's panic), and the one krun-core starts in its place serves the
// replayed request.
package main

import (
	"context"
	"os"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/internal/testplugin"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

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

func main() {
	pluginsdk.Serve(testplugin.RawDisk{Wrap: func(d *blk.Device, img *os.File) backend.Device {
		return panicOnce{Device: d, img: img}
	}})
}
