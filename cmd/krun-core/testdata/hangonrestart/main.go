// Command hangonrestart is a test plugin: a raw disk, as krun-plugin-blk-raw
// serves it, that hangs before its go-plugin handshake when it is started
// again. Its first start marks the image (an 'H' in its first byte, through
// the image's inherited descriptor, fd 4); a start that finds the mark never
// answers. A serve that restarts it waits for its handshake.
package main

import (
	"os"
	"time"

	"github.com/krun-core/krun-core/internal/testplugin"
	"github.com/krun-core/krun-core/pluginsdk"
)

func main() {
	img := os.NewFile(4, "image")
	mark := make([]byte, 1)
	if _, err := img.ReadAt(mark, 0); err == nil && mark[0] == 'H' {
		time.Sleep(time.Hour)
	}
	if _, err := img.WriteAt([]byte{'H'}, 0); err != nil {
		os.Exit(3)
	}
	pluginsdk.Serve(testplugin.RawDisk{})
}
