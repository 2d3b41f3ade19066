package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/netnstest"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/testguest/tcpip"
	"github.com/krun-core/krun-core/vhostuser/frontend"
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
		{"grant to a built-in device", []string{pd, "--socket", sock, "--disk", "path=" + img + ",format=raw", "--plugin-syscalls", "blk-raw=sysinfo"}, "--plugin-syscalls blk-raw: no --plugin blk-raw to grant them to"},
		{"grant to another kind", []string{pd, "--socket", sock, "--plugin", "hello", "--plugin-syscalls", "other=sysinfo"}, "--plugin-syscalls other: no --plugin other"},
		{"grant of a forbidden call", []string{pd, "--socket", sock, "--plugin", "hello", "--plugin-syscalls", "hello=ptrace"}, `extra syscall "ptrace" is never granted to a plugin`},
		{"grant without a kind", []string{pd, "--socket", sock, "--plugin", "hello", "--plugin-syscalls", "sysinfo"}, "want KIND=NAME[,NAME...]"},
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
	return startServeCmd(t, exec.Command(filepath.Join(bin, "krun-core"), append([]string{"serve", "--log-level", "info"}, args...)...))
}

// startServeCmd starts cmd, a krun-core serve command line (maybe behind
// ip netns exec).
func startServeCmd(t *testing.T, cmd *exec.Cmd) *serveProc {
	t.Helper()
	s := &serveProc{cmd: cmd, done: make(chan error, 1)}
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
	if len(ours) != 1 || ours[0] != `krun-core serve: plugin null: Configure: option fill="ones": want random, zero or file` {
		t.Errorf("serve's own lines: %q", ours)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket exists for a device that could not be configured")
	}
}

