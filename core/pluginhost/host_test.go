package pluginhost

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/sandbox"
)

// testPluginDir holds krun-plugin-test, built once by TestMain from
// testdata/testplugin.
var testPluginDir string

func TestMain(m *testing.M) {
	if os.Getenv(envTestHost) != "" {
		os.Exit(testHostMain())
	}
	dir, err := os.MkdirTemp("", "pluginhost-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for out, pkg := range map[string]string{ExecutableName("test"): "./testdata/testplugin",
		ExecutableName("hostilegrpc"): "./testdata/hostilegrpc",
		ExecutableName("null"):        "../../examples/plugin-null", sandbox.TrampolineName: "../../cmd/krun-sandbox-exec"} {
		build := exec.Command("go", "build", "-o", filepath.Join(dir, out), pkg)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", pkg, err, out)
			os.Exit(1)
		}
	}
	testPluginDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// socketPair returns one end of a connected unix socket pair (the other is
// closed with the test).
func socketPair(t testing.TB) *os.File {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a
}

func testConfig(t testing.TB, mode string) Config {
	return Config{
		Kind:          "test",
		PluginDir:     testPluginDir,
		Socket:        socketPair(t),
		SandboxOff:    true,
		Env:           []string{"KRUN_TEST_MODE=" + mode},
		SocketBaseDir: shortTempDir(t),
	}
}

// shortTempDir is a temporary directory with a short path: the gRPC socket
// path inside it must fit a unix socket address.
func shortTempDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "ph")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestLaunchConfigureStatsShutdown(t *testing.T) {
	t.Setenv("KRUN_TEST_SECRET", "must-not-reach-the-plugin")
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, []byte("A"), 0o600); err != nil {
		t.Fatal(err)
	}
	imgF, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer imgF.Close()
	logs := &syncbuf.Buffer{}
	cfg := testConfig(t, "ok")
	cfg.Files = []NamedFile{{"image", imgF}}
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Trace, JSONFormat: true})

	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()

	// Needed for the connection only: gone once Launch has connected.
	if _, err := os.Stat(p.SocketDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there after the connection: %v", err)
	}
	if sp := p.socketPath(); !strings.HasPrefix(sp, p.SocketDir()+"/") {
		t.Errorf("gRPC socket %q is not inside the private dir %q", sp, p.SocketDir())
	}

	d, err := p.Describe(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if d.Kind != "test" || d.Configured {
		t.Errorf("Describe = %+v", d)
	}
	if pol := p.Policy(); pol.Kind != "test" || pol.Syscalls != sandbox.ProfileMinimal {
		t.Errorf("Policy = %+v, want the one the plugin declared", pol)
	}
	dev, _, err := p.Configure(context.Background(), map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	if dev.Type != 4 || dev.NumQueues != 1 || dev.MaxQueueSize != 256 {
		t.Errorf("Configure device = %+v", dev)
	}
	stats, err := p.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"pdeathsig":      uint64(syscall.SIGKILL),
		"fd3_socket":     1,
		"stdin_devnull":  1,
		"file_image":     'A',
		"socket_dir_env": 1,
	}
	for k, v := range want {
		if stats[k] != v {
			t.Errorf("plugin reports %s = %d, want %d (all: %v)", k, stats[k], v, stats)
		}
	}
	if stats["host_env_leak"] != 0 {
		t.Errorf("the host environment reached the plugin")
	}
	if stats["env_count"] > 12 {
		t.Errorf("plugin environment has %d variables, want only go-plugin's and krun's", stats["env_count"])
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("plugin still running after Shutdown")
	}
	if err := p.Err(); err != nil {
		t.Errorf("Err after Shutdown = %v", err)
	}
	if _, err := os.Stat(p.SocketDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there after Shutdown: %v", err)
	}
	if !logHas(logs.String(), "hello from test plugin", "krun-plugin-test") {
		t.Errorf("the plugin's hclog line did not reach the host logger; host log:\n%s", logs)
	}
	if !logHas(logs.String(), "configured", "krun-plugin-test") {
		t.Errorf("the plugin's log line from an RPC did not reach the host logger")
	}
}

// logHas reports whether a JSON log line with message msg from module mod
// was written.
func logHas(logs, msg, mod string) bool {
	sc := bufio.NewScanner(strings.NewReader(logs))
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		if e["@message"] == msg && strings.Contains(fmt.Sprint(e["@module"]), mod) {
			return true
		}
	}
	return false
}

