package sandbox

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// These tests run the test binary itself as a plugin under the real sandbox
// (see helper_test.go) and check what it can and cannot do, from inside and
// from outside.

const (
	dontCare = -2
	succeeds = 0
)

// expect maps each forbidden action to the errnos it may fail with (0:
// must succeed, dontCare: not checked).
type expect map[string][]int

func allFail(errno int) expect {
	e := expect{}
	for _, a := range forbiddenActions() {
		e[a.name] = []int{errno}
	}
	return e
}

func (e expect) with(kv ...any) expect {
	out := expect{}
	for k, v := range e {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		switch v := kv[i+1].(type) {
		case int:
			out[kv[i].(string)] = []int{v}
		case syscall.Errno:
			out[kv[i].(string)] = []int{int(v)}
		case []int:
			out[kv[i].(string)] = v
		}
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type probeConfig struct {
	kind        string
	lc          LaunchConfig
	viaLauncher bool                // start an intermediate launcher process
	launcherAs  *syscall.Credential // run the intermediate as this user
	copyBinary  bool                // the binary must be executable by others
}

type probe struct {
	t         *testing.T
	cfg       probeConfig
	cmd       *exec.Cmd
	pid       int
	lines     chan probeLine
	stdin     io.WriteCloser
	stderr    *syncBuffer
	dir       string
	diskPath  string
	vhost     int // the test's end of the vhost-user socketpair
	leakPath  string
	sharedDir string
}

func requireSandboxHost(t *testing.T) {
	t.Helper()
	if err := probeNamespaces(); err != nil {
		t.Skipf("no user namespaces on this host (%v): the real sandbox cannot run", err)
	}
	if _, err := landlockABI(); err != nil {
		t.Skipf("no landlock on this host (%v)", err)
	}
}

// listenUnix and listenTCP are raw: this test binary must not import net.
func listenUnix(t *testing.T, path string) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func listenTCP(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return sa.(*unix.SockaddrInet4).Port
}

func startProbe(t *testing.T, cfg probeConfig) *probe {
	t.Helper()
	p := &probe{t: t, cfg: cfg, lines: make(chan probeLine, 16), stderr: &syncBuffer{}}
	dir, err := os.MkdirTemp("", "krun-sandbox-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// World-writable so a probe mapped to nobody can create its listener.
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	p.dir = dir
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.copyBinary {
		b, err := os.ReadFile(self)
		if err != nil {
			t.Fatal(err)
		}
		self = filepath.Join(dir, "plugin.test")
		if err := os.WriteFile(self, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	p.diskPath = filepath.Join(dir, "disk.img")
	disk, err := os.OpenFile(p.diskPath, os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { disk.Close() })
	if err := disk.Truncate(64 << 10); err != nil {
		t.Fatal(err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	p.vhost = pair[0]
	t.Cleanup(func() { unix.Close(pair[0]) })
	plugEnd := os.NewFile(uintptr(pair[1]), "vhost-user")
	t.Cleanup(func() { plugEnd.Close() })
	tv := unix.Timeval{Sec: 30}
	unix.SetsockoptTimeval(p.vhost, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	files := []*os.File{disk, plugEnd}
	if cfg.kind == "fs" {
		p.sharedDir = filepath.Join(dir, "shared")
		if err := os.Mkdir(p.sharedDir, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "outside"), []byte("secret"), 0o666); err != nil {
			t.Fatal(err)
		}
		sd, err := os.Open(p.sharedDir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sd.Close() })
		files = append(files, sd)
	}
	listenUnix(t, filepath.Join(dir, "host.sock"))
	port := listenTCP(t)

	// A descriptor the launcher holds without close-on-exec: it must not
	// reach the plugin.
	p.leakPath = filepath.Join(dir, "leaked")
	leak, err := syscall.Open(p.leakPath, syscall.O_CREAT|syscall.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(leak) })

	env := []string{
		envKind + "=" + cfg.kind,
		envParent + "=" + strconv.Itoa(os.Getpid()),
		envHostDir + "=" + dir,
		envSock + "=" + filepath.Join(dir, "host.sock"),
		envTCP + "=" + strconv.Itoa(port),
		envSelf + "=" + self,
		envListen + "=" + filepath.Join(dir, "probe.sock"),
		// No collection while a refused raw system call (fork) waits for
		// the seccomp supervisor; see "Known limits" in docs/SECURITY.md.
		"GOGC=off",
	}
	p.cmd = exec.Command(self)
	p.cmd.Stderr = p.stderr
	p.cmd.WaitDelay = 10 * time.Second // a stray child holding our pipes must not hang Wait
	p.cmd.ExtraFiles = files
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.viaLauncher {
		lcJSON, err := json.Marshal(cfg.lc)
		if err != nil {
			t.Fatal(err)
		}
		p.cmd.Env = append(env, envHelper+"=launch", envLaunch+"="+string(lcJSON), envNFiles+"="+strconv.Itoa(len(files)))
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cfg.launcherAs}
	} else {
		p.cmd.Env = append(env, envHelper+"=probe")
		lc := cfg.lc
		lc.Log = hclog.New(&hclog.LoggerOptions{Output: p.stderr})
		if err := lc.Apply(p.cmd); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stdin.Close()
		p.cmd.Process.Kill()
		p.cmd.Wait()
		if t.Failed() {
			t.Logf("probe stderr:\n%s", p.stderr.String())
		}
	})
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var l probeLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				l = probeLine{Phase: "garbage", Error: sc.Text()}
			}
			p.lines <- l
		}
	}()
	p.pid = p.cmd.Process.Pid
	if cfg.viaLauncher {
		l := p.next("pid")
		if p.pid, err = strconv.Atoi(l.Error); err != nil {
			t.Fatalf("launcher sent pid %q", l.Error)
		}
	}
	return p
}

