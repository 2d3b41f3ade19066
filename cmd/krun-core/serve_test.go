package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/testguest"
)

func TestServeArgErrors(t *testing.T) {
	dir := t.TempDir()
	// Find only needs an executable file; these tests fail before it runs.
	for _, k := range []string{"blk-raw", "blk-qcow2", "fs-virtio"} {
		if err := os.WriteFile(filepath.Join(dir, "krun-plugin-"+k), []byte("#!/bin/false\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	notSock := filepath.Join(dir, "regular")
	os.WriteFile(notSock, nil, 0o600)
	busy := filepath.Join(dir, "busy.sock")
	l, err := net.Listen("unix", busy)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	sock := filepath.Join(dir, "s.sock")
	pd := "--plugin-dir=" + dir

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no socket", []string{pd, "--disk", "path=" + img + ",format=raw"}, "--socket PATH is required"},
		{"no device", []string{pd, "--socket", sock}, "give exactly one of --disk, --fs, --net or --plugin (got 0)"},
		{"two devices", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=raw", "--fs", "path=/,tag=t"}, "(got 2)"},
		{"no format", []string{pd, "--socket", sock, "--disk", "path=" + img}, "--disk: format= is required"},
		{"unknown format", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=vmdk"}, `--disk: unknown format "vmdk" (want raw or qcow2)`},
		{"bad option", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=raw,cache=none"}, `--disk: unknown key "cache"`},
		{"bad value", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=raw,readonly=perhaps"}, `readonly="perhaps": want on or off`},
		{"missing file", []string{pd, "--socket", sock, "--disk", "path=" + dir + "/nope.img,format=raw"}, "disk image: open " + dir + "/nope.img: no such file or directory"},
		{"missing backing", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=qcow2,backing=/nope,backing-format=raw"}, "backing file: open /nope: no such file or directory"},
		{"fs on a file", []string{pd, "--socket", sock, "--fs", "path=" + img + ",tag=t"}, "is not a directory"},
		{"missing plugin", []string{"--plugin-dir", dir, "--socket", sock, "--plugin", "nothere"}, "krun-plugin-nothere not found in " + dir},
		{"bad sandbox", []string{pd, "--socket", sock, "--sandbox=maybe", "--disk", "path=" + img + ",format=raw"}, `--sandbox="maybe": want on or off`},
		{"bad layer", []string{pd, "--socket", sock, "--sandbox-disable=rlimits", "--disk", "path=" + img + ",format=raw"}, `--sandbox-disable: sandbox layer "rlimits" cannot be disabled`},
		{"bad log level", []string{pd, "--socket", sock, "--log-level=loud", "--disk", "path=" + img + ",format=raw"}, `--log-level="loud"`},
		{"root plugin", []string{pd, "--socket", sock, "--plugin-uid=0", "--disk", "path=" + img + ",format=raw"}, "--plugin-uid: 0: plugins never run as host root"},
		{"bad socket mode", []string{pd, "--socket", sock, "--socket-mode=999", "--disk", "path=" + img + ",format=raw"}, "--socket-mode"},
		{"bad plugin gid", []string{pd, "--socket", sock, "--plugin-gid=staff", "--disk", "path=" + img + ",format=raw"}, `--plugin-gid: "staff" is not a host id`},
		{"extra argument", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=raw", "extra"}, `unexpected argument "extra"`},
		{"unknown flag", []string{pd, "--socket", sock, "--cdrom", "x"}, "unknown flag --cdrom (see krun-core serve --help)"},
		{"flag without value", []string{pd, "--disk", "path=" + img + ",format=raw", "--socket"}, "a value is needed for --socket"},
		{"socket in a missing directory", []string{pd, "--socket", filepath.Join(dir, "nodir", "s.sock"), "--disk", "path=" + img + ",format=raw"}, "directory " + filepath.Join(dir, "nodir") + " does not exist"},
		{"socket under a file", []string{pd, "--socket", filepath.Join(img, "s.sock"), "--disk", "path=" + img + ",format=raw"}, img + " is not a directory"},
		{"missing plugin dir", []string{"--plugin-dir", filepath.Join(dir, "nope"), "--socket", sock, "--disk", "path=" + img + ",format=raw"}, "--plugin-dir " + filepath.Join(dir, "nope") + ": no such directory"},
		{"bad log format", []string{pd, "--socket", sock, "--log-format=xml", "--disk", "path=" + img + ",format=raw"}, `--log-format="xml": want text or json`},
		{"socket is a file", []string{pd, "--socket", notSock, "--disk", "path=" + img + ",format=raw"}, "exists and is not a socket"},
		{"socket in use", []string{pd, "--socket", busy, "--disk", "path=" + img + ",format=raw"}, "is in use by another process"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := serveCommand(tc.args, &stdout, &stderr)
			if code != 1 {
				t.Fatalf("exit %d, want 1; stderr %q", code, stderr.String())
			}
			lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "krun-core serve: ") || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("stderr %q, want one line containing %q", stderr.String(), tc.want)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("%s exists after a failed serve", sock)
			}
		})
	}
}

func TestServeHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := serveCommand([]string{"--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "usage: krun-core serve --socket PATH") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}

// buildServeBinaries builds krun-core and the example null plugin next to
// it, so that serve finds the plugin the way an installation does.
func buildServeBinaries(t *testing.T, plugins ...string) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds binaries; skipped with -short")
	}
	dir := t.TempDir()
	pkgs := map[string]string{".": "krun-core", "../../examples/plugin-null": "krun-plugin-null"}
	for _, p := range plugins {
		pkgs["../../plugins/"+p] = "krun-plugin-" + p
	}
	for pkg, out := range pkgs {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, out), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	return dir
}

// serveProc is a running `krun-core serve`.
type serveProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr []string
	done   chan error
}

func (s *serveProc) log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.stderr, "\n")
}

func startServe(t *testing.T, bin string, args ...string) *serveProc {
	t.Helper()
	s := &serveProc{cmd: exec.Command(filepath.Join(bin, "krun-core"), append([]string{"serve", "--log-level", "info"}, args...)...), done: make(chan error, 1)}
	s.cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
	pr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			s.mu.Lock()
			s.stderr = append(s.stderr, sc.Text())
			s.mu.Unlock()
		}
		s.done <- s.cmd.Wait()
	}()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("serve stderr:\n%s", s.log())
		}
	})
	return s
}

