package imagelock

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func tempImage(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func open(t *testing.T, p string) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestModes(t *testing.T) {
	cases := []struct {
		held, want Mode
		// refusal is the expected error text; "" means the two coexist.
		refusal string
	}{
		{ReadWrite, ReadWrite, "image %s is in use by another process (write lock): refusing to open it read-write"},
		{ReadWrite, ReadOnly, "image %s is in use by another process (write lock): refusing to open it read-only"},
		{ReadWrite, ForceShare, ""},
		{ReadOnly, ReadWrite, "image %s is in use by another process (lock that does not share write): refusing to open it read-write"},
		{ReadOnly, ReadOnly, ""},
		{ReadOnly, ForceShare, ""},
		{ForceShare, ReadWrite, ""},
		{ForceShare, ReadOnly, ""},
		{ForceShare, ForceShare, ""},
	}
	for _, tc := range cases {
		t.Run(tc.held.String()+"/"+tc.want.String(), func(t *testing.T) {
			p := tempImage(t)
			a, b := open(t, p), open(t, p)
			if err := Lock(a, "image", p, tc.held); err != nil {
				t.Fatalf("first lock: %v", err)
			}
			err := Lock(b, "image", p, tc.want)
			if tc.refusal == "" {
				if err != nil {
					t.Fatalf("second lock refused: %v", err)
				}
				return
			}
			var iu *InUseError
			if !errors.As(err, &iu) {
				t.Fatalf("second lock: %v, want an InUseError", err)
			}
			if want := fmt.Sprintf(tc.refusal, p); err.Error() != want {
				t.Fatalf("refusal\n got %q\nwant %q", err, want)
			}
			if iu.Pid != 0 {
				t.Errorf("pid %d reported for an OFD lock, which has no owning process", iu.Pid)
			}
			// The refused open holds nothing: once the first holder
			// is gone, a third open of the same mode succeeds.
			a.Close()
			c := open(t, p)
			if err := Lock(c, "image", p, tc.want); err != nil {
				t.Fatalf("after the holder closed: %v", err)
			}
		})
	}
}

// TestRefusedHoldsNothing: a refused writer must not leave locks behind
// that would block a later reader.
func TestRefusedHoldsNothing(t *testing.T) {
	p := tempImage(t)
	a, b := open(t, p), open(t, p)
	if err := Lock(a, "image", p, ReadOnly); err != nil {
		t.Fatal(err)
	}
	if err := Lock(b, "image", p, ReadWrite); err == nil {
		t.Fatal("writer beside a reader was not refused")
	}
	if got := heldBytes(t, p); strings.Join(got, " ") != "100 201 203" {
		t.Fatalf("locks on the file after the refusal: %v, want only the reader's 100 201 203", got)
	}
}

// TestDupKeepsLock: the lock belongs to the open file, so a duplicate fd
// (the host's copy while a plugin has another) keeps it after the
// original is closed.
func TestDupKeepsLock(t *testing.T) {
	p := tempImage(t)
	a := open(t, p)
	if err := Lock(a, "image", p, ReadWrite); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.FcntlInt(a.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dup := os.NewFile(uintptr(fd), p)
	a.Close()
	b := open(t, p)
	if err := Lock(b, "image", p, ReadWrite); err == nil {
		t.Fatal("lock lost when the original fd was closed")
	}
	dup.Close()
	if err := Lock(b, "image", p, ReadWrite); err != nil {
		t.Fatalf("lock kept after the last fd closed: %v", err)
	}
	if err := Unlock(b); err != nil {
		t.Fatal(err)
	}
	if got := heldBytes(t, p); len(got) != 0 {
		t.Fatalf("locks after Unlock: %v", got)
	}
}

// TestClassicLockNamesPid: for a classic POSIX lock the kernel reports the
// holder's pid, and the refusal names it.
func TestClassicLockNamesPid(t *testing.T) {
	p := tempImage(t)
	classic := open(t, p)
	lk := unix.Flock_t{Type: unix.F_RDLCK, Start: UseBase + int64(PermWrite), Len: 1}
	if err := unix.FcntlFlock(classic.Fd(), unix.F_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	b := open(t, p)
	err := Lock(b, "image", p, ReadWrite)
	want := fmt.Sprintf("image %s is in use by another process (write lock, held by pid %d): refusing to open it read-write", p, os.Getpid())
	if err == nil || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	// An exclusive classic lock on a byte we take shared fails the take
	// itself; that is a refusal too, not an I/O error.
	c := open(t, p)
	lk = unix.Flock_t{Type: unix.F_WRLCK, Start: UseBase, Len: 1}
	if err := unix.FcntlFlock(classic.Fd(), unix.F_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	var iu *InUseError
	if err := Lock(c, "image", p, ForceShare); !errors.As(err, &iu) || iu.Perm != PermConsistentRead || iu.Pid != os.Getpid() {
		t.Fatalf("force-share beside an exclusive classic lock: %v", err)
	}
}

// heldBytes lists the byte offsets locked on p, from /proc/locks.
func heldBytes(t *testing.T, p string) []string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/locks")
	if err != nil {
		t.Skipf("no /proc/locks: %v", err)
	}
	defer f.Close()
	suffix := fmt.Sprintf(":%d", st.Ino)
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		// "1: OFDLCK ADVISORY READ -1 fe:00:123 100 101"
		if len(fs) < 8 || !strings.HasSuffix(fs[5], suffix) {
			continue
		}
		var a, b int
		fmt.Sscan(fs[6], &a)
		fmt.Sscan(fs[7], &b)
		for i := a; i <= b; i++ {
			out = append(out, fmt.Sprint(i))
		}
	}
	sort.Strings(out)
	return out
}

// TestSameBytesAsQemu compares the bytes each mode locks with what QEMU's
// tools lock on a qcow2 image, read from /proc/locks.
func TestSameBytesAsQemu(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	needTool(t, "qemu-img")
	for _, tc := range []struct {
		mode Mode
		args []string
	}{
		{ReadWrite, nil},
		{ReadOnly, []string{"-r"}},
		{ForceShare, []string{"-r", "-U"}},
	} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			p := qcow2(t)
			h := holdQemuIO(t, qemuIO, p, tc.args...)
			qemu := heldBytes(t, p)
			h.stop()
			f := open(t, p)
			if err := Lock(f, "image", p, tc.mode); err != nil {
				t.Fatal(err)
			}
			if ours := heldBytes(t, p); strings.Join(ours, " ") != strings.Join(qemu, " ") {
				t.Fatalf("we lock %v, qemu-io %v locks %v", ours, tc.args, qemu)
			}
		})
	}
}