func TestCrashMidRequest(t *testing.T) {
	p, err := Launch(testConfig(t, "crash"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	if _, err := p.Describe(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, err = p.Stats(context.Background())
	var ee *ExitError
	if !errors.As(err, &ee) || !errors.Is(err, ErrExited) {
		t.Fatalf("Stats on a crashing plugin: %v (%T), want *ExitError", err, err)
	}
	if ee.Op != "Stats" || ee.Pid != p.Pid() || ee.Status == nil {
		t.Errorf("ExitError = %+v", ee)
	}
	msg := err.Error()
	for _, s := range []string{"plugin test", "exited during Stats", "exit status 2", "panic: testplugin: crashing in Stats as asked"} {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q does not contain %q", msg, s)
		}
	}
	// The host keeps running and every later call reports the same crash.
	if _, _, err := p.Health(context.Background()); !errors.Is(err, ErrExited) {
		t.Errorf("Health after crash: %v", err)
	}
	if err := p.Err(); !errors.Is(err, ErrExited) {
		t.Errorf("Err after crash: %v", err)
	}
	if err := p.Shutdown(context.Background()); !errors.Is(err, ErrExited) {
		t.Errorf("Shutdown after crash: %v", err)
	}
	if _, err := os.Stat(p.SocketDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there: %v", err)
	}
}

// pluginCopy copies the test plugin under another kind name, so a test can
// look for its processes by executable path.
func pluginCopy(t *testing.T, kind string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testPluginDir, ExecutableName("test")))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ExecutableName(kind)), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// processesOf lists live (non-zombie) pids running exe.
func processesOf(exe string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || l != exe {
			continue
		}
		if alive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

// A launch whose context ends while the plugin hangs before its handshake
// ends then, with the context's error, the process killed: serve's
// restart of a hung plugin held a SIGTERM up to the handshake's timeout.
// Once LaunchContext returned, the context no longer matters.
func TestLaunchContextEndsAHungStart(t *testing.T) {
	cfg := testConfig(t, "hang")
	cfg.Kind = "hang"
	cfg.PluginDir = pluginCopy(t, "hang")
	cfg.HandshakeTimeout = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	start := time.Now()
	p, err := LaunchContext(ctx, cfg)
	if err == nil {
		p.Kill()
		t.Fatal("LaunchContext of a plugin that never answers the handshake succeeded")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the cancelled launch took %v (the handshake's timeout is a minute)", took)
	}
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "start abandoned") {
		t.Errorf("error %q, want the start abandoned for context.Canceled", err)
	}
	waitNoProcesses(t, filepath.Join(cfg.PluginDir, ExecutableName("hang")))
	if ents := leftSockDirs(cfg.SocketBaseDir); len(ents) != 0 {
		t.Errorf("private socket dir left behind: %v", ents)
	}

	// A launch that completed is not ended by its context's end.
	ok := testConfig(t, "ok")
	ctx, cancel = context.WithCancel(context.Background())
	p, err = LaunchContext(ctx, ok)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	cancel()
	time.Sleep(200 * time.Millisecond)
	select {
	case <-p.Done():
		t.Fatalf("the plugin ended with its launch's context: %v", p.Err())
	default:
	}
	if _, _, err := p.Configure(context.Background(), nil); err != nil {
		t.Fatalf("Configure after the launch's context ended: %v", err)
	}
}

// waitNoProcesses waits up to 5 s for no process to run exe.
func waitNoProcesses(t *testing.T, exe string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids := processesOf(exe)
		if len(pids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still running: pids %v", exe, pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestHandshakeTimeout(t *testing.T) {
	cfg := testConfig(t, "hang")
	cfg.Kind = "hang"
	cfg.PluginDir = pluginCopy(t, "hang")
	cfg.HandshakeTimeout = 300 * time.Millisecond
	start := time.Now()
	p, err := Launch(cfg)
	if err == nil {
		p.Kill()
		t.Fatal("Launch of a plugin that never answers the handshake succeeded")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("timing out took %v", took)
	}
	if !errors.Is(err, ErrHandshakeTimeout) || !strings.Contains(err.Error(), "within 300ms") {
		t.Errorf("error %q, want a handshake timeout naming 300ms", err)
	}
	if pids := processesOf(filepath.Join(cfg.PluginDir, ExecutableName("hang"))); len(pids) != 0 {
		t.Errorf("hung plugin still running: pids %v", pids)
	}
	if ents := leftSockDirs(cfg.SocketBaseDir); len(ents) != 0 {
		t.Errorf("private socket dir left behind: %v", ents)
	}
}

func TestLaunchFailures(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string
		is     error
	}{
		{
			name:   "missing binary",
			mutate: func(c *Config) { c.Kind = "nonexistent"; c.PluginDir = t.TempDir() },
			want:   []string{"krun-plugin-nonexistent not found in", "--plugin-dir", "KRUN_PLUGIN_DIR"},
			is:     ErrNotFound,
		},
		{
			name:   "exits before handshake",
			mutate: func(c *Config) { c.Env = []string{"KRUN_TEST_MODE=exit"} },
			want:   []string{"plugin test (pid ", "exited during handshake: exit status 3", "testplugin: refusing to start as asked"},
			is:     ErrExited,
		},
		{
			name:   "handshake version mismatch",
			mutate: func(c *Config) { c.Env = []string{"KRUN_TEST_MODE=version"} },
			want:   []string{"plugin test: handshake:", "99"},
		},
		{
			name:   "invalid sandbox policy",
			mutate: func(c *Config) { c.Env = []string{"KRUN_TEST_MODE=policy"} },
			want:   []string{"plugin test: ", "declares a sandbox policy krun-core refuses", `extra syscall "ptrace" is never granted`},
		},
		{
			name:   "no sandbox decision",
			mutate: func(c *Config) { c.SandboxOff = false },
			want:   []string{"no launcher-side sandbox configured"},
		},
		{
			name:   "sandbox apply fails",
			mutate: func(c *Config) { c.SandboxOff = false; c.Sandbox = failingSandbox{} },
			want:   []string{"plugin test: launcher-side sandbox: no namespaces here"},
		},
		{
			name:   "bad kind",
			mutate: func(c *Config) { c.Kind = "../../bin/sh" },
			want:   []string{`invalid plugin kind "../../bin/sh"`},
		},
		{
			name:   "no socket",
			mutate: func(c *Config) { c.Socket = nil },
			want:   []string{"no vhost-user socket"},
		},
		{
			name:   "not executable",
			mutate: func(c *Config) { c.Path = "/dev/null" },
			want:   []string{"plugin test: start /dev/null"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, "ok")
			tc.mutate(&cfg)
			p, err := Launch(cfg)
			if err == nil {
				p.Kill()
				t.Fatal("Launch succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.ContainsAny(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v is not %v", err, tc.is)
			}
			if ents := leftSockDirs(cfg.SocketBaseDir); len(ents) != 0 {
				t.Errorf("private socket dir left behind: %v", ents)
			}
		})
	}
}

