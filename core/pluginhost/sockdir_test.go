package pluginhost

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestSocketDirGoneAfterHostKilled: the private socket directory
// ($TMPDIR/krun-<kind>-NNN) was removed only by Kill, Shutdown or a failed
// start, so a host that was killed (SIGKILL, the OOM killer, a crash) left
// it behind although its plugin died with it (Pdeathsig): one directory
// per plugin per killed krun-core, never reclaimed (this machine's /tmp
// held 160 of them). It is needed only until the gRPC connection is made,
// and removed then. (From review.)
func TestSocketDirGoneAfterHostKilled(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	host := exec.Command(self, "-test.run=^$")
	host.Env = append(os.Environ(), envTestHost+"="+filepath.Join(testPluginDir, ExecutableName("test")))
	out, err := host.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	host.Stderr = io.Discard
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	defer host.Process.Kill()
	lc := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lc <- l
	}()
	var line string
	select {
	case line = <-lc:
	case <-time.After(20 * time.Second):
		t.Fatal("host did not launch its plugin within 20 s")
	}
	var pid int
	var sockDir string
	if _, err := fmt.Sscanf(line, "pid %d %s", &pid, &sockDir); err != nil {
		t.Fatalf("host said %q: %v", line, err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	host.Process.Kill()
	host.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if alive(pid) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Fatalf("plugin %d survived its host", pid)
	}
	if _, err := os.Stat(sockDir); err == nil {
		t.Fatalf("socket directory %s outlives its killed host and its plugin; each killed krun-core leaves one per plugin in $TMPDIR", sockDir)
	}
}
