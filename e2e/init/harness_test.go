package kruninit_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/initramfs"
	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/vmtest"
)

// Ports the tests move the status bytes to (QEMU's fw_cfg owns 0x510/0x511).
const (
	milestonePort = 0x503 // not 0x402: SeaBIOS prints its debug log there
	exitPort      = 0x501
)

var bins = vmtest.BinSet{Name: "init", Pkgs: map[string]string{
	"krun-core":             "github.com/krun-core/krun-core/cmd/krun-core",
	"krun-plugin-fs-virtio": "github.com/krun-core/krun-core/plugins/fs-virtio",
	"krun-init":             "github.com/krun-core/krun-core/guest/init",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// shortDir is a temporary directory with a short path (unix sockets are
// limited to 108 bytes).
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kinit")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// makeRoot builds a root directory from busybox-static: /bin/busybox and a
// symlink per applet, plus the usual empty directories.
func makeRoot(t testing.TB, busybox string) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root", "srv"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		t.Fatalf("busybox --list-full: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		applet := strings.TrimSpace(sc.Text())
		if applet == "" || applet == "bin/busybox" || strings.Contains(applet, "..") {
			continue
		}
		p := filepath.Join(root, applet)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/bin/busybox", p); err != nil && !errors.Is(err, fs.ErrExist) {
			t.Fatal(err)
		}
	}
	return root
}

// serveFS starts `krun-core serve --fs path=dir,tag=tag` and returns its
// socket.
func serveFS(t *testing.T, dir, tag string) string {
	t.Helper()
	opt := daemontest.Options{Name: "krun-core serve --fs", Socket: filepath.Join(shortDir(t), "fs.sock"), Ready: "krun-core: serving"}
	d := daemontest.Start(t, opt, filepath.Join(bins.Dir(t), "krun-core"), "serve", "--socket", opt.Socket,
		"--fs", "path="+dir+",tag="+tag, "--log-level", "info")
	return d.Socket
}

// host is the test's end of the krun.stdio port: it collects STDOUT,
// STDERR and EXIT frames and acknowledges them and CLOSE_REQ.
type host struct {
	conn net.Conn
	w    *stdioframe.Writer

	mu       sync.Mutex
	stdout   bytes.Buffer
	stderr   bytes.Buffer
	exit     int // -1 until an EXIT frame
	closeReq bool
	err      error
	changed  chan struct{}
	done     chan struct{}
}

func dialHost(t *testing.T, socket string, deadline time.Time) *host {
	t.Helper()
	var conn net.Conn
	for {
		var err error
		conn, err = net.Dial("unix", socket)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to the stdio socket: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	h := &host{conn: conn, w: stdioframe.NewWriter(conn), exit: -1, changed: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(func() { conn.Close(); <-h.done })
	go h.read()
	return h
}

func (h *host) read() {
	defer close(h.done)
	r := stdioframe.NewReader(h.conn, stdioframe.GuestToHost)
	for {
		f, err := r.Next()
		h.mu.Lock()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				h.err = err
			}
			close(h.changed)
			h.mu.Unlock()
			return
		}
		switch f.Type {
		case stdioframe.Stdout:
			h.stdout.Write(f.Payload)
		case stdioframe.Stderr:
			h.stderr.Write(f.Payload)
		case stdioframe.Exit:
			h.exit = int(f.Status())
		case stdioframe.CloseReq:
			h.closeReq = true
		}
		close(h.changed)
		h.changed = make(chan struct{})
		h.mu.Unlock()
		switch f.Type {
		case stdioframe.CloseReq:
			h.w.WriteFrame(stdioframe.CloseAck, nil)
		case stdioframe.Stdout, stdioframe.Stderr:
			// Written out: krun-init may send more (its credit).
			h.w.WriteOutputAck(uint32(len(f.Payload)))
		}
	}
}

// waitStdout waits until stdout contains s.
func (h *host) waitStdout(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		h.mu.Lock()
		ok, ch := strings.Contains(h.stdout.String(), s), h.changed
		out := h.stdout.String()
		h.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("stdout has no %q after %v; it is %q", s, timeout, out)
		}
	}
}

// guest describes one krun-init run.
type guest struct {
	cfg     *initconfig.Config
	root    string                      // root directory (default: a fresh busybox root)
	shares  map[string]string           // more virtio-fs devices: tag -> host directory
	net     bool                        // load virtio_net (the NIC itself goes in args)
	files   []*os.File                  // QEMU ExtraFiles
	args    []string                    // extra QEMU arguments
	session func(t *testing.T, h *host) // drives the stdio port while the guest runs
}

// outcome is what came back.
type outcome struct {
	qemuExit   int  // QEMU's exit code: (status<<1 | 1) & 0xff
	status     int  // the status written to isa-debug-exit, modulo 128
	exitFrame  int  // from the EXIT frame (-1 if none)
	closeReq   bool // CLOSE_REQ was sent
	stdout     string
	stderr     string
	milestones []byte // bytes written to the milestone port
	root       string
	console    string
}