// next returns the next line of the probe, which must be of phase want.
func (p *probe) next(want string) probeLine {
	p.t.Helper()
	select {
	case l, open := <-p.lines:
		if !open {
			p.t.Fatalf("probe exited before %q; stderr:\n%s", want, p.stderr.String())
		}
		if l.Phase != want {
			p.t.Fatalf("probe sent %q (%s), want %q; stderr:\n%s", l.Phase, l.Error, want, p.stderr.String())
		}
		return l
	case <-time.After(60 * time.Second):
		p.t.Fatalf("no %q line from the probe in 60s; stderr:\n%s", want, p.stderr.String())
	}
	return probeLine{}
}

// talk plays the front-end and the gRPC host while the probe does its I/O.
func (p *probe) talk() (memfdAfter string) {
	t := p.t
	buf := make([]byte, 16)
	n, err := unix.Read(p.vhost, buf)
	if err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("vhost socket: read %q, %v", buf[:n], err)
	}
	mfd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	if err := unix.Ftruncate(mfd, 4096); err != nil {
		t.Fatal(err)
	}
	unix.Pwrite(mfd, []byte("guest memory"), 0)
	if err := unix.Sendmsg(p.vhost, []byte("mem"), unix.UnixRights(mfd), nil, 0); err != nil {
		t.Fatal(err)
	}
	if n, err = unix.Read(p.vhost, buf); err != nil || string(buf[:n]) != "ok" {
		t.Fatalf("vhost socket: read %q, %v", buf[:n], err)
	}
	got := make([]byte, 12)
	unix.Pread(mfd, got, 0)

	c, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(c)
	unix.SetsockoptTimeval(c, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 30})
	if err := unix.Connect(c, &unix.SockaddrUnix{Name: filepath.Join(p.dir, "probe.sock")}); err != nil {
		t.Fatalf("connect to the listener the plugin made before Restrict: %v", err)
	}
	unix.Write(c, []byte("ping"))
	if n, err = unix.Read(c, buf); err != nil || string(buf[:n]) != "pong" {
		t.Fatalf("plugin listener: read %q, %v", buf[:n], err)
	}
	return string(got)
}

func (p *probe) finish() {
	p.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			p.t.Errorf("probe exit: %v; stderr:\n%s", err, p.stderr.String())
		}
	case <-time.After(30 * time.Second):
		p.t.Errorf("probe did not exit after its stdin closed")
	}
}

