package fs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/fs"
	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// TestTruncatedGuestMemory: a front-end posts requests on the request
// queue, truncates the guest-memory memfd under the rings and kicks. The
// queue fails with one log line; the plugin serves the next front-end.
func TestTruncatedGuestMemory(t *testing.T) {
	for _, workers := range []int{1, fs.DefaultWorkers} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			dir, err := os.Open(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			defer dir.Close()
			dev, err := fs.New(fs.Config{ServerConfig: fs.ServerConfig{Dir: dir}, Tag: "share", Workers: workers})
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			logs := &syncbuf.Buffer{}
			srv, err := backend.NewServer(dev, hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info}))
			if err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(t.TempDir(), "fs.sock")
			backendtest.Serve(t, srv, sock)
			defer func() {
				if t.Failed() {
					t.Logf("plugin log:\n%s", logs.String())
				}
			}()
			opt := testguest.Options{NumQueues: 2, QueueSize: 512}

			g, err := testguest.Dial(sock, opt)
			if err != nil {
				t.Fatal(err)
			}
			ring := g.Rings[1]
			buf, _ := g.Mem.Alloc(8192, 4096)
			for i := 0; i < 16; i++ {
				segs := []testguest.Segment{{Addr: buf, Len: 64}, {Addr: buf + 4096, Len: 4096, Writable: true}}
				if _, err := ring.Post(segs, i); err != nil {
					t.Fatal(err)
				}
			}
			// From here the test must not touch guest memory.
			if err := g.Mem.File().Truncate(0); err != nil {
				t.Fatal(err)
			}
			ring.KickAlways()
			backendtest.WaitFailed(t, srv, 1)
			g.Close()
			if n := strings.Count(logs.String(), "memory fault"); n != 1 {
				t.Fatalf("%d log lines about the fault, want 1", n)
			}

			// The next front-end is served.
			g2, err := testguest.Dial(sock, opt)
			if err != nil {
				t.Fatal(err)
			}
			defer g2.Close()
			rq := fuseclient.NewRing(g2.Mem, g2.Rings[1], 0)
			defer rq.Close()
			c := fuseclient.New(rq)
			if _, err := c.Init(fuseclient.LinuxInitFlags); err != nil {
				t.Fatalf("INIT from the next front-end: %v", err)
			}
			if _, err := c.Getattr(fuse.RootID); err != nil {
				t.Fatalf("GETATTR from the next front-end: %v", err)
			}
		})
	}
}