func TestServePluginCrash(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null", "--plugin-restarts", "off")
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

var restartedRE = regexp.MustCompile(`plugin restarted; serving again: .*pid=([0-9]+)`)

// restartedPids returns the pids of the "plugin restarted" lines so far.
func restartedPids(s *serveProc) []int {
	var pids []int
	for _, m := range restartedRE.FindAllStringSubmatch(s.log(), -1) {
		pid, _ := strconv.Atoi(m[1])
		pids = append(pids, pid)
	}
	return pids
}

// killPlugin kills pid with SIGKILL and waits until it is gone, then for
// serve's n-th restart; it returns the new plugin's pid.
func killPlugin(t *testing.T, s *serveProc, pid, n int) int {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if p := restartedPids(s); len(p) >= n {
			return p[n-1]
		}
		select {
		case err := <-s.done:
			t.Fatalf("serve exited after its plugin was killed: %v", err)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("plugin not restarted (%d restarts)", len(restartedPids(s)))
	return 0
}

// TestServePluginRestart kills serve's plugin: serve starts it again on
// the same socket, a front-end that connects again is served, and once
// the budget (--plugin-restarts) is spent serve exits 1 as before.
func TestServePluginRestart(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null,fill=zero", "--plugin-restarts", "2/60s")
	waitSocket(t, s, sock)
	pid := servingPid(t, s)
	for n := 1; n <= 2; n++ {
		pid = killPlugin(t, s, pid, n)
		if got := readEntropy(t, sock, 512); !bytes.Equal(got, make([]byte, 512)) {
			t.Fatalf("after restart %d: got %d bytes, not all zero", n, len(got))
		}
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := s.waitExit(t); code != 1 {
		t.Fatalf("exit %d once the restarts were spent, want 1", code)
	}
	if !strings.Contains(s.log(), "not restarted again (plugin restart limit reached: 2 restarts within 1m0s)") {
		t.Errorf("no line saying why serve gave up")
	}
	if n := strings.Count(s.log(), "plugin lost; restarting it"); n != 2 {
		t.Errorf("%d restart lines, want one per restart", n)
	}
}

// TestServePluginThatMustNotBeRestarted: a plugin whose device says its
// requests must not be carried out twice (no_restart) is not restarted by
// serve when it dies, whatever --plugin-restarts allows: serve exits 1.
func TestServePluginThatMustNotBeRestarted(t *testing.T) {
	bin := buildServeBinaries(t)
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(bin, "krun-plugin-blk-raw"), "../../core/vmm/testdata/noreplay")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw", "--plugin-restarts", "5/60s")
	waitSocket(t, s, sock)
	if err := syscall.Kill(servingPid(t, s), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := s.waitExit(t); code != 1 {
		t.Fatalf("exit %d after the plugin died, want 1", code)
	}
	if strings.Contains(s.log(), "restarting it") || !strings.Contains(s.log(), "will not be restarted") {
		t.Errorf("serve's log:\n%s", s.log())
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

// TestServeDiskRestartInFlight kills serve's disk plugin (SIGKILL) while a
// batch of writes is in flight, several times: the Go test guest
// reconnects with the inflight region it got at the start (as QEMU does
// with reconnect=1), every request completes exactly once with success,
// and the disk then holds exactly what was written. qemu-img check finds
// no corruption in the qcow2 image afterwards.
func TestServeDiskRestartInFlight(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	bin := buildServeBinaries(t, "blk-raw", "blk-qcow2")
	const (
		size   = 16 << 20
		reqLen = 64 << 10
		kills  = 6
	)
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk."+format)
			if out, err := exec.Command("qemu-img", "create", "-f", format, img, strconv.Itoa(size)).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
			sock := filepath.Join(dir, "blk.sock")
			s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format="+format, "--plugin-restarts", "20/60s")
			waitSocket(t, s, sock)
			pid := servingPid(t, s)
			b, err := testguest.DialBlk(sock, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 32 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			want := make([]byte, size)
			for round := 1; round <= kills; round++ {
				// A batch of writes over the whole disk, each with its
				// round in every byte, in a random order.
				var reqs []*testguest.BlkRequest
				for _, i := range randPerm(size/reqLen, round) {
					data := bytes.Repeat([]byte{byte(round*16 + i%16)}, reqLen)
					copy(want[i*reqLen:], data)
					reqs = append(reqs, &testguest.BlkRequest{Type: testguest.BlkTOut, Sector: uint64(i * reqLen / 512), Data: data})
				}
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				done := make(chan error, 1)
				go func() { done <- b.Do(ctx, reqs) }()
				time.Sleep(time.Duration(round) * 2 * time.Millisecond)
				pid = killPlugin(t, s, pid, round)
				c, err := frontend.Dial(sock)
				if err != nil {
					t.Fatal(err)
				}
				if err := b.Guest().Reconnect(c); err != nil {
					t.Fatalf("round %d: reconnect: %v", round, err)
				}
				if err := <-done; err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				cancel()
				for _, r := range reqs {
					if r.Err != nil {
						t.Fatalf("round %d: write at sector %d: %v", round, r.Sector, r.Err)
					}
				}
				// Every write was acknowledged: the disk holds them all,
				// whichever plugin served them.
				ctx, cancel = context.WithTimeout(context.Background(), 60*time.Second)
				got := make([]byte, reqLen)
				for off := 0; off < size; off += reqLen {
					if err := b.Read(ctx, uint64(off/512), got); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want[off:off+reqLen]) {
						t.Fatalf("round %d: bytes at %d: %#x..., want %#x...", round, off, got[:4], want[off:off+4])
					}
				}
				cancel()
			}
			b.Close()
			t.Logf("%d requests resubmitted after %d kills", resubmitted(s.log()), kills)
			s.cmd.Process.Signal(syscall.SIGTERM)
			if code := s.waitExit(t); code != 0 {
				t.Fatalf("exit %d after SIGTERM", code)
			}
			if format == "qcow2" {
				checkNoCorruption(t, img)
			}
		})
	}
}

// checkNoCorruption runs qemu-img check on a qcow2 image: leaked clusters
// (exit status 3) are fine after a plugin was killed, corruptions are not.
func checkNoCorruption(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "--output=json", img).Output()
	var res struct {
		Corruptions  int `json:"corruptions"`
		Leaks        int `json:"leaks"`
		CheckErrors  int `json:"check-errors"`
		ImageEndOff  int `json:"image-end-offset"`
		TotalCluster int `json:"total-clusters"`
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		t.Fatalf("qemu-img check: %v, %v\n%s", err, jerr, out)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %d corruptions, %d errors\n%s", res.Corruptions, res.CheckErrors, out)
	}
	t.Logf("qemu-img check: no corruption, %d leaked clusters", res.Leaks)
}

var resubmittedRE = regexp.MustCompile(`resubmitting requests a previous back-end left in flight: .*requests=([0-9]+)`)

// resubmitted adds up the requests the log says plugins resubmitted.
func resubmitted(log string) int {
	n := 0
	for _, m := range resubmittedRE.FindAllStringSubmatch(log, -1) {
		k, _ := strconv.Atoi(m[1])
		n += k
	}
	return n
}

// TestServeNetRestart serves passt networking and kills first the plugin,
// then passt itself: each time serve starts a new plugin and a new passt
// on the same socket, the Go test guest reconnects, and DHCP works again.
func TestServeNetRestart(t *testing.T) {
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	ns := netnstest.New(t)
	bin := buildServeBinaries(t, "net-passt")
	sock := filepath.Join(t.TempDir(), "net.sock")
	s := startServeCmd(t, exec.Command("ip", "netns", "exec", ns, filepath.Join(bin, "krun-core"), "serve", "--log-level", "info",
		"--socket", sock, "--net", "passt,mac=52:54:00:12:34:56", "--plugin-restarts", "10/60s"))
	waitSocket(t, s, sock)
	plugin := servingPid(t, s)
	passt := func() int {
		for _, c := range daemontest.Children(s.cmd.Process.Pid) {
			if c != plugin {
				return c
			}
		}
		t.Fatal("no passt process")
		return 0
	}
	n, err := testguest.DialNet(sock, testguest.Options{Inflight: true, QueueSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	e := tcpip.New(n, [6]byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56})
	dhcp := func(when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		lease, err := e.DHCP(ctx)
		if err != nil {
			t.Fatalf("DHCP %s: %v", when, err)
		}
		if lease.Addr.String() != netnstest.Addr {
			t.Fatalf("DHCP %s: lease %+v", when, lease)
		}
	}
	dhcp("at the start")
	reconnect := func() {
		t.Helper()
		c, err := frontend.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.Guest().Reconnect(c); err != nil {
			t.Fatal(err)
		}
	}
	oldPasst := passt()
	plugin = killPlugin(t, s, plugin, 1)
	reconnect()
	if p := passt(); p == oldPasst {
		t.Fatal("passt was not started again with the plugin")
	}
	dhcp("after the plugin was killed")

	// passt dies on its own: serve restarts the plugin and passt.
	if err := syscall.Kill(passt(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(restartedPids(s)) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("no restart after passt died")
		}
		time.Sleep(10 * time.Millisecond)
	}
	plugin = restartedPids(s)[1]
	reconnect()
	dhcp("after passt was killed")
	if !strings.Contains(s.log(), `reason="passt exited"`) {
		t.Error("the restart line does not say passt exited")
	}
}

// randPerm is a permutation of 0..n-1 that depends on seed.
func randPerm(n, seed int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	x := uint64(seed)*0x9e3779b97f4a7c15 + 1
	for i := n - 1; i > 0; i-- {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		j := int(x % uint64(i+1))
		p[i], p[j] = p[j], p[i]
	}
	return p
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

// BenchmarkServeRestart measures the pause a plugin's death costs a
// front-end of `krun-core serve`: from SIGKILL of the disk plugin to the
// first read served again through the restarted plugin, the Go test guest
// reconnecting with its inflight region as soon as it can (as QEMU's
// reconnect=1 does, without its one-second retry). Run it with
// -benchtime=20x; it reports the median and the worst.
func BenchmarkServeRestart(b *testing.B) {
	for _, format := range []string{"raw", "qcow2"} {
		b.Run(format, func(b *testing.B) { benchServeRestart(b, format) })
	}
}

func benchServeRestart(b *testing.B, format string) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		b.Skip("qemu-img not installed")
	}
	bin := buildServeBinariesB(b, "blk-raw", "blk-qcow2")
	dir := b.TempDir()
	img := filepath.Join(dir, "disk."+format)
	if out, err := exec.Command("qemu-img", "create", "-f", format, img, "64M").CombinedOutput(); err != nil {
		b.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "blk.sock")
	cmd := exec.Command(filepath.Join(bin, "krun-core"), "serve", "--log-level", "info", "--socket", sock,
		"--disk", "path="+img+",format="+format, "--plugin-restarts", "10000/10s")
	cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
	var logs syncbuf.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	pidOf := func(n int) int {
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			var ms [][]string
			if n == 0 {
				ms = pidRE.FindAllStringSubmatch(logs.String(), -1)
			} else {
				ms = restartedRE.FindAllStringSubmatch(logs.String(), -1)
			}
			if len(ms) > n-1 && len(ms) > 0 {
				pid, _ := strconv.Atoi(ms[max(n-1, 0)][1])
				return pid
			}
			time.Sleep(5 * time.Millisecond)
		}
		b.Fatalf("no pid for restart %d\n%s", n, logs.String())
		return 0
	}
	pid := pidOf(0)
	g, err := testguest.DialBlk(sock, testguest.Options{Inflight: true, QueueSize: 64, MemSize: 16 << 20})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	buf := make([]byte, 4096)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := g.Write(ctx, 0, buf); err != nil {
		b.Fatal(err)
	}
	var took []time.Duration
	b.ResetTimer()
	for i := 1; i <= b.N; i++ {
		start := time.Now()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		for {
			// Until the old process is gone its socket may still accept.
			if syscall.Kill(pid, 0) != nil {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
		c, err := frontend.Dial(sock)
		if err != nil {
			b.Fatal(err)
		}
		c.SetTimeout(30 * time.Second)
		if err := g.Guest().Reconnect(c); err != nil {
			b.Fatalf("reconnect %d: %v", i, err)
		}
		if err := g.Read(ctx, 0, buf); err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(start))
		pid = pidOf(i)
	}
	b.StopTimer()
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "median-ms")
	b.ReportMetric(float64(took[len(took)-1].Microseconds())/1000, "worst-ms")
}

