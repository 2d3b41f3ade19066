package pluginhost

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
)

// TestSockDirFixedWidth (found in review, helper-143): os.MkdirTemp's
// suffix has 1 to 10 digits, so a $TMPDIR near the unix socket limit let
// a plugin start about every other time and failed the rest ("socket
// directory ... is too long", serve --disk with TMPDIR of 20 bytes). The
// name's width is fixed now: the same base fits every time or never.
func TestSockDirFixedWidth(t *testing.T) {
	base := t.TempDir()
	want := -1
	for i := range 60 {
		dir, lock, err := newSockDir(base, "blk-qcow2", hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		lock.Close()
		if want < 0 {
			want = len(dir)
		}
		if len(dir) != want || !isSockDirName(filepath.Base(dir)) {
			t.Fatalf("draw %d: %s (%d bytes), want a KIND-DIGITS name of %d bytes every time", i, dir, len(dir), want)
		}
		os.Remove(dir)
	}
	if parent, ok := sockParent(base); ok && want != len(parent)+len("/blk-qcow2-")+sockDirDigits {
		t.Errorf("socket directory of %d bytes, want %d", want, len(parent)+len("/blk-qcow2-")+sockDirDigits)
	}
}

// TestSocketBaseTooLong: a base one byte too long for the plugin's socket
// path fails every launch with one line that names the base and how long
// it may be; one byte shorter the path fits.
func TestSocketBaseTooLong(t *testing.T) {
	root := shortTempDir(t)
	uidPart := len(fmt.Sprintf("/krun.%d/test-", os.Geteuid())) + sockDirDigits
	room := 107 - 39 - 18 - uidPart                          // the longest base that fits
	long := root + "/" + strings.Repeat("d", room-len(root)) // room+1 bytes
	if err := os.MkdirAll(long, 0o700); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		cfg := testConfig(t, "ok")
		cfg.SocketBaseDir = long
		p, err := Launch(cfg)
		if err == nil {
			p.Kill()
			t.Fatalf("a base of %d bytes was used; at most %d fit", len(long), room)
		}
		if msg := err.Error(); !strings.Contains(msg, fmt.Sprintf("has %d bytes, at most %d fit", len(long), room)) || strings.Contains(msg, "\n") {
			t.Fatalf("error %q, want one line naming the base's length and the room", msg)
		}
	}
	if ents := leftSockDirs(long); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
	fits := long[:len(long)-1]
	if err := os.MkdirAll(fits, 0o700); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		cfg := testConfig(t, "ok")
		cfg.SocketBaseDir = fits
		p, err := Launch(cfg)
		if err != nil {
			t.Fatalf("a base of %d bytes, which fits: %v", len(fits), err)
		}
		p.Kill()
	}
}

// TestTmpdirUnusable: with no SocketBaseDir the socket directory is made
// in $TMPDIR; one that is missing says so, and what to do.
func TestTmpdirUnusable(t *testing.T) {
	cfg := testConfig(t, "ok")
	cfg.SocketBaseDir = ""
	t.Setenv("TMPDIR", filepath.Join(t.TempDir(), "missing"))
	p, err := Launch(cfg)
	if err == nil {
		p.Kill()
		t.Fatal("launched with a missing $TMPDIR")
	}
	if msg := err.Error(); !strings.Contains(msg, "$TMPDIR") || !strings.Contains(msg, "set TMPDIR") {
		t.Errorf("error %q, want one naming $TMPDIR and what to do", msg)
	}
}

// TestThreadHint: a plugin that died of the Go runtime's newosproc (a low
// RLIMIT_NPROC or pids.max) is reported with the limit to raise, not only
// "fatal error: newosproc" after a page of runtime stack.
func TestThreadHint(t *testing.T) {
	for _, c := range []struct {
		stderr string
		hint   bool
	}{
		{"runtime: failed to create new OS thread (have 2 already; errno=11)\nruntime: may need to increase max user processes (ulimit -u)\nfatal error: newosproc\n", true},
		{"fatal error: newosproc\n\nruntime stack:\n", true},
		{"panic: boom\n", false},
	} {
		p := &Process{kind: "thr", stderr: &TailBuffer{}, sandboxed: true}
		p.stderr.Write([]byte(c.stderr))
		got := p.detail(nil)
		if has := strings.Contains(got, "RLIMIT_NPROC") && strings.Contains(got, "pids.max"); has != c.hint {
			t.Errorf("detail %q for %q: hint %v, want %v", got, c.stderr, has, c.hint)
		}
	}
}
