package sandbox

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// dropLine is what the drop helper reports.
type dropLine struct {
	Error   string                       `json:"error,omitempty"`
	Threads map[string]map[string]string `json:"threads"`
	// Plugin is the error launching a sandboxed plugin afterwards ("" when
	// it started and reported ready); PluginUID its Uid line.
	Plugin    string `json:"plugin"`
	PluginUID string `json:"plugin_uid"`
	// IDMap is the error of IDMapShare afterwards.
	IDMap string `json:"idmap"`
	// The supplementary groups at the start, after JoinSocketGroup, and
	// after JoinSocketGroup once the privileges are dropped.
	Groups, GroupsJoined, GroupsDropped []int
	// SocketGroup is JoinSocketGroup's name for the plugin's socket group.
	SocketGroup string `json:"socket_group"`
}

// dropMain drops its privileges with DropPrivileges(KeepCapabilities) on
// a process with several threads (some locked), reports every thread's
// credentials, and then launches a sandboxed plugin (the idle helper)
// as a launcher does again after set-up.
func dropMain() int {
	var l dropLine
	block := make(chan struct{})
	for i := 0; i < 4; i++ {
		go func() {
			runtime.LockOSThread()
			<-block
		}()
	}
	time.Sleep(50 * time.Millisecond)
	l.Groups, _ = unix.Getgroups()
	name, err := LaunchConfig{}.JoinSocketGroup()
	if err != nil {
		l.Error = err.Error()
	}
	l.SocketGroup = name
	l.GroupsJoined, _ = unix.Getgroups()
	if err := DropPrivileges(LaunchConfig{}.KeepCapabilities()); err != nil {
		l.Error = err.Error()
	}
	if _, err := (LaunchConfig{}).JoinSocketGroup(); err != nil && l.Error == "" {
		l.Error = "JoinSocketGroup after the drop: " + err.Error()
	}
	l.GroupsDropped, _ = unix.Getgroups()
	l.Threads = map[string]map[string]string{}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, t := range tasks {
		st, err := readStatus("/proc/self/task/" + t.Name() + "/status")
		if err != nil {
			continue
		}
		l.Threads[t.Name()] = map[string]string{}
		for _, k := range []string{"CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "NoNewPrivs"} {
			l.Threads[t.Name()][k] = st[k]
		}
	}
	l.Plugin, l.PluginUID = launchIdle()
	if d, err := os.Open(os.TempDir()); err == nil {
		if m, err := (LaunchConfig{}).IDMapShare(d); err != nil {
			l.IDMap = err.Error()
		} else if m != nil {
			m.Close()
		}
		d.Close()
	}
	close(block)
	b, _ := json.Marshal(l)
	fmt.Println(string(b))
	return 0
}

// launchIdle starts the idle helper in the full sandbox and stops it once it
// is ready.
func launchIdle() (errText, uid string) {
	self, err := os.Executable()
	if err != nil {
		return err.Error(), ""
	}
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=idle"}
	cmd.Stderr = os.Stderr
	in, _ := cmd.StdinPipe()
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err.Error(), ""
	}
	lc := LaunchConfig{Kind: "blk", Log: hclog.New(&hclog.LoggerOptions{Output: os.Stderr})}
	if err := lc.Apply(cmd); err != nil {
		return err.Error(), ""
	}
	if err := cmd.Start(); err != nil {
		return err.Error(), ""
	}
	defer func() {
		in.Close()
		cmd.Process.Kill() // a plugin in its own user namespace: no CAP_KILL needed
		cmd.Wait()
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "ready") {
		return fmt.Sprintf("plugin said %q (%v)", line, err), ""
	}
	st, err := readStatus(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		return err.Error(), ""
	}
	return "", st["Uid"]
}

