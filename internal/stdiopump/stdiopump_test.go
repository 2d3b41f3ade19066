package stdiopump

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/stdiotest"
)

// pipe returns a pipe's write end; both ends close at the test's end.
func pipe(t *testing.T) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return w
}

// within fails the test unless done is closed in time.
func within(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: still blocked after 10 s", what)
	}
}

// TestInputPump: what is typed on the terminal reaches the plugin's pipe
// as typed, and a hang-up ends the command's input.
func TestInputPump(t *testing.T) {
	master, tty := stdiotest.OpenPTY(t)
	in, r, err := NewInput(tty)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := stdiotest.FileType(t, r); got != unix.S_IFIFO {
		t.Fatalf("the plugin's stdin is of type %#o, want a pipe", got)
	}
	done := make(chan struct{})
	go func() { in.Run(); close(done) }()
	if _, err := master.Write([]byte("typed\n")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	read := make(chan error, 1)
	go func() { _, err := io.ReadFull(r, got); read <- err }()
	select {
	case err := <-read:
		if err != nil || string(got) != "typed\n" {
			t.Fatalf("the pipe got %q, %v", got, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing typed reached the pipe")
	}
	master.Close() // hang-up
	within(t, done, "the pump after a hang-up")
	if n, err := r.Read(got); err != io.EOF {
		t.Fatalf("the pipe reads %d, %v after the hang-up, want EOF", n, err)
	}
}

// TestPassThrough: pipes, sockets and terminals go to the plugin as they
// are; a regular file, or another device, only through a pipe (or, for
// /dev/null, as a /dev/null of its own: TestOutputsDevNull).
func TestPassThrough(t *testing.T) {
	_, tty := stdiotest.OpenPTY(t)
	pw := pipe(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sock := os.NewFile(uintptr(fds[0]), "socket")
	defer sock.Close()
	unix.Close(fds[1])
	file, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for _, tc := range []struct {
		name string
		f    *os.File
		want bool
	}{
		{"pipe", pw, true},
		{"socket", sock, true},
		{"terminal", tty, true},
		{"regular file", file, false},
		{"/dev/null", null, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := PassThrough(tc.f)
			if err != nil || got != tc.want {
				t.Fatalf("PassThrough: %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// TestOutputsToAFile: a `>>log` stdout and stderr reach the plugin as a
// pipe (it could otherwise clear O_APPEND on the shared description and
// write over the log, or truncate it); what is written to the pipe is in
// the file, whole and in its order, once Wait returns, after what was
// there.
func TestOutputsToAFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name     string
		sameFile bool // 2>&1
	}{
		{"stdout and stderr one file", true},
		{"stdout and stderr apart", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			if err := os.WriteFile(path, []byte("before\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			stdout, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer stdout.Close()
			stderr := stdout
			errPath := path
			if !tc.sameFile {
				errPath = path + ".err"
				if stderr, err = os.OpenFile(errPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); err != nil {
					t.Fatal(err)
				}
				defer stderr.Close()
			}
			out, errOut, o, err := Outputs(stdout, stderr)
			if err != nil {
				t.Fatal(err)
			}
			if stdiotest.FileType(t, out) != unix.S_IFIFO || stdiotest.FileType(t, errOut) != unix.S_IFIFO {
				t.Fatal("the plugin gets the log file itself, not a pipe")
			}
			if tc.sameFile != (out == errOut) {
				t.Fatalf("one pipe for stdout and stderr: %v, want %v", out == errOut, tc.sameFile)
			}
			// More than a pipe holds, alternating streams, as the
			// plugin writes them.
			var wantOut, wantErr bytes.Buffer
			written := make(chan struct{})
			go func() {
				defer close(written)
				for i := range 2000 {
					w, want := out, &wantOut
					line := fmt.Sprintf("out %d %s\n", i, strings.Repeat("o", 100))
					if i%3 == 0 {
						w, line = errOut, fmt.Sprintf("err %d\n", i)
						if !tc.sameFile {
							want = &wantErr
						}
					}
					want.WriteString(line)
					if _, err := w.Write([]byte(line)); err != nil {
						t.Errorf("write: %v", err)
						return
					}
				}
			}()
			within(t, written, "writing through the pump")
			// The plugin's copies close with it; the caller's last.
			o.CloseWriters()
			waited := make(chan struct{})
			go func() {
				if err := o.Wait(); err != nil {
					t.Errorf("Wait: %v", err)
				}
				close(waited)
			}()
			within(t, waited, "Wait")
			got, _ := os.ReadFile(path)
			if want := "before\n" + wantOut.String(); string(got) != want {
				t.Errorf("the log has %d bytes, want %d: not all the output, or not in order", len(got), len(want))
			}
			if !tc.sameFile {
				if got, _ := os.ReadFile(errPath); string(got) != wantErr.String() {
					t.Errorf("the error log has %d bytes, want %d", len(got), wantErr.Len())
				}
			}
		})
	}
}

// TestOutputsPassThrough: a pipe, a socket or a terminal is handed over
// as it is, with nothing to wait for.
func TestOutputsPassThrough(t *testing.T) {
	_, tty := stdiotest.OpenPTY(t)
	pw := pipe(t)
	out, errOut, o, err := Outputs(pw, tty)
	if err != nil {
		t.Fatal(err)
	}
	if out != pw || errOut != tty || o.Pumped() {
		t.Fatalf("Outputs(pipe, terminal) = %v, %v, pumped %v; want them as they are", out, errOut, o.Pumped())
	}
	o.CloseWriters()
	if err := o.Wait(); err != nil {
		t.Fatal(err)
	}
}

// TestOutputsDevNull: /dev/null is not pumped (every byte of a chatty
// command would cross a pipe to be thrown away): the plugin gets a
// /dev/null of its own, so no file status flags are shared with the
// caller's, and it is closed with the pipes' write ends.
func TestOutputsDevNull(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	file, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	out, errOut, o, err := Outputs(null, file)
	if err != nil {
		t.Fatal(err)
	}
	if out == null || !isDevNull(out) {
		t.Fatalf("stdout /dev/null became %v; want a /dev/null of its own", out.Name())
	}
	fl, err := unix.FcntlInt(out.Fd(), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_APPEND != 0 {
		t.Fatalf("the plugin's /dev/null has flags %#x (%v); want its own, without the caller's O_APPEND", fl, err)
	}
	if _, err := out.Write([]byte("thrown away")); err != nil {
		t.Fatal(err)
	}
	if errOut == file {
		t.Fatal("the regular file was handed over, not pumped")
	}
	if !o.Pumped() {
		t.Fatal("the regular file is not pumped")
	}
	o.CloseWriters()
	if _, err := out.Write([]byte("x")); err == nil {
		t.Fatal("the plugin's /dev/null is still open after CloseWriters")
	}
	if err := o.Wait(); err != nil {
		t.Fatal(err)
	}
	// Alone, nothing is pumped.
	out, _, o, err = Outputs(null, nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.Pumped() || !isDevNull(out) {
		t.Fatalf("Outputs(/dev/null) pumped %v", o.Pumped())
	}
	o.CloseWriters()
}

// TestOutputsFailedFile: a file that fails a write (a full disk) drops
// the rest of its stream, as the plugin did, without blocking the writer,
// and Wait says so.
func TestOutputsFailedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	os.WriteFile(path, nil, 0o644)
	ro, err := os.Open(path) // read-only: every write fails
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	out, _, o, err := Outputs(ro, nil)
	if err != nil {
		t.Fatal(err)
	}
	written := make(chan struct{})
	go func() {
		defer close(written)
		out.Write(make([]byte, 1<<20)) // more than a pipe holds
	}()
	within(t, written, "a write to a pump whose file fails")
	o.CloseWriters()
	if err := o.Wait(); err == nil || !strings.Contains(err.Error(), "copy the command's output to") {
		t.Fatalf("Wait: %v, want the copy's failure", err)
	}
}

// readTTY reads what the next reader of the terminal gets, or fails the
// test when nothing comes.
func readTTY(t *testing.T, tty *os.File, want string) {
	t.Helper()
	got := make(chan string, 1)
	go func() {
		b := make([]byte, 64)
		n, _ := unix.Read(int(tty.Fd()), b)
		got <- string(b[:max(n, 0)])
	}()
	select {
	case s := <-got:
		if s != want {
			t.Fatalf("the terminal's next reader got %q, want %q", s, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the terminal's next reader got nothing after 5 s, want %q: the pump ate it", want)
	}
}

// TestInputLeavesTheTerminalWhenTheReaderIsGone: once the plugin's end
// of the pipe is closed (the command ended, the plugin exited), the pump
// reads nothing more from the terminal: a line typed then is the shell's
// (it read the line, failed to write it to the pipe and dropped it).
func TestInputLeavesTheTerminalWhenTheReaderIsGone(t *testing.T) {
	master, tty := stdiotest.OpenPTY(t)
	in, r, err := NewInput(tty)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { in.Run(); close(done) }()
	time.Sleep(50 * time.Millisecond) // the pump waits for input
	r.Close()
	time.Sleep(50 * time.Millisecond)
	if _, err := master.Write([]byte("next\n")); err != nil {
		t.Fatal(err)
	}
	readTTY(t, tty, "next\n")
	within(t, done, "the pump after its reader went away")
}

// TestInputAnotherReaderTookIt: another reader of the terminal (`run ...
// | less` reads it too) takes the line poll announced before the pump
// reads: the pump does not block in its read (which would then take the
// next line typed, after the command ended), and Stop ends it. The
// caller's description keeps its flags (blocking).
func TestInputAnotherReaderTookIt(t *testing.T) {
	master, tty := stdiotest.OpenPTY(t)
	other, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", tty.Fd()), os.O_RDONLY|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	in, r, err := NewInput(tty)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if in.own == nil {
		t.Fatal("the pump reads the caller's description of the terminal")
	}
	took := make(chan string, 1)
	in.afterPoll = func() {
		b := make([]byte, 64)
		n, _ := other.Read(b)
		took <- string(b[:max(n, 0)])
		in.afterPoll = nil
	}
	done := make(chan struct{})
	go func() { in.Run(); close(done) }()
	if _, err := master.Write([]byte("for less\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-took:
		if got != "for less\n" {
			t.Fatalf("the other reader got %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the pump never polled the typed line")
	}
	time.Sleep(50 * time.Millisecond) // the pump is back in poll, not in read
	in.Stop()
	within(t, done, "the pump after another reader took its line, and Stop")
	if _, err := master.Write([]byte("next\n")); err != nil {
		t.Fatal(err)
	}
	readTTY(t, tty, "next\n")
	if fl, err := unix.FcntlInt(tty.Fd(), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("the caller's terminal has flags %#x (%v); want them as they were", fl, err)
	}
}

// TestInputStop: after Stop (the command ended) the pump reads nothing
// more from the terminal, although the plugin's end is still open, and
// the command's input ends.
func TestInputStop(t *testing.T) {
	master, tty := stdiotest.OpenPTY(t)
	in, r, err := NewInput(tty)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := make(chan struct{})
	go func() { in.Run(); close(done) }()
	time.Sleep(50 * time.Millisecond) // the pump waits for input
	in.Stop()
	in.Stop() // twice is once
	within(t, done, "the pump after Stop")
	if _, err := master.Write([]byte("next\n")); err != nil {
		t.Fatal(err)
	}
	readTTY(t, tty, "next\n")
	if n, err := r.Read(make([]byte, 8)); err != io.EOF {
		t.Fatalf("the pipe reads %d, %v after Stop, want EOF", n, err)
	}
}

// TestInputEnds: the command's input ends where the caller's does: ^D on
// a terminal in its normal mode (--tty off), a pipe's writer gone,
// /dev/null; what came before reaches the pipe.
func TestInputEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		src  func(t *testing.T) *os.File // after the input was written
		want string
	}{
		{"terminal ^D", func(t *testing.T) *os.File {
			master, tty := stdiotest.OpenPTY(t)
			if _, err := master.Write([]byte("line\n\x04")); err != nil {
				t.Fatal(err)
			}
			return tty
		}, "line\n"},
		{"pipe", func(t *testing.T) *os.File {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			w.Write([]byte("piped"))
			w.Close()
			return r
		}, "piped"},
		{"/dev/null", func(t *testing.T) *os.File {
			f, err := os.Open(os.DevNull)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			return f
		}, ""},
		{"none", func(t *testing.T) *os.File { return nil }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in, r, err := NewInput(tc.src(t))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			done := make(chan struct{})
			go func() { in.Run(); close(done) }()
			defer within(t, done, "the pump at its input's end")
			got := make(chan string, 1)
			go func() { b, _ := io.ReadAll(r); got <- string(b) }()
			select {
			case s := <-got:
				if s != tc.want {
					t.Fatalf("the pipe got %q, want %q then its end", s, tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the pipe did not end")
			}
		})
	}
}

// TestInputClose: Close instead of Run (the command never started) ends
// the command's input; after Run it closes nothing twice.
func TestInputClose(t *testing.T) {
	for _, afterRun := range []bool{false, true} {
		_, tty := stdiotest.OpenPTY(t)
		in, r, err := NewInput(tty)
		if err != nil {
			t.Fatal(err)
		}
		if afterRun {
			done := make(chan struct{})
			go func() { in.Run(); close(done) }()
			in.Stop()
			within(t, done, "the pump after Stop")
		}
		in.Close()
		in.Close()
		if n, err := r.Read(make([]byte, 8)); err != io.EOF {
			t.Fatalf("after Close (after Run: %v) the pipe reads %d, %v, want EOF", afterRun, n, err)
		}
		r.Close()
	}
}
