package sandbox

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// README ("--sandbox-disable LAYER") and SECURITY.md (plugins "never run
// as host root, also with --sandbox-disable=namespaces (then the
// trampoline starts as those ids)"; "a plugin restarted after the drop is
// reached like the first") promise that a root krun-core with the
// namespaces layer off still launches and relaunches its plugins. The
// launcher also set the plugin's limits from outside with prlimit
// (ApplyLimits, pluginhost's post-start hook) on a process that runs as
// 65534 in the launcher's own user namespace, which needs
// CAP_SYS_RESOURCE; KeepCapabilities does not keep it, so every relaunch
// after DropPrivileges failed ("rlimits: get limit 4 of pid N: operation
// not permitted"), and `krun-core serve --disk ... --sandbox-disable=
// namespaces` exited 1 after its restarts instead of restarting the
// plugin. A root without CAP_SYS_RESOURCE at all (a container's default
// set) could not even launch the first plugin.
//
// From review, helper-102; fixed: ApplyLimits is gone. The trampoline
// sets the same limits on itself before it execs the plugin (lowering
// one's own limits needs no capability), which this test checks.

const envRelaunchNoNS = "KRUN_SANDBOX_RELAUNCH_NONS"

type relaunchNoNSLine struct {
	Before string `json:"before"` // launching before DropPrivileges
	Drop   string `json:"drop"`
	After  string `json:"after"` // launching after DropPrivileges
}

func init() {
	if os.Getenv(envRelaunchNoNS) == "1" {
		os.Exit(relaunchNoNSMain())
	}
}

func relaunchNoNSLaunch(lc LaunchConfig) string {
	self, err := os.Executable()
	if err != nil {
		return err.Error()
	}
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=idle"}
	cmd.Stderr = os.Stderr
	in, _ := cmd.StdinPipe()
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err.Error()
	}
	if err := lc.Apply(cmd); err != nil {
		return "Apply: " + err.Error()
	}
	if err := cmd.Start(); err != nil {
		return "Start: " + err.Error()
	}
	defer func() {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "ready") {
		return fmt.Sprintf("plugin said %q (%v)", line, err)
	}
	// The trampoline set the limits before the exec.
	lim, err := readLimits(cmd.Process.Pid)
	if err != nil {
		return err.Error()
	}
	l, err := lc.limits()
	if err != nil {
		return err.Error()
	}
	if got := lim["Max open files"]; got[0] > l.OpenFiles || got[1] > l.OpenFiles {
		return fmt.Sprintf("Max open files %v, want at most %d", got, l.OpenFiles)
	}
	return ""
}

func relaunchNoNSMain() int {
	lc := LaunchConfig{Kind: "blk", Disable: []Layer{LayerNamespaces}, Log: hclog.New(&hclog.LoggerOptions{Output: os.Stderr})}
	var l relaunchNoNSLine
	l.Before = relaunchNoNSLaunch(lc)
	if err := DropPrivileges(lc.KeepCapabilities()); err != nil {
		l.Drop = err.Error()
	}
	l.After = relaunchNoNSLaunch(lc)
	b, _ := json.Marshal(l)
	fmt.Println(string(b))
	return 0
}

func TestRelaunchWithoutNamespacesAfterDrop(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a non-root launcher's plugins run as its own ids")
	}
	if _, err := landlockABI(); err != nil {
		t.Skipf("no landlock on this host (%v)", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = []string{envRelaunchNoNS + "=1"}
	cmd.WaitDelay = 10 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, stderr.String())
	}
	var l relaunchNoNSLine
	if err := json.Unmarshal(out, &l); err != nil {
		t.Fatalf("helper said %q: %v\n%s", out, err, stderr.String())
	}
	if l.Drop != "" {
		t.Fatalf("DropPrivileges: %s", l.Drop)
	}
	if l.Before != "" {
		t.Errorf("launching a plugin with --sandbox-disable=namespaces as root (before the drop): %s", l.Before)
	}
	if l.After != "" {
		t.Errorf("relaunching a plugin with --sandbox-disable=namespaces as root after DropPrivileges(KeepCapabilities()): %s", l.After)
	}
}