// TestAgainstQemu checks both directions against QEMU's own tools.
func TestAgainstQemu(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	qemuImg := needTool(t, "qemu-img")
	info := func(p string, extra ...string) (string, error) {
		out, err := exec.Command(qemuImg, append(append([]string{"info"}, extra...), p)...).CombinedOutput()
		return string(out), err
	}

	t.Run("we write, qemu-img info refused", func(t *testing.T) {
		p := qcow2(t)
		f := open(t, p)
		if err := Lock(f, "image", p, ReadWrite); err != nil {
			t.Fatal(err)
		}
		out, err := info(p)
		if err == nil || !strings.Contains(out, `Failed to get shared "write" lock`) {
			t.Fatalf("qemu-img info beside our writer: %v\n%s", err, out)
		}
		if out, err := info(p, "-U"); err != nil {
			t.Fatalf("qemu-img info -U beside our writer: %v\n%s", err, out)
		}
	})
	t.Run("we read, qemu-img info shares, qemu-io writer refused", func(t *testing.T) {
		p := qcow2(t)
		f := open(t, p)
		if err := Lock(f, "image", p, ReadOnly); err != nil {
			t.Fatal(err)
		}
		if out, err := info(p); err != nil {
			t.Fatalf("qemu-img info beside our reader: %v\n%s", err, out)
		}
		// qemu-io exits 0 even when it cannot open the image.
		out, _ := exec.Command(qemuIO, "-f", "qcow2", "-c", "read 0 512", p).CombinedOutput()
		if !strings.Contains(string(out), `Failed to get "write" lock`) {
			t.Fatalf("qemu-io writer beside our reader: %s", out)
		}
	})
	t.Run("qemu writes, we are refused", func(t *testing.T) {
		p := qcow2(t)
		h := holdQemuIO(t, qemuIO, p)
		defer h.stop()
		for _, m := range []Mode{ReadWrite, ReadOnly} {
			err := Lock(open(t, p), "image", p, m)
			want := fmt.Sprintf("image %s is in use by another process (write lock): refusing to open it %s", p, m)
			if err == nil || err.Error() != want {
				t.Errorf("%s beside qemu-io: %v, want %s", m, err, want)
			}
		}
		if err := Lock(open(t, p), "image", p, ForceShare); err != nil {
			t.Errorf("force-share beside qemu-io: %v", err)
		}
	})
	t.Run("qemu reads, we share, our writer refused", func(t *testing.T) {
		p := qcow2(t)
		h := holdQemuIO(t, qemuIO, p, "-r")
		defer h.stop()
		if err := Lock(open(t, p), "image", p, ReadOnly); err != nil {
			t.Errorf("reader beside a qemu-io reader: %v", err)
		}
		err := Lock(open(t, p), "image", p, ReadWrite)
		var iu *InUseError
		if !errors.As(err, &iu) || iu.Perm != PermWrite || !iu.Unshared {
			t.Errorf("writer beside a qemu-io reader: %v", err)
		}
	})
}

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (Debian package qemu-utils); it cross-checks the lock scheme", name)
	}
	return p
}

func qcow2(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", p, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	return p
}

type holder struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (h *holder) stop() {
	h.cmd.Process.Kill()
	<-h.done
}

// holdQemuIO keeps the image open in qemu-io (read-write unless args say
// otherwise) until stop, and returns once its locks are in place.
func holdQemuIO(t *testing.T, qemuIO, p string, args ...string) *holder {
	t.Helper()
	args = append(append([]string{"-f", "qcow2"}, args...), "-c", "sleep 60000", p)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, qemuIO, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &holder{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(h.done) }()
	t.Cleanup(h.stop)
	// Wait until its locks are there and have stopped changing.
	deadline := time.Now().Add(20 * time.Second)
	prev := ""
	for {
		cur := strings.Join(heldBytes(t, p), " ")
		if cur != "" && cur == prev {
			break
		}
		prev = cur
		select {
		case <-h.done:
			t.Fatalf("qemu-io %v exited: %s", args, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io %v took no lock", args)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return h
}
