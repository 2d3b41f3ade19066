package devspec

import (
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/stdiotest"
)

// TestConsoleFilesAreNotTheCallersDescription: ConsoleSpec.Open
// hands the console plugin F_DUPFD copies of krun-core's stdin, stdout and
// stderr, which share their open file description, and with it the file
// status flags, with krun-core and with whatever else holds it: for `run
// -- CMD` at a terminal (and `krun-oci exec` in the foreground), the
// user's shell. The plugin's seccomp filter allows fcntl F_SETFL (the Go
// runtime needs it for its own fds; sandbox
// TestReview96PluginLeavesTerminalNonblocking), so a compromised console
// plugin (it parses every guest byte) sets O_NONBLOCK there and the user's
// terminal stays non-blocking after krun-core has exited and restored its
// termios: the next program's read of it fails with EAGAIN. Giving the
// plugin a description of its own (reopening a terminal, FIFO or pipe
// through /proc/self/fd/N with its access mode; dup only for what cannot
// be reopened, such as a socket), or restoring the flags at exit, keeps
// the caller's terminal as it was.
//
// From review, helper-96; fixed: HandOver opens a terminal, FIFO or pipe
// again.
func TestConsoleFilesAreNotTheCallersDescription(t *testing.T) {
	_, tty := stdiotest.OpenPTY(t)
	spec := &ConsoleSpec{Name: "krun.stdio", TTY: true, Stdin: tty, Stdout: tty, Stderr: tty}
	o, err := spec.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.CloseFiles()
	before, _ := unix.FcntlInt(tty.Fd(), unix.F_GETFL, 0)
	if before&unix.O_NONBLOCK != 0 {
		t.Fatalf("the test terminal is non-blocking already (%#o)", before)
	}
	// What the plugin may do to each file it was handed.
	for _, f := range o.Files {
		fl, err := unix.FcntlInt(f.File.Fd(), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(f.File.Fd(), unix.F_SETFL, fl|unix.O_NONBLOCK); err != nil {
			t.Fatal(err)
		}
	}
	after, _ := unix.FcntlInt(tty.Fd(), unix.F_GETFL, 0)
	if after&unix.O_NONBLOCK != 0 && before&unix.O_NONBLOCK == 0 {
		_, rerr := unix.Read(int(tty.Fd()), make([]byte, 1))
		t.Fatalf("the console plugin's copy of the caller's terminal shares its file status flags: O_NONBLOCK set on the plugin's copy "+
			"is the caller's too (flags %#o -> %#o); the caller's next read of its terminal: %v", before, after, rerr)
	}
}

// TestHandOverKinds: a pipe is opened again (flags of its own, the same
// pipe); a regular file is duplicated, so that the caller's offset, which
// `cmd >file` relies on, stays shared; a socket, which cannot be opened
// again, is duplicated.
func TestHandOverKinds(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	reg, err := os.Create(t.TempDir() + "/out")
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sock, peer := os.NewFile(uintptr(sp[0]), "sock"), os.NewFile(uintptr(sp[1]), "peer")
	defer sock.Close()
	defer peer.Close()
	for _, tc := range []struct {
		name       string
		f          *os.File
		sharesDesc bool
	}{
		{"pipe write end", w, false},
		{"pipe read end", r, false},
		{"regular file", reg, true},
		{"socket", sock, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := HandOver(tc.f, "x", unix.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var a, b unix.Stat_t
			if err := unix.Fstat(int(tc.f.Fd()), &a); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fstat(int(c.Fd()), &b); err != nil {
				t.Fatal(err)
			}
			if a.Dev != b.Dev || a.Ino != b.Ino {
				t.Fatal("the copy is another file")
			}
			before, _ := unix.FcntlInt(tc.f.Fd(), unix.F_GETFL, 0)
			fl, _ := unix.FcntlInt(c.Fd(), unix.F_GETFL, 0)
			if fl&unix.O_ACCMODE != before&unix.O_ACCMODE {
				t.Errorf("access mode %#o, the original's %#o", fl&unix.O_ACCMODE, before&unix.O_ACCMODE)
			}
			if _, err := unix.FcntlInt(c.Fd(), unix.F_SETFL, fl^unix.O_NONBLOCK); err != nil {
				t.Fatal(err)
			}
			after, _ := unix.FcntlInt(tc.f.Fd(), unix.F_GETFL, 0)
			if shared := after != before; shared != tc.sharesDesc {
				t.Errorf("the copy shares the original's open file description: %v, want %v", shared, tc.sharesDesc)
			}
		})
	}
	// The pipe's copy is still the pipe: what goes into it comes out.
	c, err := HandOver(w, "stdout", unix.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2)
	if _, err := r.Read(got); err != nil || string(got) != "hi" {
		t.Fatalf("read %q, %v through the pipe's copy", got, err)
	}
}

// TestHandOverReadWriteFileNarrowed: a regular file the shell opened `<>`
// (O_RDWR) and handed over as stdin (read only) reaches the plugin read
// only, at the caller's offset, with a description of its own: a
// duplicate let a compromised console plugin write into the user's file
// (left open by helper-128). A read-only file stays a duplicate (its
// offset shared, as `cmd <file` relies on).
func TestHandOverReadWriteFileNarrowed(t *testing.T) {
	path := t.TempDir() + "/in"
	if err := os.WriteFile(path, []byte("line one\nline two\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rw, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	if _, err := rw.Seek(9, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	c, err := HandOver(rw, "stdin", unix.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fl, _ := unix.FcntlInt(c.Fd(), unix.F_GETFL, 0)
	if fl&unix.O_ACCMODE != unix.O_RDONLY {
		t.Fatalf("the plugin's stdin has access mode %#o, want read only", fl&unix.O_ACCMODE)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("the plugin could write into the user's file")
	}
	got := make([]byte, 9)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "line two\n" {
		t.Fatalf("read %q, %v; want the rest from the caller's offset", got, err)
	}
	if off, _ := rw.Seek(0, io.SeekCurrent); off != 9 {
		t.Errorf("the caller's offset moved to %d", off)
	}

	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	d, err := HandOver(ro, "stdin", unix.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Read(make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if off, _ := ro.Seek(0, io.SeekCurrent); off != 5 {
		t.Errorf("a read-only stdin's offset is not shared: %d after the plugin read 5", off)
	}
}
