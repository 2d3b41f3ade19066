package sandbox

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// TestAfterStartClosesFilesPromptlyWhenStartFails: when cmd.Start fails,
// no child ever holds the launcher channel's peer, yet the files
// ApplyUntilStarted added (exe, trampoline, channel pair) stay open until
// receiveListener's chanWait (2 minutes) runs out, because the watch
// keeps its own copy of the peer open while it waits for a message.
// Once Start has returned the peer could be closed at once.
func TestAfterStartClosesFilesPromptlyWhenStartFails(t *testing.T) {
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := count()
	lc := LaunchConfig{Kind: "blk-raw", Disable: []Layer{LayerNamespaces, LayerRoot}, Log: hclog.NewNullLogger()}
	cmd := exec.Command(staticExe(t), "-x")
	after, err := lc.ApplyUntilStarted(cmd)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Dir = "/nonexistent-dir-for-start-failure"
	if err := cmd.Start(); err == nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("Start succeeded")
	}
	after()
	deadline := time.Now().Add(3 * time.Second)
	for count() > before && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := count() - before; n > 0 {
		t.Fatalf("%d fds of the sandbox still open 3 s after a failed Start (held until chanWait, %v)", n, chanWait)
	}
}