func (s *serveProc) waitExit(t *testing.T) int {
	t.Helper()
	select {
	case err := <-s.done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(20 * time.Second):
		t.Fatal("krun-core serve did not exit")
		return -1
	}
}

// waitSocket waits for serve to listen on path.
func waitSocket(t *testing.T, s *serveProc, path string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			return
		}
		select {
		case err := <-s.done:
			t.Fatalf("serve exited early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("serve did not create its socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readEntropy fetches n bytes from an entropy device at path.
func readEntropy(t *testing.T, path string, n uint32) []byte {
	t.Helper()
	g, err := testguest.Dial(path, testguest.Options{QueueSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	addr, err := g.Mem.Alloc(uint64(n), 16)
	if err != nil {
		t.Fatal(err)
	}
	buf, _ := g.Mem.Bytes(addr, uint64(n))
	for i := range buf {
		buf[i] = 0xAA
	}
	r := g.Rings[0]
	if _, err := r.Post([]testguest.Segment{{Addr: addr, Len: n, Writable: true}}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Kick(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := r.Wait(ctx)
	if err != nil || len(c) != 1 {
		t.Fatalf("completion: %v %v", c, err)
	}
	return append([]byte(nil), buf[:min(c[0].Len, n)]...)
}

// checkPluginIDs checks from outside that the plugin runs as uid:gid (and
// never as host root).
func checkPluginIDs(t *testing.T, pid, uid, gid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) != 5 || (f[0] != "Uid:" && f[0] != "Gid:") {
			continue
		}
		want := strconv.Itoa(uid)
		if f[0] == "Gid:" {
			want = strconv.Itoa(gid)
		}
		for _, v := range f[1:] {
			if v != want || (os.Geteuid() == 0 && v == "0") {
				t.Errorf("plugin %d: %s, want %s everywhere (never 0)", pid, l, want)
				break
			}
		}
	}
}

var pidRE = regexp.MustCompile(`serving: .*pid=([0-9]+)`)

// servingPid waits for the "serving" log line and returns the plugin pid.
func servingPid(t *testing.T, s *serveProc) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if m := pidRE.FindStringSubmatch(s.log()); m != nil {
			pid, _ := strconv.Atoi(m[1])
			return pid
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("no serving line")
	return 0
}

func TestServePluginReconnectAndSIGTERM(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null,fill=zero")
	waitSocket(t, s, sock)
	for i := 0; i < 2; i++ { // the front-end reconnects
		if got := readEntropy(t, sock, 1024); !bytes.Equal(got, make([]byte, 1024)) {
			t.Fatalf("connection %d: got %d bytes, not all zero", i+1, len(got))
		}
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.waitExit(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0", code)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after SIGTERM: %v", err)
	}
	if !strings.Contains(s.log(), "krun-plugin-null: shut down") {
		t.Errorf("plugin did not report its shutdown in the log")
	}
}

func TestServePluginRejectsOptions(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null,fill=ones")
	if code := s.waitExit(t); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	var ours []string
	for _, l := range strings.Split(s.log(), "\n") {
		if strings.HasPrefix(l, "krun-core serve: ") {
			ours = append(ours, l)
		}
		if strings.Contains(l, "[ERROR]") && !strings.Contains(l, "configure failed") {
			t.Errorf("error-level log line for an exit the host asked for: %q", l)
		}
	}
	if len(ours) != 1 || ours[0] != `krun-core serve: plugin null: Configure: option fill="ones": want random or zero` {
		t.Errorf("serve's own lines: %q", ours)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket exists for a device that could not be configured")
	}
}

func TestServePluginCrash(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null")
	waitSocket(t, s, sock)
	pid := servingPid(t, s)
	if err := syscall.Kill(pid, syscall.SIGSEGV); err != nil {
		t.Fatal(err)
	}
	if code := s.waitExit(t); code == 0 {
		t.Fatal("serve exited 0 after its plugin crashed")
	}
	want := fmt.Sprintf("krun-core serve: plugin null (pid %d) exited during running: exit status 2: SIGSEGV: segmentation violation", pid)
	if !strings.Contains(s.log(), want) {
		t.Errorf("stderr lacks %q", want)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after the plugin crashed")
	}
}

// TestServeDisk serves raw and qcow2 images through their plugins to the Go
// test guest, then checks what SIGTERM left in the image with QEMU's tools.
func TestServeDisk(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian package qemu-utils)", tool)
		}
	}
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk."+format)
			if out, err := exec.Command("qemu-img", "create", "-f", format, img, "16M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
			sock := filepath.Join(dir, "blk.sock")
			// As root, the plugin runs as nobody by default, or as chosen.
			args, uid, gid := []string{"--socket", sock}, sandbox.DefaultPluginUID, sandbox.DefaultPluginGID
			if format == "qcow2" {
				args, uid, gid = append(args, "--plugin-uid=4242", "--plugin-gid=4343"), 4242, 4343
			}
			if os.Geteuid() != 0 {
				args, uid, gid = args[:2], os.Geteuid(), os.Getegid()
			}
			s := startServe(t, bin, append(args, "--disk", "path="+img+",format="+format)...)
			waitSocket(t, s, sock)
			checkPluginIDs(t, servingPid(t, s), uid, gid)

			b, err := testguest.DialBlk(sock, testguest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			data := bytes.Repeat([]byte{0x5a}, 4096)
			if err := b.Write(ctx, 8, data); err != nil { // byte offset 4096
				t.Fatal(err)
			}
			got := make([]byte, 4096)
			if err := b.Read(ctx, 8, got); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(got, data))
			}
			b.Close()

			s.cmd.Process.Signal(syscall.SIGTERM)
			if code := s.waitExit(t); code != 0 {
				t.Fatalf("exit %d after SIGTERM", code)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket left after SIGTERM")
			}
			out, err := exec.Command("qemu-io", "-f", format, "-c", "read -P 0x5a 4096 4096", "-c", "read -P 0 0 4096", img).CombinedOutput()
			if err != nil || strings.Contains(string(out), "Pattern verification failed") {
				t.Fatalf("qemu-io check of the image: %v\n%s", err, out)
			}
			if format == "qcow2" {
				if out, err := exec.Command("qemu-img", "check", img).CombinedOutput(); err != nil {
					t.Fatalf("qemu-img check: %v\n%s", err, out)
				}
			}
		})
	}
}