// buildServeBinariesB is buildServeBinaries for a benchmark.
func buildServeBinariesB(b *testing.B, plugins ...string) string {
	b.Helper()
	dir := b.TempDir()
	pkgs := map[string]string{".": "krun-core"}
	for _, p := range plugins {
		pkgs["../../plugins/"+p] = "krun-plugin-" + p
	}
	for pkg, out := range pkgs {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, out), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("go build %s: %v\n%s", pkg, err, o)
		}
	}
	return dir
}

// TestServePluginRestartWithoutNamespaces: a root serve with the
// namespaces layer off (`--sandbox-disable namespaces`, which README and
// SECURITY.md offer) launches its plugin and restarts it after the drop of
// its privileges. The launcher used to set the plugin's limits from
// outside with prlimit, which on a process of another uid in the same
// user namespace needs CAP_SYS_RESOURCE: serve does not keep it after
// set-up, so every restart failed, and a root without it (a container's
// default set) could not launch the plugin at all (from review,
// helper-102; fixed: the trampoline alone sets the limits, on itself).
func TestServePluginRestartWithoutNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a non-root serve's plugins run as its own uid, where prlimit needs no capability")
	}
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null,fill=zero", "--sandbox-disable", "namespaces")
	waitSocket(t, s, sock)
	pid := servingPid(t, s)
	if got := readEntropy(t, sock, 512); !bytes.Equal(got, make([]byte, 512)) {
		t.Fatalf("got %d bytes, not all zero", len(got))
	}
	killPlugin(t, s, pid, 1)
	if got := readEntropy(t, sock, 512); !bytes.Equal(got, make([]byte, 512)) {
		t.Fatalf("after the restart: got %d bytes, not all zero", len(got))
	}
	if strings.Contains(s.log(), "restart failed") {
		t.Errorf("a restart failed:\n%s", s.log())
	}
}

