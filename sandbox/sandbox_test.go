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
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
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

type probeConfig struct {
	kind        string
	helper      string // probe (default) or hostile
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
	stderr    *syncbuf.Buffer
	dir       string
	diskPath  string
	vhost     int // the test's end of the vhost-user socketpair
	leakPath  string
	sharedDir string
	sockDir   string // the plugin's socket directory (PLUGIN_UNIX_SOCKET_DIR)
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
	p := &probe{t: t, cfg: cfg, lines: make(chan probeLine, 16), stderr: &syncbuf.Buffer{}}
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
		// The plugin runs as nobody under a root launcher: its share must
		// be writable by it, as a real share must be by the plugin's ids.
		if err := os.Chmod(p.sharedDir, 0o777); err != nil {
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

	// The socket directory, as go-plugin's client makes it: private to the
	// launcher. With the empty root the plugin gets a tmpfs of its own at
	// this path; without, Apply hands the directory to the plugin's ids.
	p.sockDir = filepath.Join(dir, "sock")
	if err := os.Mkdir(p.sockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	helper := cfg.helper
	if helper == "" {
		helper = "probe"
	}
	env := []string{
		envKind + "=" + cfg.kind,
		envParent + "=" + strconv.Itoa(os.Getpid()),
		envHostDir + "=" + dir,
		envSock + "=" + filepath.Join(dir, "host.sock"),
		envTCP + "=" + strconv.Itoa(port),
		envSelf + "=" + self,
		envSocketDir + "=" + p.sockDir,
	}
	if cfg.lc.Kind == "" && helper == "probe" {
		cfg.lc.Kind = cfg.kind
		p.cfg.lc.Kind = cfg.kind
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
		p.cmd.Env = append(env, envHelper+"=launch", envLaunch+"="+string(lcJSON), envNFiles+"="+strconv.Itoa(len(files)),
			envKind+"_HELPER="+helper)
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cfg.launcherAs}
	} else {
		p.cmd.Env = append(env, envHelper+"="+helper)
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
			l.Raw = append([]byte(nil), sc.Bytes()...)
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
	if err := unix.Connect(c, &unix.SockaddrUnix{Name: p.socketPath()}); err != nil {
		t.Fatalf("connect to the listener the plugin made before Restrict (%s): %v", p.socketPath(), err)
	}
	unix.Write(c, []byte("ping"))
	if n, err = unix.Read(c, buf); err != nil || string(buf[:n]) != "pong" {
		t.Fatalf("plugin listener: read %q, %v", buf[:n], err)
	}
	return string(got)
}

// socketPath is where the host reaches the probe's listener: in its own
// root when it has one, as HostSocketPath says for a launch made here.
func (p *probe) socketPath() string {
	inPlugin := filepath.Join(p.sockDir, probeSocket)
	if d, _ := normalizeDisabled(p.cfg.lc.Disable); slices.Contains(d, LayerRoot) {
		return inPlugin // the launcher's own directory (the plugin reached it through an fd)
	}
	if !p.cfg.viaLauncher {
		hp, err := HostSocketPath(p.cmd.Env, p.pid, inPlugin)
		if err != nil {
			p.t.Fatal(err)
		}
		return hp
	}
	return fmt.Sprintf("/proc/%d/root%s", p.pid, inPlugin)
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
	want := []string{"pwrite_pread", "fdatasync", "fallocate_punch_hole", "raw_write_zeroes", "fstat", "eventfd_epoll",
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
			if w == "pwrite_pread" || w == "fdatasync" || w == "fallocate_punch_hole" || w == "raw_write_zeroes" {
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
		checkSpeculation(t, task.Name(), st)
	}
	for _, ns := range NamespaceNames() {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", p.pid, ns))
		if err != nil || mine == theirs {
			t.Errorf("namespace %s: plugin %q, host %q, %v", ns, theirs, mine, err)
		}
	}
	// The plugin's root, seen from outside: empty but for the path to its
	// socket directory, a tmpfs of its own.
	top, _, _ := strings.Cut(strings.TrimPrefix(p.sockDir, "/"), "/")
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", p.pid)); err != nil || len(ents) != 1 || ents[0].Name() != top {
		t.Errorf("plugin root has %d entries (%v), want only %q", len(ents), err, top)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(fmt.Sprintf("/proc/%d/root%s", p.pid, p.sockDir), &sfs); err != nil || sfs.Type != unix.TMPFS_MAGIC {
		t.Errorf("the plugin's socket directory is not a tmpfs of its own (type %#x, %v)", sfs.Type, err)
	}
	if ents, _ := os.ReadDir(p.sockDir); len(ents) != 0 {
		t.Errorf("the plugin wrote %d entries into the launcher's socket directory", len(ents))
	}
	// Its ids: never host root.
	wantUID, wantGID, err := p.cfg.lc.PluginIDs()
	if p.cfg.launcherAs != nil {
		wantUID, wantGID, err = int(p.cfg.launcherAs.Uid), int(p.cfg.launcherAs.Gid), nil
	}
	st, serr := readStatus(fmt.Sprintf("/proc/%d/status", p.pid))
	if err != nil || serr != nil || !strings.HasPrefix(st["Uid"], strconv.Itoa(wantUID)+"\t") ||
		!strings.HasPrefix(st["Gid"], strconv.Itoa(wantGID)+"\t") || strings.HasPrefix(st["Uid"], "0\t") {
		t.Errorf("plugin Uid %q Gid %q (%v %v), want %d and %d", st["Uid"], st["Gid"], err, serr, wantUID, wantGID)
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
		case target == "anon_inode:seccomp notify":
			t.Errorf("fd %d: the plugin holds a seccomp listener", fd)
		case target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]":
			anon[target]++
		default:
			t.Errorf("unexpected fd %d in the plugin: %q", fd, target)
		}
		if strings.HasSuffix(target, "/leaked") {
			t.Errorf("fd %d: the launcher's inherited fd leaked into the plugin", fd)
		}
	}
	for k, n := range anon {
		if n > 1 {
			t.Errorf("plugin holds %d fds of %s", n, k)
		}
	}
}

// checkRefusalsLogged checks the launcher's log names the refused calls:
// the launcher holds the plugin's seccomp listener and logs each refusal.
func (p *probe) checkRefusalsLogged(syscalls ...string) {
	p.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, s := range syscalls {
		for !strings.Contains(p.stderr.String(), "seccomp refused a system call: plugin="+p.cfg.lc.Kind+" syscall="+s+" ") &&
			!strings.Contains(p.stderr.String(), "seccomp refused a system call: plugin="+p.logName()+" syscall="+s+" ") {
			if time.Now().After(deadline) {
				p.t.Errorf("launcher log has no seccomp refusal of %s", s)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// logName is how the launcher names a plugin without a kind: its binary.
func (p *probe) logName() string {
	self, _ := os.Executable()
	if p.cfg.copyBinary {
		return "plugin.test"
	}
	return filepath.Base(self)
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
	p.checkOutside(p.cfg.lc)
	p.checkRefusalsLogged("socket", "execve", "clone", "ptrace", "mount", "kill", "prlimit64", "io_uring_setup", "mmap",
		"keyctl", "userfaultfd", "seccomp")
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
	want := refusedByFullSandbox().with("open_etc_passwd", unix.ENOENT, "create_file", []int{int(unix.ENOENT), int(unix.EROFS)})
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

// A root launcher runs its plugins as nobody by default (checkOutside
// checks the ids), and as the ids it is told otherwise.
func TestSandboxHostIDs(t *testing.T) {
	requireSandboxHost(t)
	requireRoot(t)
	for _, c := range []struct {
		name     string
		lc       LaunchConfig
		uid, gid int
	}{
		{"default", LaunchConfig{}, DefaultPluginUID, DefaultPluginGID},
		{"chosen", LaunchConfig{HostUID: 4242, HostGID: 4343}, 4242, 4343},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := probeConfig{kind: "blk", copyBinary: true, lc: c.lc}
			p := startProbe(t, cfg)
			checkAttempts(t, p.next("attempts"), refusedByFullSandbox())
			p.talk()
			checkIO(t, p.next("io"), "blk")
			p.next("ready")
			p.checkOutside(p.cfg.lc)
			st, err := readStatus(fmt.Sprintf("/proc/%d/status", p.pid))
			uid, gid := strconv.Itoa(c.uid), strconv.Itoa(c.gid)
			if err != nil || st["Uid"] != strings.Repeat(uid+"\t", 3)+uid || st["Gid"] != strings.Repeat(gid+"\t", 3)+gid {
				t.Errorf("plugin Uid %q Gid %q (%v), want %s and %s everywhere", st["Uid"], st["Gid"], err, uid, gid)
			}
			if st["Groups"] != "" {
				t.Errorf("plugin keeps the root launcher's supplementary groups %q", st["Groups"])
			}
			p.finish()
		})
	}
}

// The trampoline as a binary of its own (cmd/krun-sandbox-exec) instead of
// the launcher's executable: the same sandbox, and its fd does not reach the
// plugin (checkOutside lists every fd).
func TestSandboxTrampolineBinary(t *testing.T) {
	requireSandboxHost(t)
	if testing.Short() {
		t.Skip("builds cmd/krun-sandbox-exec; skipped with -short")
	}
	bin := filepath.Join(t.TempDir(), TrampolineName)
	build := exec.Command("go", "build", "-o", bin, "../cmd/krun-sandbox-exec")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin).CombinedOutput(); err == nil || !strings.Contains(string(out), "only krun-core starts it") {
		t.Errorf("krun-sandbox-exec run by hand: %v %q", err, out)
	}
	cfg := probeConfig{kind: "blk", lc: LaunchConfig{Trampoline: bin}}
	p := startProbe(t, cfg)
	if !strings.HasPrefix(p.cmd.Path, "/proc/self/fd/") {
		t.Errorf("command %q: want the trampoline binary through its fd", p.cmd.Path)
	}
	checkAttempts(t, p.next("attempts"), refusedByFullSandbox())
	p.talk()
	checkIO(t, p.next("io"), "blk")
	p.next("ready")
	p.checkOutside(p.cfg.lc)
	p.checkRefusalsLogged("socket", "execve", "clone")
	p.finish()

	// The same binary holds the user namespace of an ID-mapped share.
	if os.Geteuid() == 0 {
		d, err := os.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		m, err := LaunchConfig{Trampoline: bin}.IDMapShare(d)
		if err != nil {
			t.Errorf("IDMapShare with krun-sandbox-exec holding the user namespace: %v", err)
		} else {
			var st unix.Stat_t
			if err := unix.Fstat(int(m.Fd()), &st); err != nil || st.Uid != DefaultPluginUID {
				t.Errorf("ID-mapped share's root: owner %d (%v), want %d", st.Uid, err, DefaultPluginUID)
			}
			m.Close()
		}
	}

	if err := (LaunchConfig{Trampoline: filepath.Join(t.TempDir(), "missing")}).Apply(exec.Command(staticExe(t))); err == nil ||
		!strings.Contains(err.Error(), "sandbox: trampoline") {
		t.Errorf("Apply with a missing trampoline: %v", err)
	}
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
	p.checkOutside(p.cfg.lc)
	p.checkRefusalsLogged("socket", "execve", "clone", "kill")
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
			// The path to the socket directory is in the empty root, read-only.
			"create_file":          {int(unix.ENOENT), int(unix.EROFS)},
			"connect_unix":         {int(unix.ENOENT)},
			"tcp_socket":           {succeeds}, // a socket in an empty network namespace
			"tcp_connect":          {int(unix.ENETUNREACH), int(unix.ECONNREFUSED)},
			"execve":               {int(unix.ENOENT)},
			"fork":                 {succeeds}, // without seccomp a process can be forked
			"ptrace_parent":        {int(unix.ESRCH)},
			"mount":                {int(unix.ENOENT), int(unix.EPERM)},
			"kill_parent":          {int(unix.ESRCH)},
			"raise_limit":          {int(unix.EPERM)},
			"io_uring_setup":       {dontCare},
			"mmap_exec":            {dontCare},
			"keyctl":               {dontCare},
			"userfaultfd":          {dontCare},
			"netlink_socket":       {succeeds}, // in its own network namespace
			"seccomp_new_listener": {succeeds}, // harmless without the seccomp layer: see installListeningFilter
		}, false},
		{"landlock", []Layer{LayerNamespaces, LayerSeccomp}, expect{
			"open_etc_passwd": {int(unix.EACCES)},
			"create_file":     {int(unix.EACCES)},
			// Landlock ABI <= 7 does not cover connect by path; the
			// socket's owner (root) lets only itself write to it, and the
			// plugin runs as nobody.
			"connect_unix":         {succeeds, int(unix.EACCES)},
			"tcp_socket":           {succeeds},
			"tcp_connect":          {int(unix.EACCES)},
			"execve":               {int(unix.EACCES)},
			"fork":                 {succeeds},
			"ptrace_parent":        {int(unix.EPERM)},
			"mount":                {int(unix.EPERM)},
			"kill_parent":          {int(unix.EPERM)},
			"raise_limit":          {int(unix.EPERM)},
			"io_uring_setup":       {dontCare},
			"mmap_exec":            {dontCare},
			"keyctl":               {dontCare},
			"userfaultfd":          {dontCare},
			"netlink_socket":       {succeeds},
			"seccomp_new_listener": {succeeds},
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
				p.checkRefusalsLogged("socket", "execve", "clone", "kill", "keyctl")
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
	valid := func(disabled ...Layer) string {
		return launchEnv{Version: launchEnvVersion, Root: os.TempDir(), Disabled: disabled, Syscalls: ProfileBlock,
			ExecFD: 8, ChanFD: 9}.encode()
	}
	cases := []struct {
		name    string
		env     []string
		wantErr string
	}{
		{"no launcher", nil, "sandbox: launcher: KRUN_SANDBOX is not set"},
		{"launcher claims namespaces it did not make", []string{valid()},
			"sandbox: namespaces: pid"},
		{"launcher claims a filter it did not install", []string{valid(LayerNamespaces, LayerLandlock)},
			"sandbox: seccomp: the launcher's filter is not in place"},
		{"garbled settings", []string{envName + "={"}, "sandbox: launcher: decode KRUN_SANDBOX"},
		{"unknown layer disabled", []string{envName + `={"v":2,"disabled":["rlimits"]}`}, "cannot be disabled"},
		{"wrong version", []string{envName + `={"v":1}`}, "version 1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(self)
			cmd.Env = append(c.env, envHelper+"=probe", envKind+"=blk", envSocketDir+"="+dir)
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

// The trampoline fails closed too: a layer it cannot apply stops the
// launch with one line naming it, before the plugin runs.
func TestTrampolineFailsClosed(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		lc   LaunchConfig
		env  []string
		want string
	}{
		// A root directory the plugin's ids cannot reach.
		{"unreachable root", LaunchConfig{RootDir: t.TempDir() + "/0700"}, nil, "sandbox: root: mount empty tmpfs"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if os.Geteuid() != 0 {
				t.Skip("needs root: the plugin must run as another user than the directory's owner")
			}
			if err := os.Mkdir(c.lc.RootDir, 0o700); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(self)
			cmd.Env = append(c.env, envHelper+"=execed")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			c.lc.Log = hclog.NewNullLogger()
			if err := c.lc.Apply(cmd); err != nil {
				t.Fatal(err)
			}
			out, err := cmd.Output()
			if err == nil || len(out) != 0 || !strings.Contains(stderr.String(), c.want) {
				t.Errorf("exit %v, stdout %q, stderr %q; want a failure before the plugin ran, saying %q", err, out, stderr.String(), c.want)
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
		{"negative uid", LaunchConfig{HostUID: -1}, nil, false, "out of range"},
		{"unknown profile", LaunchConfig{Syscalls: "everything"}, nil, false, "unknown syscall profile"},
		{"forbidden extra", LaunchConfig{ExtraSyscalls: []Syscall{{Name: "execve", Reason: "r"}}}, nil, false, "never granted"},
		{"extra without reason", LaunchConfig{ExtraSyscalls: []Syscall{{Name: "sysinfo"}}}, nil, false, "reason"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.env {
				t.Setenv(envName, "{}")
			}
			cmd := exec.Command(staticExe(t))
			cmd.SysProcAttr = c.sp
			c.lc.Log = hclog.NewNullLogger()
			err := c.lc.Apply(cmd)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Apply: %v, want error containing %q", err, c.want)
			}
		})
	}
	cmd := exec.Command(filepath.Join(t.TempDir(), "no-such-plugin"))
	if err := (LaunchConfig{Log: hclog.NewNullLogger()}).Apply(cmd); err == nil || !strings.Contains(err.Error(), "plugin binary") {
		t.Errorf("Apply of a missing binary: %v", err)
	}
	if os.Geteuid() != 0 {
		err := (LaunchConfig{HostUID: os.Geteuid() + 1}).Apply(exec.Command(staticExe(t)))
		if err == nil || !strings.Contains(err.Error(), "only run plugins as its own ids") {
			t.Errorf("unprivileged launcher choosing other ids: %v", err)
		}
	}
}

func TestApplySettings(t *testing.T) {
	var logBuf bytes.Buffer
	lc := LaunchConfig{Kind: "blk-raw", Disable: []Layer{LayerNamespaces}, Log: hclog.New(&hclog.LoggerOptions{Output: &logBuf})}
	dir := t.TempDir()
	cmd := exec.Command(staticExe(t), "-x")
	sockDir := filepath.Join(t.TempDir(), "plugin-dir1")
	if err := os.Mkdir(sockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd.Env = []string{"A=1", envName + "=stale", "GODEBUG=x=1", envSocketDir + "=" + sockDir}
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	f, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.ExtraFiles = []*os.File{f, d}
	if err := lc.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if cmd.SysProcAttr.Cloneflags != 0 || cmd.SysProcAttr.Pdeathsig != syscall.SIGKILL || !cmd.SysProcAttr.Setsid {
		t.Errorf("SysProcAttr %+v", cmd.SysProcAttr)
	}
	if c := cmd.SysProcAttr.Credential; os.Geteuid() == 0 && (c == nil || c.Uid != DefaultPluginUID || c.Gid != DefaultPluginGID) {
		t.Errorf("a root launcher without namespaces must still drop to the plugin ids: %+v", c)
	}
	if cmd.Path != "/proc/self/exe" || strings.Join(cmd.Args, " ") != TrampolineName+" "+staticExe(t)+" -x" {
		t.Errorf("command %s %q, want the trampoline", cmd.Path, cmd.Args)
	}
	if len(cmd.ExtraFiles) != 5 || cmd.ExtraFiles[0] != f || cmd.ExtraFiles[1] != d {
		t.Errorf("extra files %v", cmd.ExtraFiles)
	}
	// Without the empty root the plugin reaches the socket directory
	// through its fd 5.
	if len(cmd.Env) != 4 || cmd.Env[0] != "A=1" || cmd.Env[1] != envSocketDir+"=/proc/self/fd/5" ||
		cmd.Env[2] != "GODEBUG=x=1,"+plugGODEBUG || !strings.HasPrefix(cmd.Env[3], envName+"={") {
		t.Errorf("env %q", cmd.Env)
	}
	e, err := decodeLaunchEnv(strings.TrimPrefix(cmd.Env[3], envName+"="))
	if err != nil {
		t.Fatal(err)
	}
	if len(e.Disabled) != 2 || e.Limits.OpenFiles != DefaultOpenFiles || e.Root != "" || e.Syscalls != ProfileBlock ||
		e.Kind != "blk-raw" || e.SocketFD != 5 || e.SocketDir != sockDir || e.ExecFD != 6 || e.ChanFD != 7 ||
		!slices.Equal(e.DirFDs, []int{4}) {
		t.Errorf("launch env %+v: want namespaces and root disabled, default limits, the block profile, fds 5, 6 and 7, dir fd 4", e)
	}
	if hp, err := HostSocketPath(cmd.Env, 77, "/proc/self/fd/5/plugin9"); err != nil || hp != sockDir+"/plugin9" {
		t.Errorf("HostSocketPath without the empty root: %q %v, want the launcher's directory", hp, err)
	}
	if st, err := os.Stat(sockDir); os.Geteuid() == 0 && (err != nil || st.Sys().(*syscall.Stat_t).Uid != DefaultPluginUID) {
		t.Errorf("the socket directory was not handed to the plugin's ids: %v", err)
	}
	if !strings.Contains(logBuf.String(), "reduced") {
		t.Errorf("no warning for a reduced sandbox: %q", logBuf.String())
	}
	if os.Geteuid() == 0 && !strings.Contains(logBuf.String(), "the plugin's ids cannot write to a directory handed to it") {
		t.Errorf("no warning for a directory (root's, mode 0700) the plugin (nobody) cannot write: %q", logBuf.String())
	}

	cmd = exec.Command(staticExe(t))
	cmd.Env = []string{envSocketDir + "=/tmp/x/plugin-dir1"}
	if err := (LaunchConfig{Kind: "fs-virtio", RootDir: t.TempDir(), Log: hclog.NewNullLogger()}).Apply(cmd); err != nil {
		t.Fatal(err)
	}
	sp := cmd.SysProcAttr
	uid, gid, _ := LaunchConfig{}.PluginIDs()
	if sp.Cloneflags != namespaceFlags || len(sp.UidMappings) != 1 || sp.UidMappings[0].HostID != uid ||
		sp.GidMappings[0].HostID != gid || sp.GidMappingsEnableSetgroups != (os.Geteuid() == 0) ||
		sp.Credential == nil || sp.Credential.Uid != 0 || sp.Credential.NoSetGroups != (os.Geteuid() != 0) {
		t.Errorf("SysProcAttr %+v", sp)
	}
	if uid == 0 || gid == 0 {
		t.Errorf("plugin ids %d:%d: never root", uid, gid)
	}
	if len(cmd.Env) != 3 {
		t.Errorf("env %q, want the socket directory and the sandbox settings only", cmd.Env)
	}
	e, err = decodeLaunchEnv(strings.TrimPrefix(cmd.Env[2], envName+"="))
	if err != nil || e.Syscalls != ProfileFS || e.Limits.OpenFiles != FSOpenFiles || e.SocketDir != "/tmp/x/plugin-dir1" {
		t.Errorf("launch env %+v %v", e, err)
	}
	for _, c := range []struct {
		addr string
		want string
	}{
		{"/tmp/x/plugin-dir1/plugin42", "/proc/77/root/tmp/x/plugin-dir1/plugin42"},
		{"/tmp/x/plugin-dir1/../../../var/run/docker.sock", ""},
		{"/tmp/x/plugin-dir1/a/b", ""},
		{"/tmp/x/plugin-dir1", ""},
		{"relative", ""},
	} {
		got, err := HostSocketPath(cmd.Env, 77, c.addr)
		if got != c.want || (err == nil) != (c.want != "") {
			t.Errorf("HostSocketPath(%q) = %q, %v; want %q", c.addr, got, err, c.want)
		}
	}
}

func TestPluginIDs(t *testing.T) {
	uid, gid, err := LaunchConfig{}.PluginIDs()
	switch {
	case err != nil:
		t.Fatal(err)
	case os.Geteuid() == 0 && (uid != DefaultPluginUID || gid != DefaultPluginGID):
		t.Errorf("root launcher default %d:%d, want nobody:nogroup", uid, gid)
	case os.Geteuid() != 0 && (uid != os.Geteuid() || gid != os.Getegid()):
		t.Errorf("unprivileged launcher default %d:%d, want its own ids", uid, gid)
	}
	if os.Geteuid() == 0 {
		if uid, gid, err := (LaunchConfig{HostUID: 1000, HostGID: 1001}).PluginIDs(); err != nil || uid != 1000 || gid != 1001 {
			t.Errorf("chosen ids: %d:%d %v", uid, gid, err)
		}
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
		{"console", "recvmsg", true}, {"console", "pread64", false}, {"console", "shutdown", false},
		{"img", "pread64", true}, {"img", "openat", false},
	} {
		if has(c.kind, c.sc) != c.want {
			t.Errorf("%s allows %s: %v, want %v", c.kind, c.sc, !c.want, c.want)
		}
	}
	if uid, gid, _ := (LaunchConfig{}).PluginIDs(); r.PluginUID != uid || r.PluginGID != gid || r.PluginIDs == "" {
		t.Errorf("status plugin ids %d:%d %q, want %d:%d", r.PluginUID, r.PluginGID, r.PluginIDs, uid, gid)
	}
	if r.Shares == "" || !strings.Contains(r.Core, "no_new_privs") {
		t.Errorf("status shares %q, core %q", r.Shares, r.Core)
	}
	if os.Geteuid() == 0 && (!strings.Contains(r.Shares, "ID-mapped mount") || !strings.Contains(r.Core, "CAP_KILL,CAP_SETUID,CAP_SETGID")) {
		t.Errorf("root's status: shares %q, core %q", r.Shares, r.Core)
	}
	launch := map[string]Rule{}
	for _, l := range r.Launch {
		launch[l.Syscall] = l
		if l.Reason == "" {
			t.Errorf("launch rule without reason: %+v", l)
		}
	}
	if launch["execveat"].Args == "" || launch["socket"].Args == "" || launch["seccomp"].Args == "" || launch["bind"].Syscall == "" {
		t.Errorf("launch rules %+v", r.Launch)
	}
	for _, sc := range []string{"fchmodat2", "umask"} {
		if !has("fs", sc) || has("blk", sc) {
			t.Errorf("%s: fs %v blk %v, want only fs", sc, has("fs", sc), has("blk", sc))
		}
	}
	if len(kinds["fs"].Landlock) <= len(kinds["blk"].Landlock) {
		t.Errorf("fs landlock rules %q should add the shared directory to blk's %q", kinds["fs"].Landlock, kinds["blk"].Landlock)
	}
}

// A plugin that never calls Restrict is confined anyway, by the
// trampoline, from its first instruction; Verify tells it from a process
// started without the sandbox.
func TestUnrestrictedPluginIsConfined(t *testing.T) {
	requireSandboxHost(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	lc := LaunchConfig{Limits: Limits{OpenFiles: 100, DataBytes: 512 << 20, FileBytes: 64 << 20}, Log: hclog.NewNullLogger()}
	start := func(apply bool) (*exec.Cmd, func()) {
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
		if apply {
			if err := lc.Apply(cmd); err != nil {
				t.Fatal(err)
			}
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || !strings.Contains(line, "ready") {
			t.Fatalf("idle helper: %q %v", line, err)
		}
		return cmd, func() { stdin.Close(); cmd.Wait() }
	}
	cmd, stop := start(true)
	defer stop()
	lim, err := readLimits(cmd.Process.Pid) // the trampoline's
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][2]uint64{"Max core file size": {0, 0}, "Max open files": {100, 100},
		"Max data size": {512 << 20, 512 << 20}, "Max locked memory": {0, 0}, "Max file size": {64 << 20, 64 << 20}} {
		if lim[name] != want {
			t.Errorf("%s = %v, want %v", name, lim[name], want)
		}
	}
	if err := lc.Verify(cmd.Process.Pid); err != nil {
		t.Errorf("Verify of a plugin that never called Restrict: %v; the trampoline confines it", err)
	}
	tighter := lc
	tighter.Limits.FileBytes = 1 << 20
	if err := tighter.Verify(cmd.Process.Pid); err == nil || !strings.Contains(err.Error(), "Max file size") {
		t.Errorf("Verify of a plugin whose file size limit is above the launcher's: %v, want an error", err)
	}
	plain, stopPlain := start(false)
	defer stopPlain()
	err = lc.Verify(plain.Process.Pid)
	if err == nil || !strings.Contains(err.Error(), "verify pid") {
		t.Errorf("Verify of a process started without the sandbox: %v, want an error", err)
	}
	if err := lc.Verify(1 << 30); err == nil {
		t.Error("Verify of a missing pid succeeded")
	}
}

// The hostile plugin of issue #21: it looks for a seccomp listener among its
// fds and finds none; the listener ioctls, a listener of its own and the
// calls a held listener let through are all refused, and the launcher logs
// the refusals. Once in the full sandbox (no /proc: it tries every fd
// number), once with seccomp alone (it can list /proc/self/fd).
func TestHostilePluginFindsNoListener(t *testing.T) {
	requireSandboxHost(t)
	if !notifyAvailable() {
		t.Skip("no SECCOMP_RET_USER_NOTIF on this kernel: there is no listener to hide")
	}
	for _, c := range []struct {
		name    string
		disable []Layer
		proc    bool // /proc/self/fd is readable
	}{
		{"full sandbox", nil, false},
		{"seccomp alone", []Layer{LayerNamespaces, LayerLandlock}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := probeConfig{kind: "blk", helper: "hostile", lc: LaunchConfig{Disable: c.disable}}
			if c.proc {
				// The fs profile (getdents64), so that it can list
				// /proc/self/fd: a third-party kind's own (io) has no
				// directory calls.
				cfg.lc.Syscalls = ProfileFS
			}
			p := startProbe(t, cfg)
			l := p.next("hostile")
			var rep hostileLine
			if err := json.Unmarshal(l.Raw, &rep); err != nil {
				t.Fatal(err)
			}
			if c.proc != (rep.ProcFD == "") {
				t.Errorf("listing /proc/self/fd: %q (want it readable: %v)", rep.ProcFD, c.proc)
			}
			if len(rep.ProcListeners) != 0 {
				t.Errorf("the plugin found seccomp listeners at fds %v", rep.ProcListeners)
			}
			if len(rep.OpenFDs) < 5 {
				t.Errorf("open fds %v: the scan saw too little", rep.OpenFDs)
			}
			if len(rep.Ioctls) != 3*len(rep.OpenFDs) {
				t.Errorf("%d listener ioctls tried on %d fds", len(rep.Ioctls), len(rep.OpenFDs))
			}
			for _, a := range rep.Ioctls {
				if a.Errno != int(unix.EPERM) {
					t.Errorf("ioctl %s on fd %s: errno %d (%s), want EPERM from the filter", a.Action, a.Thread, a.Errno, a.Err)
				}
			}
			refused := []string{"keyctl", "userfaultfd", "fork", "tcp_socket", "netlink_socket", "io_uring_setup",
				"seccomp_new_listener", "execve", "ptrace_parent", "mount", "connect_unix"}
			for _, a := range rep.Attempts {
				switch {
				case a.Errno == 0 && c.disable == nil:
					t.Errorf("the hostile plugin's %s succeeded", a.Action)
				case slices.Contains(refused, a.Action) && a.Errno != int(unix.EPERM):
					t.Errorf("%s: errno %d (%s), want EPERM from the filter", a.Action, a.Errno, a.Err)
				}
			}
			p.next("ready")
			// From outside: no listener among its fds.
			fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range fds {
				if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p.pid, e.Name())); target == "anon_inode:seccomp notify" {
					t.Errorf("fd %s of the plugin is a seccomp listener", e.Name())
				}
			}
			if err := (LaunchConfig{Disable: c.disable}).Verify(p.pid); err != nil {
				t.Errorf("Verify: %v", err)
			}
			p.checkRefusalsLogged("keyctl", "userfaultfd", "clone", "socket", "io_uring_setup", "ioctl", "seccomp")
			p.finish()
		})
	}
}

// checkSpeculation checks a sandboxed thread's speculation controls: the
// filters' SPEC_ALLOW leaves Speculative Store Bypass to the host's policy
// (never force-mitigated because of seccomp), and the trampoline asks for
// indirect-branch isolation wherever the kernel can give it per task (the
// host's own value, read from this process, is "conditional enabled").
func checkSpeculation(t *testing.T, thread string, st map[string]string) {
	t.Helper()
	self, err := readStatus("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	if ssb := st["Speculation_Store_Bypass"]; ssb == "thread force mitigated" {
		t.Errorf("thread %s: Speculation_Store_Bypass %q: the filter was installed without SPEC_ALLOW", thread, ssb)
	}
	wantIB := self["SpeculationIndirectBranch"]
	if wantIB == "conditional enabled" {
		wantIB = "conditional force disabled"
	}
	if ib := st["SpeculationIndirectBranch"]; ib != wantIB {
		t.Errorf("thread %s: SpeculationIndirectBranch %q, want %q (host: %q)", thread, ib, wantIB, self["SpeculationIndirectBranch"])
	}
}

// staticExe is a static executable to hand Apply: this test binary (the
// sandbox launches it as a plugin, so it is one). Apply refuses a
// dynamically linked one such as /bin/true.
func staticExe(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return self
}

// TestApplyRefusesInterpretedPlugin: a script or a dynamically linked
// plugin cannot run in the empty root (no interpreter, no libraries):
// Apply says so instead of the trampoline's "no such file or directory"
// (from review).
func TestApplyRefusesInterpretedPlugin(t *testing.T) {
	script := filepath.Join(t.TempDir(), "krun-plugin-x")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{script, "is a script"},
		{"/bin/true", "is dynamically linked"},
	} {
		err := (LaunchConfig{RootDir: t.TempDir(), Log: hclog.NewNullLogger()}).Apply(exec.Command(tc.path))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "static executable") {
			t.Errorf("Apply(%s): %v, want %q", tc.path, err, tc.want)
		}
	}
	if err := (LaunchConfig{RootDir: t.TempDir(), Log: hclog.NewNullLogger(), Disable: []Layer{LayerRoot}}).Apply(exec.Command(script)); err != nil &&
		strings.Contains(err.Error(), "is a script") {
		t.Errorf("without the empty root a script is not refused for it: %v", err)
	}
}
