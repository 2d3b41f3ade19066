package main

import (
	"bufio"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/testguest"
)

// needTools skips the test when one of tools is not installed.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// servedImage is a 16 MiB image made by qemu-img, served by krun-core
// serve (restarts allowed), and a test guest on it with an inflight
// region, as QEMU with reconnect=1.
type servedImage struct {
	dir, img, sock string
	serve          *serveProc
	pid            int // the plugin
	blk            *testguest.Blk
}

func serveImage(t *testing.T, bin, format, diskOpts string) *servedImage {
	t.Helper()
	si := &servedImage{dir: t.TempDir()}
	si.img = filepath.Join(si.dir, "disk."+format)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", format, si.img, "16M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	si.sock = filepath.Join(si.dir, "blk.sock")
	si.serve = startServe(t, bin, "--socket", si.sock, "--disk", "path="+si.img+",format="+format+diskOpts, "--plugin-restarts", "5/60s")
	waitSocket(t, si.serve, si.sock)
	si.pid = servingPid(t, si.serve)
	b, err := testguest.DialBlk(si.sock, testguest.Options{Inflight: true, QueueSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	si.blk = b
	return si
}

// injectFaults attaches strace to pid with the given options (-e
// inject=...), waits until it has attached to every thread, and returns
// the function that detaches it. A host where strace cannot attach skips
// the test.
func injectFaults(t *testing.T, pid int, opts ...string) (detach func()) {
	t.Helper()
	st := exec.Command("strace", append([]string{"-f", "-p", strconv.Itoa(pid)}, opts...)...)
	se, _ := st.StderrPipe()
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	attached, exited := make(chan struct{}), make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(se)
		once := false
		var all []string
		for sc.Scan() {
			all = append(all, sc.Text())
			if !once && strings.Contains(sc.Text(), "attached") {
				once = true
				close(attached)
			}
		}
		exited <- strings.Join(all, "\n")
	}()
	select {
	case <-attached:
	case out := <-exited:
		t.Skipf("strace cannot attach to the plugin here: %s", out)
	case <-time.After(10 * time.Second):
		st.Process.Kill()
		t.Fatal("strace did not attach")
	}
	time.Sleep(200 * time.Millisecond) // every thread attached
	return func() {
		st.Process.Signal(syscall.SIGTERM)
		st.Wait()
	}
}