// checkAttempts compares every forbidden action on every thread with want.
func checkAttempts(t *testing.T, l probeLine, want expect) {
	t.Helper()
	if l.NewTIDs < 2 {
		t.Errorf("only %d OS threads created after Restrict were tested, want 2", l.NewTIDs)
	}
	threads := map[string]int{}
	for _, a := range l.Attempts {
		threads[a.Thread]++
		w, ok := want[a.Action]
		if !ok {
			t.Errorf("no expectation for action %s", a.Action)
			continue
		}
		if len(w) == 1 && w[0] == dontCare {
			continue
		}
		match := false
		for _, e := range w {
			match = match || e == a.Errno
		}
		if !match {
			t.Errorf("%s on thread %s (tid %d): errno %d (%s), want one of %v (%s)", a.Action, a.Thread, a.TID,
				a.Errno, a.Err, w, errnoNames(w))
		}
	}
	for _, th := range []string{"main", "old-0", "old-1", "old-2", "new-0", "new-1"} {
		if threads[th] != len(forbiddenActions()) {
			t.Errorf("thread %s ran %d actions, want %d", th, threads[th], len(forbiddenActions()))
		}
	}
}

func errnoNames(es []int) string {
	var s []string
	for _, e := range es {
		if e == 0 {
			s = append(s, "success")
		} else {
			s = append(s, syscall.Errno(e).Error())
		}
	}
	return strings.Join(s, " | ")
}

func checkIO(t *testing.T, l probeLine, kind string) {
	t.Helper()
	want := []string{"pwrite_pread", "fdatasync", "fallocate_punch_hole", "fstat", "eventfd_epoll",
		"vhost_socket_memfd", "accept_pre_restrict_listener", "runtime"}
	if kind == "fs" {
		want = append(want, "fs_create_in_shared_dir", "fs_whiteout", "fs_device_refused", "fs_fchmodat2",
			"fs_escape_shared_dir_refused")
	}
	got := map[string]string{}
	for _, r := range l.IO {
		got[r.Name] = r.Err
	}
	if kind == "net" {
		// The net profile has no disk I/O: those steps must be refused.
		want = slices.DeleteFunc(want, func(w string) bool {
			if w == "pwrite_pread" || w == "fdatasync" || w == "fallocate_punch_hole" {
				if e := got[w]; !strings.Contains(e, "operation not permitted") {
					t.Errorf("net plugin %s: %q, want EPERM from seccomp", w, e)
				}
				return true
			}
			return false
		})
	}
	for _, w := range want {
		e, ran := got[w]
		if !ran {
			t.Errorf("I/O step %s did not run", w)
		} else if e != "" {
			t.Errorf("I/O step %s failed inside the sandbox: %s", w, e)
		}
	}
}

// checkOutside looks at the running, restricted probe from the host.
func (p *probe) checkOutside(lc LaunchConfig) {
	t := p.t
	t.Helper()
	if err := lc.Verify(p.pid); err != nil {
		t.Errorf("Verify: %v", err)
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", p.pid))
	if err != nil {
		t.Fatal(err)
	}
	if len(tasks) < 2 {
		t.Errorf("probe has %d threads, want several", len(tasks))
	}
	for _, task := range tasks {
		st, err := readStatus(fmt.Sprintf("/proc/%d/task/%s/status", p.pid, task.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || st["CapEff"] != zeroCaps {
			t.Errorf("thread %s: NoNewPrivs %q Seccomp %q CapEff %q, want 1, 2, 0", task.Name(),
				st["NoNewPrivs"], st["Seccomp"], st["CapEff"])
		}
	}
	for _, ns := range NamespaceNames() {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", p.pid, ns))
		if err != nil || mine == theirs {
			t.Errorf("namespace %s: plugin %q, host %q, %v", ns, theirs, mine, err)
		}
	}
	// The plugin's root, seen from outside: empty.
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", p.pid)); err != nil || len(ents) != 0 {
		t.Errorf("plugin root has %d entries (%v), want an empty directory", len(ents), err)
	}
	// The fds: stdio pipes, the handed-in files, and only the runtime's and
	// the sandbox's own anonymous inodes besides.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
	if err != nil {
		t.Fatal(err)
	}
	anon := map[string]int{}
	for _, e := range fds {
		fd, _ := strconv.Atoi(e.Name())
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", p.pid, fd))
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case fd <= 2:
			if !strings.HasPrefix(target, "pipe:") {
				t.Errorf("fd %d is %q, want a stdio pipe", fd, target)
			}
		case fd == fdDisk:
			if !strings.HasSuffix(target, "/disk.img") {
				t.Errorf("fd 3 is %q, want the disk image", target)
			}
		case fd == fdVhost:
			if !strings.HasPrefix(target, "socket:") {
				t.Errorf("fd 4 is %q, want the vhost-user socket", target)
			}
		case fd == fdShared && p.cfg.kind == "fs":
			if !strings.HasSuffix(target, "/shared") {
				t.Errorf("fd 5 is %q, want the shared directory", target)
			}
		case target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]" || target == "anon_inode:seccomp notify":
			anon[target]++
		default:
			t.Errorf("unexpected fd %d in the plugin: %q", fd, target)
		}
		if strings.HasSuffix(target, "/leaked") {
			t.Errorf("fd %d: the launcher's inherited fd leaked into the plugin", fd)
		}
	}
	if anon["anon_inode:seccomp notify"] != 1 {
		t.Errorf("plugin holds %d seccomp listeners, want 1", anon["anon_inode:seccomp notify"])
	}
	for k, n := range anon {
		if n > 1 {
			t.Errorf("plugin holds %d fds of %s", n, k)
		}
	}
}