func run(t *testing.T, g guest) *outcome {
	t.Helper()
	a := vmtest.Require(t)
	if g.root == "" {
		g.root = makeRoot(t, a.Busybox)
	}
	fsSock := serveFS(t, g.root, initconfig.DefaultRootTag)
	if g.cfg.Ports == nil {
		g.cfg.Ports = &initconfig.Ports{Milestone: milestonePort, Exit: exitPort}
	}
	initBin, err := os.ReadFile(filepath.Join(bins.Dir(t), "krun-init"))
	if err != nil {
		t.Fatal(err)
	}
	mods := []string{"virtio_pci", "virtiofs", "virtio_console"}
	if g.net {
		mods = append(mods, "virtio_net")
	}
	cpio, res, err := initramfs.BuildBytes(initramfs.Options{Init: initBin, Config: g.cfg, Modules: mods, ModulesDir: a.Kernel.ModulesDir})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range res.Modules {
		names = append(names, m.Name)
	}
	t.Logf("initramfs: %d bytes, modules %s", len(cpio), strings.Join(names, " "))
	dir := shortDir(t)
	initrd := filepath.Join(dir, "initrd")
	if err := os.WriteFile(initrd, cpio, 0o644); err != nil {
		t.Fatal(err)
	}
	stdioSock := filepath.Join(dir, "stdio.sock")
	msFile := filepath.Join(dir, "milestones")
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initrd: initrd, Quiet: true, Timeout: 3 * time.Minute, ExtraFiles: g.files})
	vm.AddVhostUserFS(fsSock, initconfig.DefaultRootTag)
	for tag, dir := range g.shares {
		vm.AddVhostUserFS(serveFS(t, dir, tag), tag)
	}
	vm.AddArgs(
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=stdio0,path="+stdioSock+",server=on,wait=on",
		"-device", "virtserialport,bus=vser0.0,chardev=stdio0,name="+initconfig.DefaultStdioPort,
		"-device", fmt.Sprintf("isa-debug-exit,iobase=%#x,iosize=1", exitPort),
		"-chardev", "file,id=ms0,path="+msFile,
		"-device", fmt.Sprintf("isa-debugcon,iobase=%#x,chardev=ms0", milestonePort),
	)
	vm.AddArgs(g.args...)
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	h := dialHost(t, stdioSock, time.Now().Add(30*time.Second))
	if g.session != nil {
		g.session(t, h)
	}
	r, err := vm.Wait()
	if err != nil {
		h.mu.Lock()
		stdout, stderr := h.stdout.String(), h.stderr.String()
		h.mu.Unlock()
		t.Fatalf("guest: %v\n%s\nstdout %q\nstderr %q", err, vmtest.LastLines(r.Console, 40), stdout, stderr)
	}
	// The guest is gone: whatever it sent is in the socket buffer.
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		t.Errorf("stdio socket not closed after QEMU exited")
	}
	h.mu.Lock()
	o := &outcome{exitFrame: h.exit, closeReq: h.closeReq, stdout: h.stdout.String(), stderr: h.stderr.String(), root: g.root, console: r.Console}
	if h.err != nil {
		t.Errorf("stdio frames from the guest: %v", h.err)
	}
	h.mu.Unlock()
	o.milestones, _ = os.ReadFile(msFile)
	o.qemuExit = r.ExitCode
	if g.cfg.Ports.Exit != exitPort {
		return o // the caller checks how QEMU ended
	}
	if r.ExitCode%2 != 1 {
		t.Fatalf("QEMU exited with %d: the guest did not write its status to port %#x\n%s", r.ExitCode, exitPort, vmtest.LastLines(r.Console, 40))
	}
	o.status = (r.ExitCode - 1) / 2
	t.Logf("status %d, milestones %v, stdout %q, stderr %q, QEMU ran %v", o.status, o.milestones, o.stdout, o.stderr, r.Total.Round(time.Millisecond))
	return o
}

// checkFinished checks the end of a normal run: EXIT frame equal to the
// status, CLOSE_REQ, both milestones.
func (o *outcome) checkFinished(t *testing.T, status int) {
	t.Helper()
	// QEMU's exit code has 8 bits: the status's top bit is lost.
	if want := (status<<1 | 1) & 0xff; o.qemuExit != want {
		t.Errorf("QEMU exit code %d (status %d mod 128), want %d for status %d (stderr %q)", o.qemuExit, o.status, want, status, o.stderr)
	}
	if o.exitFrame != status {
		t.Errorf("EXIT frame %d, want %d", o.exitFrame, status)
	}
	if !o.closeReq {
		t.Error("no CLOSE_REQ frame")
	}
}
