package fs

import (
	"strings"
	"syscall"
	"testing"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// TestHandleCapWarningAtPluginMaximum: at the handle limit the
// plugin's warning says to raise open-files=; where the limit is
// DefaultMaxHandles (the plugin's own cap, reached from open-files= of
// about 266000 up) raising it changes nothing, and the advice sends the
// operator to a setting that cannot help.
func TestHandleCapWarningAtPluginMaximum(t *testing.T) {
	var logs syncbuf.Buffer
	e := newEnv(t, 0, func(c *ServerConfig) {
		c.MaxOpenFiles = 1<<20 - fdReserve
		c.Log = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	})
	if e.s.t.maxHandles != DefaultMaxHandles {
		t.Fatalf("handle limit %d, want the plugin's cap %d", e.s.t.maxHandles, DefaultMaxHandles)
	}
	// Fill the table to the cap without 65536 real opens.
	e.s.t.mu.Lock()
	e.s.t.reserved = e.s.t.maxHandles
	e.s.t.mu.Unlock()
	_, err := e.c.Opendir(fuse.RootID)
	wantErrno(t, "OPENDIR at the handle limit", err, syscall.ENFILE)
	e.s.t.mu.Lock()
	e.s.t.reserved = 0
	e.s.t.mu.Unlock()
	if strings.Contains(logs.String(), "raise the share's open-files=") {
		t.Errorf("at the plugin's own cap of %d handles the warning still says to raise open-files=, which cannot help:\n%s", DefaultMaxHandles, logs.String())
	}
}