// TestServeFSAndNet checks that --fs and --net reach their plugins: a
// front-end negotiates with the served device and SIGTERM ends it cleanly.
func TestServeFSAndNet(t *testing.T) {
	share := t.TempDir()
	tests := []struct {
		name, plugin string
		args         []string
		queues       int
		needs        string
	}{
		{"fs", "fs-virtio", []string{"--fs", "path=" + share + ",tag=share"}, 2, ""},
		{"net", "net-passt", []string{"--net", "passt"}, 2, "passt"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needs != "" {
				if _, err := exec.LookPath(tc.needs); err != nil {
					t.Skipf("%s not installed", tc.needs)
				}
			}
			bin := buildServeBinaries(t, tc.plugin)
			sock := filepath.Join(t.TempDir(), tc.name+".sock")
			s := startServe(t, bin, append([]string{"--socket", sock}, tc.args...)...)
			waitSocket(t, s, sock)
			g, err := testguest.Dial(sock, testguest.Options{NumQueues: tc.queues})
			if err != nil {
				t.Fatalf("front-end set-up: %v", err)
			}
			g.Close()
			s.cmd.Process.Signal(syscall.SIGTERM)
			if code := s.waitExit(t); code != 0 {
				t.Fatalf("exit %d after SIGTERM", code)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket left after SIGTERM")
			}
		})
	}
}

