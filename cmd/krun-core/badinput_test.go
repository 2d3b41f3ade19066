package main

// Bad input on the command line gets one line and a non-zero exit, and
// leaves nothing behind (from a review of every command).

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runKrunCore runs bin/krun-core with args and returns stdout, stderr and the
// exit status (killed after 60 s: a hang is a failure too).
func runKrunCore(t *testing.T, bin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "krun-core"), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	cmd.Wait()
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

func checkOneLine(t *testing.T, what, stderr string, code int) {
	t.Helper()
	if code == 0 {
		t.Errorf("%s: exit 0, want non-zero", what)
	}
	if n := strings.Count(strings.TrimRight(stderr, "\n"), "\n") + 1; n != 1 || strings.Contains(stderr, "goroutine") {
		t.Errorf("%s: stderr has %d lines, want one:\n%s", what, n, stderr)
	}
}

// `krun-core img import ... OUT` killed by SIGHUP (the terminal or ssh
// session closes) removes OUT, as SIGINT and SIGTERM do. Before the fix
// SIGHUP was not caught and a half-written OUT stayed, looking complete
// for a raw image (from review).
func TestHangupDuringImportLeavesNoOutput(t *testing.T) {
	bin := buildServeBinaries(t, "img")
	dir := t.TempDir()
	out := filepath.Join(dir, "out.raw")
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bin, "krun-core"), "img", "import", "--format", "raw", "--max-size", "64M", out)
	cmd.Stdin = pr
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	chunk := bytes.Repeat([]byte{0x5a}, 1<<20)
	for i := 0; i < 4; i++ {
		if _, err := pw.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	// Wait until the plugin has written some of it.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if st, err := os.Stat(out); err == nil && st.Size() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("import wrote nothing: %s", errb.String())
		}
	}
	cmd.Process.Signal(syscall.SIGHUP)
	cmd.Wait()
	pw.Close()
	time.Sleep(500 * time.Millisecond) // the orphaned plugin may still be writing
	if st, err := os.Stat(out); err == nil {
		t.Errorf("img import ended by SIGHUP (exit %d) left %s behind (%d bytes, of 4 MiB sent and more to come)",
			cmd.ProcessState.ExitCode(), out, st.Size())
	}
}

// An error whose text holds a newline (a file name with one) is folded
// onto one line, reason included. Before the fix img's and serve's
// one-line helpers cut it at the newline: `krun-core img info -f raw
// $'bad\nname.img'` printed "krun-core img info: image: open bad" (from
// review).
func TestNewlineInPathKeepsTheReason(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "bad\nname.img")
	var out, errb bytes.Buffer
	code := dispatch([]string{"img", "info", "-f", "raw", name}, &out, &errb)
	if code == 0 || !strings.Contains(errb.String(), "no such file or directory") || strings.Count(errb.String(), "\n") != 1 {
		t.Errorf("img info on a missing file with a newline in its name: exit %d, stderr %q: want one line with the reason", code, errb.String())
	}
	if testing.Short() {
		return
	}
	bin := buildServeBinaries(t, "blk-raw")
	_, stderr, code := runKrunCore(t, bin, "serve", "--socket", filepath.Join(dir, "s.sock"), "--disk", "path="+name+",format=raw")
	if code == 0 || !strings.Contains(stderr, "no such file or directory") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("serve on a missing file with a newline in its name: exit %d, stderr %q: want one line with the reason", code, stderr)
	}
}

// `krun-core img convert ... --cluster-size 3` (or 1000, or 4M) names the
// bad cluster size as img create does. Before the fix it said "virtual
// size N is too large for qcow2 with this cluster size (at most 0; use a
// larger --cluster-size)" (from review).
func TestConvertBadClusterSizeNamed(t *testing.T) {
	bin := buildServeBinaries(t, "img")
	dir := t.TempDir()
	in := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(in, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, cs := range []string{"3", "1000", "4M"} {
		out := filepath.Join(dir, "out-"+cs+".qcow2")
		_, stderr, code := runKrunCore(t, bin, "img", "convert", "-f", "raw", "-O", "qcow2", "--cluster-size", cs, in, out)
		checkOneLine(t, "convert --cluster-size "+cs, stderr, code)
		if !strings.Contains(stderr, "cluster size") || strings.Contains(stderr, "too large") {
			t.Errorf("convert --cluster-size %s: %q: want the cluster size named as invalid", cs, stderr)
		}
		if _, err := os.Lstat(out); err == nil {
			t.Errorf("convert --cluster-size %s left %s", cs, out)
		}
	}
}

// `krun-core help frob` and `krun-core img help frob` are bad input (one
// line, exit 1), as `krun-core frob` and `krun-core img frob` are; they
// printed the general page and exited 0 (from review).
func TestHelpUnknownCommand(t *testing.T) {
	for _, args := range [][]string{{"help", "frob"}, {"img", "help", "frob"}} {
		var out, errb bytes.Buffer
		code := dispatch(args, &out, &errb)
		if code == 0 {
			t.Errorf("%q: exit 0 with the general page, want an unknown-command line and exit 1", args)
		}
	}
}

// TestServeWrongFormatIsOneLine: `krun-core serve --disk
// path=RAWFILE,format=qcow2` (the wrong format) is refused in one line that
// names the image once. Before the fix the plugin's own "configure
// failed" ERROR line repeated the reason, and the line named the image
// twice ("image "X": image X: invalid qcow2 image"; from review).
func TestServeWrongFormatIsOneLine(t *testing.T) {
	bin := buildServeBinaries(t, "blk-qcow2")
	dir := t.TempDir()
	img := filepath.Join(dir, "raw.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	_, stderr, code := runKrunCore(t, bin, "serve", "--socket", sock, "--disk", "path="+img+",format=qcow2")
	checkOneLine(t, "serve --disk format=qcow2 on a raw file", stderr, code)
	if n := strings.Count(stderr, img); n != 1 {
		t.Errorf("the image is named %d times: %q", n, stderr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Errorf("socket %s left behind", sock)
	}
}