type failingSandbox struct{}

func (failingSandbox) Apply(*exec.Cmd) error { return errors.New("no namespaces here") }

// replacingSandbox replaces SysProcAttr wholesale, as a careless launcher
// might; Pdeathsig must survive it.
type replacingSandbox struct{ called *bool }

func (s replacingSandbox) Apply(cmd *exec.Cmd) error {
	*s.called = true
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return nil
}

func TestSandboxApplyKeepsPdeathsig(t *testing.T) {
	called := false
	cfg := testConfig(t, "ok")
	cfg.SandboxOff = false
	cfg.Sandbox = replacingSandbox{&called}
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	if !called {
		t.Fatal("Sandbox.Apply was not called")
	}
	stats, err := p.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if stats["pdeathsig"] != uint64(syscall.SIGKILL) {
		t.Errorf("pdeathsig = %d after Apply replaced SysProcAttr", stats["pdeathsig"])
	}
	if pg, _ := syscall.Getpgid(p.Pid()); pg != p.Pid() {
		t.Errorf("Apply's SysProcAttr was not used (pgid %d, pid %d)", pg, p.Pid())
	}
}

// checkingSandbox has the optional Verify method.
type checkingSandbox struct {
	verifyErr error
}

func (checkingSandbox) Apply(*exec.Cmd) error { return nil }

func (s checkingSandbox) Verify(int) error { return s.verifyErr }