// SIGUSR1 makes serve log its plugin's counters in one line (nothing else
// showed them: Stats had no caller), and serve goes on serving.
func TestServeSIGUSR1LogsCounters(t *testing.T) {
	bin := buildServeBinaries(t)
	sock := filepath.Join(t.TempDir(), "rng.sock")
	s := startServe(t, bin, "--socket", sock, "--plugin", "null,fill=zero") // the default level, warn: shown all the same
	waitSocket(t, s, sock)
	readEntropy(t, sock, 512)
	if err := s.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`plugin counters: plugin=null pid=[0-9]+ .*q0\.requests=[1-9]`)
	deadline := time.Now().Add(10 * time.Second)
	for !re.MatchString(s.log()) {
		if time.Now().After(deadline) {
			t.Fatalf("no counters line after SIGUSR1:\n%s", s.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	readEntropy(t, sock, 512) // still serving
}

// TestServePasstRefusesItsArguments: a passt-arg that passt itself refuses
// (one krun-core does not know to refuse) made passt print its usage and
// exit at once, after serve was up; serve restarted it five times, each
// printing the usage again (569 lines), before giving up (found in review,
// helper-130). The first passt failing at its start now ends serve with one
// line naming it, after passt's own lines, and no restart.
func TestServePasstRefusesItsArguments(t *testing.T) {
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	ns := netnstest.New(t)
	bin := buildServeBinaries(t, "net-passt")
	sock := filepath.Join(t.TempDir(), "net.sock")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, filepath.Join(bin, "krun-core"), "serve",
		"--socket", sock, "--net", "passt,passt-arg=--no-such-passt-option")
	cmd.Env = append(os.Environ(), "KRUN_PLUGIN_DIR=")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit %v, want 1\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "krun-core serve: passt failed at its start (exit status 1 after ") {
		t.Fatalf("last line %q, want serve's one line naming passt's failure\n%s", last, out)
	}
	if n := strings.Count(string(out), "restarting"); n != 0 {
		t.Fatalf("passt restarted %d times after refusing its arguments:\n%s", n, out)
	}
}