// checkRefusalsLogged checks the plugin's log names the refused calls.
func (p *probe) checkRefusalsLogged(syscalls ...string) {
	p.t.Helper()
	log := p.stderr.String()
	for _, s := range syscalls {
		if !strings.Contains(log, `"syscall":"`+s+`"`) {
			p.t.Errorf("plugin log has no seccomp refusal of %s", s)
		}
	}
}

func (p *probe) checkNothingCreated() {
	p.t.Helper()
	ents, _ := os.ReadDir(p.dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "created-") {
			p.t.Errorf("the plugin created %s on the host", e.Name())
		}
	}
}

// refusedByFullSandbox is what the full sandbox does to each action: the
// seccomp filter is checked first, so EPERM.
func refusedByFullSandbox() expect { return allFail(int(unix.EPERM)) }

func runFullProbe(t *testing.T, cfg probeConfig, want expect) {
	p := startProbe(t, cfg)
	checkAttempts(t, p.next("attempts"), want)
	mem := p.talk()
	if mem != "plugin wrote" {
		t.Errorf("guest memory after the plugin wrote it through its shared mapping: %q", mem)
	}
	checkIO(t, p.next("io"), cfg.kind)
	p.next("ready")
	p.checkOutside(cfg.lc)
	p.checkRefusalsLogged("socket", "execve", "clone", "ptrace", "mount", "kill", "prlimit64", "io_uring_setup", "mmap")
	p.checkNothingCreated()
	p.finish()
	if cfg.kind == "fs" {
		b, err := os.ReadFile(filepath.Join(p.sharedDir, "made-by-plugin"))
		if err != nil || string(b) != "inside" {
			t.Errorf("file the plugin made in the shared directory: %q, %v", b, err)
		}
	}
}

func TestSandboxBlockPlugin(t *testing.T) {
	requireSandboxHost(t)
	runFullProbe(t, probeConfig{kind: "blk"}, refusedByFullSandbox())
}

func TestSandboxFSPlugin(t *testing.T) {
	requireSandboxHost(t)
	// openat is allowed for virtio-fs; the paths do not exist in its empty root.
	want := refusedByFullSandbox().with("open_etc_passwd", unix.ENOENT, "create_file", unix.ENOENT)
	runFullProbe(t, probeConfig{kind: "fs"}, want)
}

func TestSandboxNetPlugin(t *testing.T) {
	requireSandboxHost(t)
	runFullProbe(t, probeConfig{kind: "net"}, refusedByFullSandbox())
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a process as another user (nobody)")
	}
}

// A root launcher mapping the plugin to nobody.
func TestSandboxHostUIDNobody(t *testing.T) {
	requireSandboxHost(t)
	requireRoot(t)
	cfg := probeConfig{kind: "blk", copyBinary: true, lc: LaunchConfig{HostUID: 65534, HostGID: 65534}}
	p := startProbe(t, cfg)
	checkAttempts(t, p.next("attempts"), refusedByFullSandbox())
	p.talk()
	checkIO(t, p.next("io"), "blk")
	p.next("ready")
	p.checkOutside(cfg.lc)
	st, err := readStatus(fmt.Sprintf("/proc/%d/status", p.pid))
	if err != nil || !strings.HasPrefix(st["Uid"], "65534\t") || !strings.HasPrefix(st["Gid"], "65534\t") {
		t.Errorf("plugin Uid %q Gid %q (%v), want 65534", st["Uid"], st["Gid"], err)
	}
	if st["Groups"] != "" {
		t.Errorf("plugin keeps the root launcher's supplementary groups %q", st["Groups"])
	}
	p.finish()
}

