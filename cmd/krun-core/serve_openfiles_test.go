package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/sandbox"
)

// TestServeShareOpenFiles: a share's plugin gets the RLIMIT_NOFILE its
// --fs option open-files= names (soft and hard), and the fs kind's
// default without it; krun-core's own hard limit caps either (the
// launcher warns then). Read from /proc/PID/limits of the running plugin.
func TestServeShareOpenFiles(t *testing.T) {
	bin := buildServeBinaries(t, "fs-virtio")
	var own unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &own); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, c := range []struct {
		name, opt string
		want      uint64
	}{
		{"default", "", sandbox.FSOpenFiles},
		{"lower", ",open-files=5000", 5000},
		{"higher", ",open-files=18000", 18000},
	} {
		t.Run(c.name, func(t *testing.T) {
			share := filepath.Join(dir, c.name)
			if err := os.Mkdir(share, 0o755); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, c.name+".sock")
			s := startServe(t, bin, "--socket", sock, "--fs", "path="+share+",tag=t"+c.opt)
			waitSocket(t, s, sock)
			pid, err := waitPlugin(s, 1, 20*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			want := strconv.FormatUint(min(c.want, own.Max), 10)
			soft, hard := procLimit(t, pid, "Max open files")
			if soft != want || hard != want {
				t.Errorf("plugin pid %d: Max open files %s %s, want %s (krun-core's own hard limit %d)", pid, soft, hard, want, own.Max)
			}
		})
	}
	// Without the sandbox there is no limit of its own to set: said, not
	// ignored in silence.
	share := filepath.Join(dir, "off")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "off.sock")
	s := startServe(t, bin, "--socket", sock, "--sandbox", "off", "--fs", "path="+share+",tag=t,open-files=5000")
	waitSocket(t, s, sock)
	if want := "warning: open-files= is the sandbox's limit: with --sandbox=off the plugin has krun-core's own"; !strings.Contains(s.log(), want) {
		t.Errorf("serve --sandbox off with open-files= does not say %q:\n%s", want, s.log())
	}
}

// procLimit returns the soft and hard values of the line of
// /proc/PID/limits that starts with name.
func procLimit(t *testing.T, pid int, name string) (soft, hard string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(ln, name); ok {
			if f := strings.Fields(rest); len(f) >= 2 {
				return f[0], f[1]
			}
		}
	}
	t.Fatalf("no %q in /proc/%d/limits:\n%s", name, pid, b)
	return "", ""
}
