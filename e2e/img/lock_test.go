package img_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// holdImage keeps path open in qemu-io (read-write, or read-only with
// "-r") until the test ends, and returns once qemu-io has opened it.
func holdImage(t *testing.T, path string, args ...string) {
	t.Helper()
	qio := qemuTool(t, "qemu-io")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	// qemu-io prints the "open" command's result, then sleeps.
	args = append(append([]string{"-f", "qcow2"}, args...), "-c", "sleep 100000", path)
	cmd := exec.CommandContext(ctx, qio, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cancel(); <-exited })
	// Probe only once qemu-io holds its locks: a probe running while
	// qemu-io opens the image would make qemu-io's own open fail.
	deadline := time.Now().Add(20 * time.Second)
	for prev := -1; ; time.Sleep(50 * time.Millisecond) {
		n := locksOn(t, path)
		if n > 0 && n == prev {
			break
		}
		prev = n
		select {
		case <-exited:
			t.Fatalf("qemu-io exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io %v took no lock on %s (/proc/locks)", args, path)
		}
	}
	// Once qemu-io holds its locks, a qemu-img writer is refused.
	for {
		r := run(t, nil, qemuTool(t, "qemu-img"), "check", "-r", "leaks", path)
		if r.code != 0 && strings.Contains(r.stderr, "lock") {
			return
		}
		select {
		case <-exited:
			t.Fatalf("qemu-io exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io %v took no lock", args)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// locksOn counts the file locks /proc/locks lists on path's inode.
func locksOn(t *testing.T, path string) int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		for _, f := range strings.Fields(line) {
			if f == id {
				n++
			}
		}
	}
	return n
}

// TestImageLocking: img commands respect QEMU's image locks; -U reads an
// image that another process writes, as qemu-img -U does.
func TestImageLocking(t *testing.T) {
	krunCore(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", p, "4M")
	qemuIO(t, p, "write -P 0x11 0 64k")
	inUse := func(cmd, what, mode, lock string) string {
		msg := "krun-core img " + cmd + ": " + what + " " + p + " is in use by another process (" + lock + "): refusing to open it " + mode
		if mode == "read-only" { // where -U would do
			msg += "; -U (--force-share) reads it all the same, as with qemu-img, at the risk of reading it mid-write"
		}
		return msg
	}
	oneLine := func(args []string, r result, want string) {
		t.Helper()
		if r.code != 1 || strings.TrimSpace(r.stderr) != want {
			t.Errorf("img %s: exit %d, stderr %q\nwant exit 1 and exactly %q", strings.Join(args, " "), r.code, r.stderr, want)
		}
	}

	t.Run("qemu-io writes", func(t *testing.T) {
		holdImage(t, p)
		out := filepath.Join(dir, "out.raw")
		for _, c := range []struct {
			args      []string
			cmd, what string
		}{
			{args: []string{"info", "--format", "qcow2"}, cmd: "info", what: "image"},
			{args: []string{"check", "--format", "qcow2"}, cmd: "check", what: "image"},
			{args: []string{"verify", "--format", "qcow2"}, cmd: "verify", what: "image"},
			{args: []string{"probe"}, cmd: "probe", what: "image"},
		} {
			args := append(c.args, p)
			oneLine(args, img(t, args...), inUse(c.cmd, c.what, "read-only", "write lock"))
			if r := img(t, append(args, "-U")...); r.code != 0 {
				t.Errorf("img %s -U: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
			}
		}
		args := []string{"convert", "--format", "qcow2", "-O", "raw", p, out}
		r := img(t, args...)
		oneLine(args, r, inUse("convert", "input", "read-only", "write lock"))
		if _, err := os.Stat(out); !os.IsNotExist(err) {
			t.Errorf("a refused convert created its output: %v", err)
		}
		mustImg(t, append(args, "--force-share")...)
		args = []string{"check", "--format", "qcow2", "--repair", "all", p}
		oneLine(args, img(t, args...), inUse("check", "image", "read-write", "write lock"))
	})

	t.Run("qemu-io reads", func(t *testing.T) {
		holdImage(t, p, "-r")
		mustImg(t, "info", "--format", "qcow2", p)
		mustImg(t, "check", "--format", "qcow2", p)
		args := []string{"check", "--format", "qcow2", "--repair", "leaks", p}
		oneLine(args, img(t, args...), inUse("check", "image", "read-write", "lock that does not share write"))
	})

	// Nothing is left locked: qemu-img opens it read-write.
	qemuImg(t, "check", "-r", "leaks", p)
}