// An unprivileged launcher (nobody) sandboxing a plugin.
func TestSandboxUnprivilegedLauncher(t *testing.T) {
	requireSandboxHost(t)
	requireRoot(t)
	cfg := probeConfig{kind: "blk", copyBinary: true, viaLauncher: true,
		launcherAs: &syscall.Credential{Uid: 65534, Gid: 65534}}
	p := startProbe(t, cfg)
	checkAttempts(t, p.next("attempts"), refusedByFullSandbox())
	p.talk()
	checkIO(t, p.next("io"), "blk")
	p.next("ready")
	p.checkOutside(cfg.lc)
	p.finish()
}

// The plugin dies with its launcher.
func TestSandboxParentDeathKillsPlugin(t *testing.T) {
	requireSandboxHost(t)
	p := startProbe(t, probeConfig{kind: "blk", viaLauncher: true})
	p.next("attempts")
	p.talk()
	p.next("io")
	p.next("ready")
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := readStatus(fmt.Sprintf("/proc/%d/status", p.pid))
		if err != nil || strings.HasPrefix(st["State"], "Z") {
			return // gone, or a zombie waiting for the reaper
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin %d still %s 20s after its launcher was killed", p.pid, st["State"])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Each layer alone stops what it is meant to stop; the expectations also
// show the test can see an action succeed.
func TestSandboxLayersAlone(t *testing.T) {
	requireSandboxHost(t)
	cases := []struct {
		name    string
		disable []Layer
		want    expect
		seccomp bool
	}{
		{"namespaces+root", []Layer{LayerLandlock, LayerSeccomp}, expect{
			"open_etc_passwd": {int(unix.ENOENT)},
			"create_file":     {int(unix.ENOENT)},
			"connect_unix":    {int(unix.ENOENT)},
			"tcp_socket":      {succeeds}, // a socket in an empty network namespace
			"tcp_connect":     {int(unix.ENETUNREACH), int(unix.ECONNREFUSED)},
			"execve":          {int(unix.ENOENT)},
			"fork":            {succeeds}, // without seccomp a process can be forked
			"ptrace_parent":   {int(unix.ESRCH)},
			"mount":           {int(unix.ENOENT), int(unix.EPERM)},
			"kill_parent":     {int(unix.ESRCH)},
			"raise_limit":     {int(unix.EPERM)},
			"io_uring_setup":  {dontCare},
			"mmap_exec":       {dontCare},
		}, false},
		{"landlock", []Layer{LayerNamespaces, LayerSeccomp}, expect{
			"open_etc_passwd": {int(unix.EACCES)},
			"create_file":     {int(unix.EACCES)},
			"connect_unix":    {succeeds}, // landlock ABI <= 7 does not cover connect by path
			"tcp_socket":      {succeeds},
			"tcp_connect":     {int(unix.EACCES)},
			"execve":          {int(unix.EACCES)},
			"fork":            {succeeds},
			"ptrace_parent":   {int(unix.EPERM)},
			"mount":           {int(unix.EPERM)},
			"kill_parent":     {int(unix.EPERM)},
			"raise_limit":     {int(unix.EPERM)},
			"io_uring_setup":  {dontCare},
			"mmap_exec":       {dontCare},
		}, false},
		{"seccomp", []Layer{LayerNamespaces, LayerLandlock}, refusedByFullSandbox(), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := probeConfig{kind: "blk", lc: LaunchConfig{Disable: c.disable}}
			p := startProbe(t, cfg)
			checkAttempts(t, p.next("attempts"), c.want)
			p.talk()
			checkIO(t, p.next("io"), "blk")
			p.next("ready")
			if c.seccomp {
				p.checkRefusalsLogged("socket", "execve", "clone", "kill")
			}
			if !strings.Contains(p.stderr.String(), "sandbox layer disabled at the user's request") ||
				!strings.Contains(p.stderr.String(), "plugin sandbox reduced at the user's request") {
				t.Errorf("reduced sandbox without a warning from launcher and plugin; log:\n%s", p.stderr.String())
			}
			p.checkNothingCreated()
			p.finish()
		})
	}
}

// Restrict refuses to run when the launcher's half is missing or false.
func TestRestrictFailsClosed(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		env     []string
		wantErr string
	}{
		{"no launcher", nil, "sandbox: launcher: KRUN_SANDBOX is not set"},
		{"launcher claims namespaces it did not make",
			[]string{launchEnv{Version: launchEnvVersion, Root: os.TempDir()}.encode()},
			"sandbox: namespaces: running in the initial user namespace"},
		{"garbled settings", []string{envName + "={"}, "sandbox: launcher: decode KRUN_SANDBOX"},
		{"unknown layer disabled", []string{envName + `={"v":1,"disabled":["rlimits"]}`}, "cannot be disabled"},
		{"wrong version", []string{envName + `={"v":9}`}, "version 9"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(self)
			cmd.Env = append(c.env, envHelper+"=probe", envKind+"=blk", envListen+"="+filepath.Join(dir, "l.sock"))
			out, _ := cmd.Output()
			var l probeLine
			json.Unmarshal(bytes.SplitN(out, []byte("\n"), 2)[0], &l)
			if l.Phase != "restrict-error" || !strings.Contains(l.Error, c.wantErr) {
				t.Errorf("got %q %q, want restrict-error containing %q", l.Phase, l.Error, c.wantErr)
			}
			if strings.Contains(l.Error, "\n") {
				t.Errorf("error is not one line: %q", l.Error)
			}
		})
	}
}