// TestBindAndListen: the path appears only once the socket accepts
// connections, and an existing file at the path is never replaced.
func TestBindAndListen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := bindAndListen(fd, path, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("connect right after bindAndListen: %v", err)
	}
	c.Close()
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600 whatever the umask", st.Mode().Perm(), err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only the socket", len(ents))
	}

	taken := filepath.Join(dir, "taken")
	if err := os.WriteFile(taken, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	fd2, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd2)
	if err := bindAndListen(fd2, taken, 0o600); err == nil {
		t.Fatal("bindAndListen replaced an existing file")
	}
	if b, _ := os.ReadFile(taken); string(b) != "keep" {
		t.Fatal("existing file changed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Fatalf("temporary socket left behind: %d entries", len(ents))
	}
}

// TestServeNetWithoutPasst: --net passt with no passt in $PATH exits 1 with
// one line saying so.
func TestServeNetWithoutPasst(t *testing.T) {
	bin := buildServeBinaries(t, "net-passt")
	cmd := exec.Command(filepath.Join(bin, "krun-core"), "serve", "--socket", filepath.Join(t.TempDir(), "n.sock"), "--net", "passt")
	cmd.Env = append(os.Environ(), "PATH="+t.TempDir(), "KRUN_PLUGIN_DIR=")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit %v, want 1\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "needs the passt program") {
		t.Fatalf("output %q, want one line naming passt", out)
	}
}

// runTool runs a command with a time limit and returns its exit status and
// combined output.
func runTool(t *testing.T, name string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	return -1, ""
}