// After DropPrivileges every thread has no_new_privs and only the kept
// capabilities (bounding set included), and the process can still launch
// a sandboxed plugin as nobody: what a relaunch needs is kept. It can no
// longer make ID-mapped mounts (their user namespace maps root, which needs
// CAP_SETFCAP, and the mount needs CAP_SYS_ADMIN).
func TestDropPrivileges(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=drop"}
	cmd.WaitDelay = 10 * time.Second
	errBuf := &syncbuf.Buffer{}
	cmd.Stderr = errBuf
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = cmd.Output()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("drop helper: %v\n%s", err, errBuf)
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("drop helper did not finish\n%s", errBuf)
	}
	var l dropLine
	if err := json.Unmarshal(out, &l); err != nil {
		t.Fatalf("drop helper said %q: %v\n%s", out, err, errBuf)
	}
	if l.Error != "" {
		t.Fatalf("DropPrivileges: %s", l.Error)
	}
	var keep uint64
	for _, c := range (LaunchConfig{}).KeepCapabilities() {
		keep |= 1 << uint(c)
	}
	eff, perm, _, err := capget()
	if err != nil {
		t.Fatal(err)
	}
	wantEff := fmt.Sprintf("%016x", eff&perm&keep)
	if len(l.Threads) < 5 {
		t.Errorf("the helper reports %d threads, want at least 5", len(l.Threads))
	}
	for tid, st := range l.Threads {
		want := map[string]string{"NoNewPrivs": "1", "CapEff": wantEff, "CapPrm": wantEff, "CapInh": zeroCaps, "CapAmb": zeroCaps}
		if eff&(1<<unix.CAP_SETPCAP) != 0 {
			bnd, _ := readStatus("/proc/self/status")
			b, _ := strconv.ParseUint(bnd["CapBnd"], 16, 64)
			want["CapBnd"] = fmt.Sprintf("%016x", b&keep)
		}
		for k, v := range want {
			if st[k] != v {
				t.Errorf("thread %s: %s %s, want %s", tid, k, st[k], v)
			}
		}
	}
	if l.Plugin != "" {
		t.Errorf("launching a plugin after DropPrivileges: %s\n%s", l.Plugin, errBuf)
	}
	// A root launcher joins its plugins' socket group once it needs the
	// group to reach their sockets (a plugin launched again after the
	// drop), not while CAP_DAC_OVERRIDE lets it reach them anyway (the
	// join stops the world: about 0.5 ms of serve's start-up).
	if os.Geteuid() == 0 && !slices.Contains(l.Groups, DefaultPluginGID) && os.Getegid() != DefaultPluginGID {
		if l.SocketGroup != "0" {
			t.Errorf("JoinSocketGroup named the socket group %q, want \"0\" (the plugin's own gid in its user namespace)", l.SocketGroup)
		}
		if eff&(1<<unix.CAP_DAC_OVERRIDE) != 0 && slices.Contains(l.GroupsJoined, DefaultPluginGID) {
			t.Errorf("JoinSocketGroup joined gid %d (groups %v) although the launcher holds CAP_DAC_OVERRIDE", DefaultPluginGID, l.GroupsJoined)
		}
		if !slices.Contains(l.GroupsDropped, DefaultPluginGID) {
			t.Errorf("after the drop and JoinSocketGroup the groups are %v, want gid %d among them (a restarted plugin's socket)", l.GroupsDropped, DefaultPluginGID)
		}
	}
	if os.Geteuid() == 0 {
		want := strings.Repeat(strconv.Itoa(DefaultPluginUID)+"\t", 3) + strconv.Itoa(DefaultPluginUID)
		if l.PluginUID != want {
			t.Errorf("the plugin launched after DropPrivileges has Uid %q, want %q", l.PluginUID, want)
		}
		if !strings.Contains(l.IDMap, "operation not permitted") {
			t.Errorf("IDMapShare after DropPrivileges: %q, want EPERM (no CAP_SETFCAP, no CAP_SYS_ADMIN)", l.IDMap)
		}
	}
}

func TestKeepCapabilities(t *testing.T) {
	for _, c := range []struct {
		lc   LaunchConfig
		want string
	}{
		{LaunchConfig{}, "CAP_KILL,CAP_SETUID,CAP_SETGID"},
		{LaunchConfig{Disable: []Layer{LayerNamespaces}}, "CAP_KILL,CAP_SETUID,CAP_SETGID,CAP_CHOWN,CAP_DAC_OVERRIDE"},
		{LaunchConfig{Disable: []Layer{LayerLandlock}}, "CAP_KILL,CAP_SETUID,CAP_SETGID"},
	} {
		if got := CapabilityNames(c.lc.KeepCapabilities()); got != c.want {
			t.Errorf("%v: keep %s, want %s", c.lc.Disable, got, c.want)
		}
	}
	if got := CapabilityNames(nil); got != "none" {
		t.Errorf("CapabilityNames(nil) = %q", got)
	}
	if err := DropPrivileges([]Capability{64}); err == nil {
		t.Error("DropPrivileges accepted capability 64")
	}
}

// SocketGroup names the plugin's gid as the plugin sees it: 0 in its own
// user namespace, the host gid without one; nothing for a launcher that
// is not root.
func TestSocketGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		if name, gid := (LaunchConfig{}).SocketGroup(); name != "" || gid != -1 {
			t.Errorf("not root: SocketGroup = %q, %d", name, gid)
		}
		return
	}
	for _, tc := range []struct {
		cfg  LaunchConfig
		name string
		gid  int
	}{
		{LaunchConfig{}, "0", DefaultPluginGID},
		{LaunchConfig{HostUID: 4242, HostGID: 4343}, "0", 4343},
		{LaunchConfig{HostGID: 4343, Disable: []Layer{LayerNamespaces}}, "4343", 4343},
	} {
		if name, gid := tc.cfg.SocketGroup(); name != tc.name || gid != tc.gid {
			t.Errorf("%+v: SocketGroup = %q, %d; want %q, %d", tc.cfg, name, gid, tc.name, tc.gid)
		}
	}
}