func TestApplyRejects(t *testing.T) {
	cases := []struct {
		name string
		lc   LaunchConfig
		sp   *syscall.SysProcAttr
		env  bool
		want string
	}{
		{"chroot", LaunchConfig{}, &syscall.SysProcAttr{Chroot: "/x"}, false, "Chroot"},
		{"credential", LaunchConfig{}, &syscall.SysProcAttr{Credential: &syscall.Credential{}}, false, "Credential"},
		{"own namespaces", LaunchConfig{}, &syscall.SysProcAttr{Unshareflags: unix.CLONE_NEWNS}, false, "namespace"},
		{"ambient caps", LaunchConfig{}, &syscall.SysProcAttr{AmbientCaps: []uintptr{1}}, false, "AmbientCaps"},
		{"root is /", LaunchConfig{RootDir: "/"}, nil, false, "other than /"},
		{"root missing", LaunchConfig{RootDir: "/nonexistent/krun"}, nil, false, "root directory"},
		{"relative root", LaunchConfig{RootDir: "tmp"}, nil, false, "absolute"},
		{"tiny nofile", LaunchConfig{Limits: Limits{OpenFiles: 3}}, nil, false, "open-files"},
		{"tiny data", LaunchConfig{Limits: Limits{DataBytes: 1 << 20}}, nil, false, "data limit"},
		{"rlimits not disableable", LaunchConfig{Disable: []Layer{LayerRlimits}}, nil, false, "cannot be disabled"},
		{"host env has KRUN_SANDBOX", LaunchConfig{}, nil, true, "environment has KRUN_SANDBOX"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.env {
				t.Setenv(envName, "{}")
			}
			cmd := exec.Command("/bin/true")
			cmd.SysProcAttr = c.sp
			err := c.lc.Apply(cmd)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Apply: %v, want error containing %q", err, c.want)
			}
		})
	}
}