// startQSDWriter runs qemu-storage-daemon with img open read-write (a
// writable vhost-user-blk export of a qcow2 node) and returns once it
// listens, so its locks are in place.
func startQSDWriter(t *testing.T, img string) func() {
	t.Helper()
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (Debian package qemu-utils)")
	}
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	cmd := exec.Command(qsd,
		"--blockdev", "driver=file,node-name=f,filename="+strings.ReplaceAll(img, ",", ",,"),
		"--blockdev", "driver=qcow2,node-name=q,file=f",
		"--export", "type=vhost-user-blk,id=e,node-name=q,writable=on,addr.type=unix,addr.path="+sock)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}
	t.Cleanup(stop)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return stop
		}
		select {
		case <-exited:
			t.Fatalf("qemu-storage-daemon exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not listen: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestServeImageLocking: serve locks the image as QEMU does, so that two
// writers of one qcow2 image never both run, whichever tool each is.
func TestServeImageLocking(t *testing.T) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	bin := buildServeBinaries(t, "blk-qcow2", "img")
	krun := filepath.Join(bin, "krun-core")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	if code, out := runTool(t, qemuImg, "create", "-q", "-f", "qcow2", img, "16M"); code != 0 {
		t.Fatalf("qemu-img create: %s", out)
	}
	disk := "path=" + img + ",format=qcow2"
	refused := func(mode string) string {
		return "krun-core serve: image " + img + " is in use by another process (write lock): refusing to open it " + mode
	}
	// expectRefusal runs serve and wants exit 1 with exactly one line of
	// its own, want, and no socket.
	expectRefusal := func(spec, want string) {
		t.Helper()
		sock := filepath.Join(t.TempDir(), "refused.sock")
		code, out := runTool(t, krun, "serve", "--socket", sock, "--disk", spec)
		if code != 1 || strings.TrimSpace(out) != want {
			t.Errorf("serve --disk %s: exit %d\n%s\nwant exit 1 and exactly: %s", spec, code, out, want)
		}
		if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a refused serve created its socket")
		}
	}

	t.Run("serve writes", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "blk.sock")
		s := startServe(t, bin, "--socket", sock, "--disk", disk)
		waitSocket(t, s, sock)

		expectRefusal(disk, refused("read-write"))
		expectRefusal(disk+",readonly=on", refused("read-only"))
		code, out := runTool(t, qemuImg, "info", img)
		if code == 0 || !strings.Contains(out, `Failed to get shared "write" lock`) {
			t.Errorf("qemu-img info on a served image: exit %d\n%s", code, out)
		}
		if code, out := runTool(t, qemuImg, "info", "-U", img); code != 0 {
			t.Errorf("qemu-img info -U on a served image: exit %d\n%s", code, out)
		}
		code, out = runTool(t, krun, "img", "check", "--format", "qcow2", "--repair", "all", img)
		if want := "krun-core img check: image " + img + " is in use by another process (write lock): refusing to open it read-write"; code != 1 || strings.TrimSpace(out) != want {
			t.Errorf("img check --repair all on a served image: exit %d\n%s\nwant exit 1 and exactly: %s", code, out, want)
		}
		if code, out := runTool(t, krun, "img", "info", "--format", "qcow2", img); code != 1 || !strings.Contains(out, "in use by another process") {
			t.Errorf("img info on a served image: exit %d\n%s", code, out)
		}
		if code, out := runTool(t, krun, "img", "info", "-U", "--format", "qcow2", img); code != 0 || !strings.Contains(out, "virtual size: 16 MiB") {
			t.Errorf("img info -U on a served image: exit %d\n%s", code, out)
		}
		s.cmd.Process.Signal(syscall.SIGTERM)
		if code := s.waitExit(t); code != 0 {
			t.Fatalf("exit %d after SIGTERM", code)
		}
		// The locks went with serve.
		if code, out := runTool(t, qemuImg, "info", img); code != 0 {
			t.Errorf("qemu-img info after serve exited: exit %d\n%s", code, out)
		}
	})

	t.Run("qemu-storage-daemon writes", func(t *testing.T) {
		stop := startQSDWriter(t, img)
		expectRefusal(disk, refused("read-write"))
		expectRefusal(disk+",readonly=on", refused("read-only"))
		code, out := runTool(t, krun, "img", "check", "--format", "qcow2", "--repair", "leaks", img)
		if code != 1 || !strings.Contains(out, "is in use by another process (write lock)") {
			t.Errorf("img check --repair beside qemu-storage-daemon: exit %d\n%s", code, out)
		}
		if code, out := runTool(t, krun, "img", "check", "-U", "--format", "qcow2", img); code != 0 {
			t.Errorf("img check -U beside qemu-storage-daemon: exit %d\n%s", code, out)
		}
		stop()
	})

	t.Run("readers share", func(t *testing.T) {
		var socks []string
		for i := 0; i < 2; i++ {
			sock := filepath.Join(t.TempDir(), "ro.sock")
			s := startServe(t, bin, "--socket", sock, "--disk", disk+",readonly=on")
			waitSocket(t, s, sock)
			socks = append(socks, sock)
		}
		if code, out := runTool(t, qemuImg, "info", img); code != 0 {
			t.Errorf("qemu-img info beside read-only serves: exit %d\n%s", code, out)
		}
		if code, out := runTool(t, krun, "img", "info", "--format", "qcow2", img); code != 0 {
			t.Errorf("img info beside read-only serves: exit %d\n%s", code, out)
		}
		// Both read-only servers serve.
		for _, sock := range socks {
			b, err := testguest.DialBlk(sock, testguest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			buf := make([]byte, 4096)
			err = b.Read(ctx, 0, buf)
			cancel()
			b.Close()
			if err != nil {
				t.Errorf("read from a read-only serve: %v", err)
			}
		}
		// A writer is refused while they read.
		expectRefusal(disk, "krun-core serve: image "+img+" is in use by another process (lock that does not share write): refusing to open it read-write")
		code, out := runTool(t, qemuImg, "check", "-r", "leaks", img)
		if code == 0 || !strings.Contains(out, `Failed to get "write" lock`) {
			t.Errorf("qemu-img check -r beside read-only serves: exit %d\n%s", code, out)
		}
	})
}