func TestSandboxVerify(t *testing.T) {
	// A Verify failure after Configure kills the plugin.
	cfg := testConfig(t, "ok")
	cfg.SandboxOff = false
	cfg.Sandbox = checkingSandbox{verifyErr: errors.New("Seccomp is 0, want 2")}
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	_, _, err = p.Configure(context.Background(), nil)
	if err == nil || !strings.Contains(err.Error(), "is not confined after Configure, killed it: Seccomp is 0, want 2") {
		t.Fatalf("Configure with a failing Verify: %v", err)
	}
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("unconfined plugin still running")
	}
}

func TestFlushErrorOnShutdown(t *testing.T) {
	cfg := testConfig(t, "ok")
	cfg.Env = append(cfg.Env, "KRUN_TEST_FLUSH_ERROR=fdatasync: input/output error")
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = p.Shutdown(context.Background())
	if err == nil || !strings.Contains(err.Error(), "plugin test: flush on shutdown: fdatasync: input/output error") {
		t.Fatalf("Shutdown = %v", err)
	}
}

func TestFind(t *testing.T) {
	flagDir, envDir := t.TempDir(), t.TempDir()
	exe := func(dir, kind string, mode os.FileMode) string {
		p := filepath.Join(dir, ExecutableName(kind))
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	inFlag := exe(flagDir, "both", 0o755)
	exe(envDir, "both", 0o755)
	inEnv := exe(envDir, "env-only", 0o755)
	exe(flagDir, "noexec", 0o644)
	os.Mkdir(filepath.Join(flagDir, ExecutableName("dir")), 0o755)
	t.Setenv(EnvPluginDir, envDir)
	dirs := SearchPath(flagDir)
	if len(dirs) != 3 || dirs[0] != flagDir || dirs[1] != envDir {
		t.Fatalf("SearchPath = %v", dirs)
	}
	selfDir := func() string { e, _ := os.Executable(); return filepath.Dir(e) }()
	if dirs[2] != selfDir {
		t.Errorf("SearchPath[2] = %q, want the executable's dir %q", dirs[2], selfDir)
	}

	tests := []struct {
		kind, want, wantErr string
	}{
		{kind: "both", want: inFlag},
		{kind: "env-only", want: inEnv},
		{kind: "noexec", wantErr: "is not executable"},
		{kind: "dir", wantErr: "is not a regular file"},
		{kind: "absent", wantErr: "krun-plugin-absent not found in " + flagDir + ", " + envDir},
		{kind: "Upper", wantErr: "invalid plugin kind"},
		{kind: "a/b", wantErr: "invalid plugin kind"},
		{kind: "-x", wantErr: "invalid plugin kind"},
		{kind: "", wantErr: "invalid plugin kind"},
	}
	for _, tc := range tests {
		got, err := Find(tc.kind, dirs)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Find(%q) = %q, %v; want error containing %q", tc.kind, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Find(%q) = %q, %v; want %q", tc.kind, got, err, tc.want)
		}
	}
}

func TestLaunchAll(t *testing.T) {
	var cfgs []Config
	for i := 0; i < 4; i++ {
		cfgs = append(cfgs, testConfig(t, "ok"))
	}
	ps, err := LaunchAll(cfgs)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ps {
		if _, err := p.Describe(context.Background()); err != nil {
			t.Error(err)
		}
		seen[p.Pid()] = true
	}
	if len(seen) != 4 {
		t.Errorf("4 launches gave %d distinct processes", len(seen))
	}
	for _, p := range ps {
		if err := p.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	}

	// One bad launch: the error names it and the good ones are killed.
	cfgs = []Config{testConfig(t, "ok"), testConfig(t, "ok")}
	cfgs[1].Kind = "nonexistent"
	cfgs[1].PluginDir = t.TempDir()
	if _, err := LaunchAll(cfgs); !errors.Is(err, ErrNotFound) {
		t.Fatalf("LaunchAll with a missing plugin: %v", err)
	}
	if ents := leftSockDirs(cfgs[0].SocketBaseDir); len(ents) != 0 {
		t.Errorf("the good plugin's socket dir is left: %v", ents)
	}
}

// envTestHost makes the test binary act as a host process that launches
// the plugin named by it, prints the plugin's pid and waits to be killed.
const envTestHost = "KRUN_PLUGINHOST_TEST_HOST"

func testHostMain() int {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	p, err := Launch(Config{
		Kind:       "test",
		Path:       os.Getenv(envTestHost),
		Socket:     os.NewFile(uintptr(fds[0]), "sock"),
		SandboxOff: true,
		Env:        []string{"KRUN_TEST_MODE=ok"},
	})
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("pid", p.Pid(), p.SocketDir())
	time.Sleep(time.Minute)
	return 0
}