func TestApplySettings(t *testing.T) {
	var logBuf bytes.Buffer
	lc := LaunchConfig{Disable: []Layer{LayerNamespaces}, Log: hclog.New(&hclog.LoggerOptions{Output: &logBuf})}
	cmd := exec.Command("/bin/true")
	cmd.Env = []string{"A=1", envName + "=stale", "GODEBUG=x=1"}
	if err := lc.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.SysProcAttr.Cloneflags != 0 || cmd.SysProcAttr.Pdeathsig != syscall.SIGKILL || !cmd.SysProcAttr.Setsid {
		t.Errorf("SysProcAttr %+v", cmd.SysProcAttr)
	}
	if len(cmd.Env) != 3 || cmd.Env[0] != "A=1" || cmd.Env[1] != "GODEBUG=x=1,"+plugGODEBUG ||
		!strings.HasPrefix(cmd.Env[2], envName+"={") {
		t.Errorf("env %q", cmd.Env)
	}
	e, err := decodeLaunchEnv(strings.TrimPrefix(cmd.Env[2], envName+"="))
	if err != nil {
		t.Fatal(err)
	}
	if len(e.Disabled) != 2 || e.Limits.OpenFiles != DefaultOpenFiles || e.Root != "" {
		t.Errorf("launch env %+v: want namespaces and root disabled, default limits", e)
	}
	if !strings.Contains(logBuf.String(), "reduced") {
		t.Errorf("no warning for a reduced sandbox: %q", logBuf.String())
	}

	cmd = exec.Command("/bin/true")
	if err := (LaunchConfig{RootDir: t.TempDir()}).Apply(cmd); err != nil {
		t.Fatal(err)
	}
	sp := cmd.SysProcAttr
	if sp.Cloneflags != namespaceFlags || len(sp.UidMappings) != 1 || sp.UidMappings[0].HostID != os.Geteuid() ||
		sp.GidMappingsEnableSetgroups != (os.Geteuid() == 0) || sp.Credential == nil || sp.Credential.Uid != 0 ||
		sp.Credential.NoSetGroups != (os.Geteuid() != 0) {
		t.Errorf("SysProcAttr %+v", sp)
	}
	if len(cmd.Env) != 2 {
		t.Errorf("nil cmd.Env must become the sandbox settings only, got %q", cmd.Env)
	}
}

func TestStatus(t *testing.T) {
	r := Status()
	if r.Kernel == "" || len(r.Layers) != len(Layers()) {
		t.Fatalf("report %+v", r)
	}
	for i, l := range r.Layers {
		if l.Layer != Layers()[i] || l.Detail == "" {
			t.Errorf("layer %d: %+v", i, l)
		}
	}
	if abi, err := landlockABI(); err == nil {
		if !strings.Contains(r.Layers[5].Detail, fmt.Sprintf("ABI %d", abi)) {
			t.Errorf("landlock detail %q lacks ABI %d", r.Layers[5].Detail, abi)
		}
	}
	kinds := map[string]KindStatus{}
	for _, k := range r.Kinds {
		kinds[k.Kind] = k
		for _, s := range k.Syscalls {
			if s.Reason == "" || s.Layer == "" {
				t.Errorf("%s: rule without reason or layer: %+v", k.Kind, s)
			}
		}
	}
	has := func(kind, sc string) bool {
		for _, s := range kinds[kind].Syscalls {
			if s.Syscall == sc {
				return true
			}
		}
		return false
	}
	for _, c := range []struct {
		kind, sc string
		want     bool
	}{
		{"blk", "pread64", true}, {"blk", "fallocate", true}, {"blk", "openat", false}, {"blk", "socket", false},
		{"net", "pread64", false}, {"net", "recvmsg", true},
		{"fs", "openat", true}, {"fs", "execve", false}, {"fs", "mknodat", true},
	} {
		if has(c.kind, c.sc) != c.want {
			t.Errorf("%s allows %s: %v, want %v", c.kind, c.sc, !c.want, c.want)
		}
	}
	if len(kinds["fs"].Landlock) <= len(kinds["blk"].Landlock) {
		t.Errorf("fs landlock rules %q should add the shared directory to blk's %q", kinds["fs"].Landlock, kinds["blk"].Landlock)
	}
}

// ApplyLimits confines a plugin that never calls Restrict, and Verify tells
// such a plugin from a restricted one.
func TestApplyLimitsAndVerifyUnrestricted(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	lc := LaunchConfig{Limits: Limits{OpenFiles: 100, DataBytes: 512 << 20}, Log: hclog.NewNullLogger()}
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=idle"}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := lc.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || !strings.Contains(line, "ready") {
		t.Fatalf("idle helper: %q %v", line, err)
	}
	if err := lc.ApplyLimits(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	lim, err := readLimits(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][2]uint64{"Max core file size": {0, 0}, "Max open files": {100, 100},
		"Max data size": {512 << 20, 512 << 20}, "Max locked memory": {0, 0}} {
		if lim[name] != want {
			t.Errorf("%s = %v, want %v", name, lim[name], want)
		}
	}
	err = lc.Verify(cmd.Process.Pid)
	if err == nil || !strings.Contains(err.Error(), "verify pid") {
		t.Errorf("Verify of an unrestricted plugin: %v, want an error", err)
	}
	if err := lc.Verify(1 << 30); err == nil {
		t.Error("Verify of a missing pid succeeded")
	}
}