// TestPdeathsigKillsPluginWithHost: a plugin dies with its host killed by
// SIGKILL (Pdeathsig), and leaves no socket directory behind.
func TestPdeathsigKillsPluginWithHost(t *testing.T) {
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
	var pid int
	var sockDir string
	line, err := bufio.NewReader(out).ReadString('\n')
	if _, serr := fmt.Sscanf(line, "pid %d %s", &pid, &sockDir); err != nil || serr != nil {
		t.Fatalf("host said %q: %v %v", line, err, serr)
	}
	if !alive(pid) {
		t.Fatalf("plugin %d not running while its host is", pid)
	}
	host.Process.Kill()
	host.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("plugin %d survived its host", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A host killed with SIGKILL cannot remove the private dir, so it is
	// removed once the host has connected: it was left in $TMPDIR, one
	// per plugin per killed krun-core, never reclaimed (this machine's
	// /tmp held 180 of them; from review).
	if _, err := os.Stat(sockDir); err == nil {
		os.RemoveAll(sockDir)
		t.Errorf("socket directory %s outlives its killed host and its plugin", sockDir)
	}
}

// BenchmarkLaunchToFirstRPC measures starting a plugin process, the
// go-plugin handshake and the first RPC (Describe).
func BenchmarkLaunchToFirstRPC(b *testing.B) {
	self0, child0 := cpuClock()
	defer func() { reportCPU(b, self0, child0) }()
	for b.Loop() {
		b.StopTimer()
		cfg := testConfig(b, "ok")
		b.StartTimer()
		p, err := Launch(cfg)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Describe(context.Background()); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		p.Kill()
		b.StartTimer()
	}
}

func TestTailBufferPanicLine(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"panic survives a long dump", "{\"@level\":\"info\"}\npanic: boom\n" + strings.Repeat("\tframe\n", 200), "panic: boom"},
		{"fatal error", "runtime: failed to create new OS thread\nfatal error: newosproc\n" + strings.Repeat("x\n", 100), "fatal error: newosproc"},
		{"json error line", "{\"@level\":\"info\",\"@message\":\"hi\"}\n{\"@level\":\"error\",\"@message\":\"plugin init error\",\"error\":\"bind: invalid argument\"}\n", "plugin init error: bind: invalid argument"},
		{"last plain line", "{\"@level\":\"info\"}\nfirst\nsecond\n{\"@level\":\"debug\"}\n", "second"},
		{"unterminated", "no newline", "no newline"},
		{"signal", "SIGSEGV: segmentation violation\nPC=0x0 m=0 sigcode=0\n" + strings.Repeat("y\n", 100), "SIGSEGV: segmentation violation"},
		{"not a signal", "SIGNAL lost: x\nlast\n", "last"},
		{"nothing", "", ""},
	}
	for _, tc := range tests {
		var tb TailBuffer
		for i := 0; i < len(tc.in); i += 7 { // odd write sizes
			tb.Write([]byte(tc.in[i:min(i+7, len(tc.in))]))
		}
		if got := tb.PanicLine(); got != tc.want {
			t.Errorf("%s: PanicLine = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestOutOfMemoryHint: a sandboxed plugin that dies of the Go runtime's
// "out of memory" most likely hit the sandbox's RLIMIT_DATA, and its exit
// report says so (it said only "fatal error: runtime: out of memory",
// which reads as the host's memory: found in a third-party author's
// walk-through, a RAM disk of 2 GiB); an unsandboxed one, or another
// fatal error, gets no hint.
func TestOutOfMemoryHint(t *testing.T) {
	for _, c := range []struct {
		name      string
		sandboxed bool
		stderr    string
		hint      bool
	}{
		{"sandboxed out of memory", true, "fatal error: runtime: out of memory\n\nruntime stack:\n", true},
		{"sandboxed ENOMEM panic", true, "panic: mmap: cannot allocate memory\n", true},
		{"unsandboxed out of memory", false, "fatal error: runtime: out of memory\n", false},
		{"sandboxed other panic", true, "panic: boom\n", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := &Process{kind: "ram", stderr: &TailBuffer{}, sandboxed: c.sandboxed}
			p.stderr.Write([]byte(c.stderr))
			got := p.detail(nil)
			if !strings.HasPrefix(got, strings.SplitN(c.stderr, "\n", 2)[0]) {
				t.Errorf("detail %q lost the plugin's line", got)
			}
			if has := strings.Contains(got, "RLIMIT_DATA, 1024 MiB"); has != c.hint {
				t.Errorf("detail %q: hint %v, want %v", got, has, c.hint)
			}
		})
	}
}

// A plugin directory given relative to the working directory works: exec
// must not get a bare name to look up in $PATH.
func TestRelativePluginDir(t *testing.T) {
	t.Chdir(testPluginDir)
	path, err := Find("test", []string{"."})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(testPluginDir, ExecutableName("test")); path != want {
		t.Errorf("Find in . = %q, want %q", path, want)
	}
	cfg := testConfig(t, "ok")
	cfg.PluginDir = "."
	p, err := Launch(cfg)
	if err != nil {
		t.Fatalf("Launch with --plugin-dir .: %v", err)
	}
	p.Kill()
}

func TestCheckSearchPath(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	for _, tt := range []struct {
		flag, env string
		want      string // "" for no error
	}{
		{"", "", ""},
		{dir, "", ""},
		{".", ".", ""},
		{filepath.Join(dir, "missing"), "", "--plugin-dir " + filepath.Join(dir, "missing") + ": no such directory"},
		{file, "", "--plugin-dir " + file + ": not a directory"},
		{"", "nope-" + filepath.Base(dir), "$KRUN_PLUGIN_DIR=nope-" + filepath.Base(dir) + ": no such directory"},
	} {
		t.Setenv(EnvPluginDir, tt.env)
		err := CheckSearchPath(tt.flag)
		if got := fmt.Sprint(err); (tt.want == "" && err != nil) || (tt.want != "" && got != tt.want) {
			t.Errorf("CheckSearchPath(%q) with %s=%q: %v, want %q", tt.flag, EnvPluginDir, tt.env, err, tt.want)
		}
	}
}

// TestInvalidReportedKind: a plugin whose Kind is no valid kind (upper
// case, a dot) is refused with a line saying its Kind is wrong; the
// mismatch message asked to rename the executable to a name that no
// --plugin can reach (found in a third-party author's walk-through,
// helper-138).
func TestInvalidReportedKind(t *testing.T) {
	for _, bad := range []string{"RamBlk", "ram.blk"} {
		t.Run(bad, func(t *testing.T) {
			cfg := testConfig(t, "ok")
			cfg.Path = filepath.Join(testPluginDir, ExecutableName("test"))
			cfg.Env = append(cfg.Env, "KRUN_TEST_KIND="+bad)
			p, err := Launch(cfg)
			if err == nil {
				p.Kill()
				t.Fatalf("a plugin reporting kind %q launched", bad)
			}
			msg := err.Error()
			if !strings.Contains(msg, fmt.Sprintf("reports kind %q, which is no plugin kind", bad)) ||
				!strings.Contains(msg, `its Kind must be "test"`) || strings.Contains(msg, "must be named") {
				t.Errorf("error %q: want one line saying the plugin's Kind is wrong", msg)
			}
		})
	}
}

// An executable whose name does not match the kind the plugin reports is
// refused and ended.
func TestKindMismatchRefused(t *testing.T) {
	cfg := testConfig(t, "ok")
	cfg.Kind = "other"
	cfg.PluginDir = pluginCopy(t, "other")
	p, err := Launch(cfg)
	if err == nil {
		p.Kill()
		t.Fatal("a plugin reporting kind test launched as krun-plugin-other")
	}
	if !strings.Contains(err.Error(), `reports kind "test"`) || strings.Contains(err.Error(), "\n") {
		t.Errorf("error %q: want one line naming the reported kind", err)
	}
	exe := filepath.Join(cfg.PluginDir, ExecutableName("other"))
	deadline := time.Now().Add(5 * time.Second)
	for len(processesOf(exe)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("refused plugin still running: %v", processesOf(exe))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A plugin launched with the real sandbox: its gRPC socket is in its own
// root (the host reaches it through /proc/PID/root), it runs as an
// unprivileged host id, and although it never restricts itself (the test
// plugin does not use pluginsdk) it passes Verify: the trampoline confined
// it before its first instruction.
func TestLaunchSandboxed(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, []byte("B"), 0o644); err != nil {
		t.Fatal(err)
	}
	imgF, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer imgF.Close()
	p, lc, logs := launchSandboxed(t, []NamedFile{{"image", imgF}})
	if p.Path() != filepath.Join(testPluginDir, ExecutableName("test")) {
		t.Errorf("Path() = %q, want the plugin binary", p.Path())
	}
	want := fmt.Sprintf("/proc/%d/root%s/", p.Pid(), p.SocketDir())
	if sp := p.socketPath(); !strings.HasPrefix(sp, want) {
		t.Errorf("gRPC socket %q, want it in the plugin's own root under %q", sp, want)
	}
	if _, err := os.Stat(p.SocketDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the host's socket dir still there once connected: %v", err)
	}
	if _, _, err := p.Configure(context.Background(), nil); err != nil {
		t.Fatalf("Configure (and Verify of a plugin that never called Restrict): %v", err)
	}
	stats, err := p.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if stats["file_image"] != 'B' || stats["fd3_socket"] != 1 {
		t.Errorf("plugin's view of its fds: %v", stats)
	}
	uid, gid, err := lc.PluginIDs()
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(st), "\n") {
		for k, id := range map[string]int{"Uid:": uid, "Gid:": gid} {
			if f := strings.Fields(l); len(f) == 5 && f[0] == k && (f[1] != strconv.Itoa(id) || id == 0) {
				t.Errorf("plugin %s, want %d (never 0)", l, id)
			}
		}
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if !strings.Contains(logs.String(), "seccomp refused a system call: plugin=test syscall=prctl") {
		t.Errorf("the launcher did not log the test plugin's refused prctl (PR_GET_PDEATHSIG in its init)")
	}
}

// The address a plugin announces in its handshake is its choice: only a
// unix socket directly in its own socket directory is accepted.
func TestPluginToHostChecksAddress(t *testing.T) {
	cmd := exec.Command("/bin/true")
	cmd.Env = []string{"PLUGIN_UNIX_SOCKET_DIR=/tmp/k/plugin-dir1"}
	r, err := NewProcRunner(cmd, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ network, addr, want string }{
		{"unix", "/tmp/k/plugin-dir1/plugin2", "/tmp/k/plugin-dir1/plugin2"},
		{"tcp", "127.0.0.1:22", ""},
		{"unix", "/var/run/docker.sock", ""},
		{"unix", "/tmp/k/plugin-dir1/../../../run/x.sock", ""},
		{"unix", "/tmp/k/plugin-dir1/sub/x.sock", ""},
	} {
		_, got, err := r.PluginToHost(c.network, c.addr)
		if got != c.want || (err == nil) != (c.want != "") {
			t.Errorf("PluginToHost(%s, %s) = %q, %v; want %q", c.network, c.addr, got, err, c.want)
		}
	}
}

// BenchmarkLaunchToFirstRPCSandboxed is the launch cost with the real
// sandbox: namespaces, and the trampoline that applies the root, Landlock
// and seccomp before the plugin's first instruction, once as this (large)
// test binary re-executed, once as krun-sandbox-exec.
func BenchmarkLaunchToFirstRPCSandboxed(b *testing.B) {
	for _, c := range []struct{ name, trampoline string }{
		{"self", "/proc/self/exe"},
		{"krun-sandbox-exec", filepath.Join(testPluginDir, sandbox.TrampolineName)},
	} {
		b.Run(c.name, func(b *testing.B) {
			self0, child0 := cpuClock()
			defer func() { reportCPU(b, self0, child0) }()
			for b.Loop() {
				b.StopTimer()
				cfg := testConfig(b, "ok")
				cfg.SandboxOff = false
				cfg.Sandbox = sandbox.LaunchConfig{Kind: "test", Trampoline: c.trampoline, Log: hclog.NewNullLogger()}
				b.StartTimer()
				p, err := Launch(cfg)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := p.Describe(context.Background()); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p.Kill()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkLaunchConfigureSandboxed is the cost of a sandboxed plugin up to
// a configured device: launch, handshake, Describe, and Configure, in which
// the plugin (examples/plugin-null, built with pluginsdk) narrows its
// sandbox with Restrict and the host checks it with Verify.
func BenchmarkLaunchConfigureSandboxed(b *testing.B) {
	for _, c := range []struct{ name, trampoline string }{
		{"self", "/proc/self/exe"},
		{"krun-sandbox-exec", filepath.Join(testPluginDir, sandbox.TrampolineName)},
	} {
		b.Run(c.name, func(b *testing.B) {
			self0, child0 := cpuClock()
			defer func() { reportCPU(b, self0, child0) }()
			for b.Loop() {
				b.StopTimer()
				cfg := testConfig(b, "ok")
				cfg.Kind = "null"
				cfg.SandboxOff = false
				cfg.Sandbox = sandbox.LaunchConfig{Kind: "null", Trampoline: c.trampoline, Log: hclog.NewNullLogger()}
				b.StartTimer()
				p, err := Launch(cfg)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := p.Describe(context.Background()); err != nil {
					b.Fatal(err)
				}
				if _, _, err := p.Configure(context.Background(), nil); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p.Kill()
				b.StartTimer()
			}
		})
	}
}

// cpuClock is the CPU time (user + system) of this process and of its
// reaped children (the plugins), for benchmarks on a shared machine where
// wall time mostly measures the other load.
func cpuClock() (self, children time.Duration) {
	var a, b syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &a)
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &b)
	d := func(r syscall.Rusage) time.Duration {
		return time.Duration(syscall.TimevalToNsec(r.Utime) + syscall.TimevalToNsec(r.Stime))
	}
	return d(a), d(b)
}

// reportCPU reports the CPU time per operation since (self0, child0).
func reportCPU(b *testing.B, self0, child0 time.Duration) {
	self, child := cpuClock()
	b.ReportMetric(float64(self-self0)/float64(b.N)/1e6, "host-cpu-ms/op")
	b.ReportMetric(float64(child-child0)/float64(b.N)/1e6, "plugin-cpu-ms/op")
}

// TestSocketDirGoneSandboxedWithoutRoot: with the sandbox but not its
// empty root, the plugin makes its socket in the host's directory (through
// its fd of it), as without the sandbox; the directory goes once the host
// is connected (waited for: go-plugin dials without blocking), and the
// connection, which has no idle mode, outlives it. (From review.)
func TestSocketDirGoneSandboxedWithoutRoot(t *testing.T) {
	p, _, _ := launchSandboxed(t, nil, sandbox.LayerRoot)
	if sp := p.socketPath(); !strings.HasPrefix(sp, p.SocketDir()+"/") {
		t.Errorf("gRPC socket %q, want it in the host's directory %q", sp, p.SocketDir())
	}
	if _, err := os.Stat(p.SocketDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there once connected: %v", err)
	}
	if _, _, err := p.Configure(context.Background(), nil); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	if _, err := p.Stats(context.Background()); err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// launchSandboxed launches the test plugin ("ok") with files in the real
// sandbox, less the layers disable names; it is killed when the test ends,
// and the host's log shown if the test failed. It skips where a layer it
// needs is unavailable.
func launchSandboxed(t *testing.T, files []NamedFile, disable ...sandbox.Layer) (*Plugin, sandbox.LaunchConfig, *syncbuf.Buffer) {
	t.Helper()
	for _, l := range sandbox.Status().Layers {
		if !l.Available && !slices.Contains(disable, l.Layer) {
			t.Skipf("sandbox layer %s unavailable on this host: %s", l.Layer, l.Detail)
		}
	}
	logs := &syncbuf.Buffer{}
	cfg := testConfig(t, "ok")
	cfg.Files = files
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	cfg.SandboxOff = false
	lc := sandbox.LaunchConfig{Kind: "test", Log: cfg.Logger, Disable: disable}
	cfg.Sandbox = lc
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("host log:\n%s", logs)
		}
	})
	return p, lc, logs
}

// A plugin launched without the sandbox is in a session of its own, as
// the trampoline puts a sandboxed one: a SIGTERM to krun-core's process
// group (timeout(1), systemd's control-group kill) made `serve --sandbox
// off` exit 1, its plugin dead of the signal during the shutdown the
// same signal started (from review, helper-102).
func TestUnsandboxedPluginHasItsOwnSession(t *testing.T) {
	cfg := testConfig(t, "ok")
	p, err := Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	sid, err := unix.Getsid(p.Pid())
	if err != nil {
		t.Fatal(err)
	}
	if sid != p.Pid() {
		mine, _ := unix.Getsid(0)
		t.Errorf("the plugin's session is %d (ours %d), want its own (%d)", sid, mine, p.Pid())
	}
}
