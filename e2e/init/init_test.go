package kruninit_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestOutputEnvLimitsExit: stdout and stderr arrive as their own frames,
// the environment, working directory and resource limits are the
// config's, a file written under / appears in the host directory, and the
// exit status is the command's.
func TestOutputEnvLimitsExit(t *testing.T) {
	cfg := initconfig.New("sh", "-c", `echo out; echo err >&2; echo "pwd=$(pwd)"; echo "foo=$FOO"; `+
		`echo "nofile=$(ulimit -n):$(ulimit -Hn)"; echo "host=$(hostname)"; echo "pid1=$(cat /proc/1/comm)"; `+
		`echo "from the guest" > /written-by-guest; exit 7`)
	cfg.Env = append(cfg.Env, "FOO=bar baz")
	cfg.Workdir = "/srv"
	cfg.Hostname = "guesthost"
	cfg.Rlimits = []initconfig.Rlimit{{Type: "RLIMIT_NOFILE", Soft: 321, Hard: 654}}
	o := run(t, guest{cfg: cfg})
	o.checkFinished(t, 7)
	for _, want := range []string{"out\n", "pwd=/srv\n", "foo=bar baz\n", "nofile=321:654\n", "host=guesthost\n", "pid1=init\n"} {
		if !strings.Contains(o.stdout, want) {
			t.Errorf("stdout lacks %q: %q", want, o.stdout)
		}
	}
	if o.stderr != "err\n" {
		t.Errorf("stderr %q, want %q", o.stderr, "err\n")
	}
	if !bytes.Equal(o.milestones, []byte{initconfig.MilestoneInit, initconfig.MilestoneExec}) {
		t.Errorf("milestones %v, want [1 2]", o.milestones)
	}
	b, err := os.ReadFile(filepath.Join(o.root, "written-by-guest"))
	if err != nil || string(b) != "from the guest\n" {
		t.Errorf("file written by the guest: %q, %v", b, err)
	}
	if strings.Contains(o.stdout, "Linux version") || strings.Contains(o.stdout, "krun-init:") {
		t.Errorf("kernel or init messages on stdout: %q", o.stdout)
	}
}

// TestKilledBySignal: a command killed by SIGKILL reports 128+9.
func TestKilledBySignal(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("sh", "-c", "echo before; kill -9 $$; echo after")})
	o.checkFinished(t, 137)
	if o.stdout != "before\n" {
		t.Errorf("stdout %q", o.stdout)
	}
}

// TestStdinPipe: STDIN frames and STDIN_EOF feed a pipe.
func TestStdinPipe(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("wc", "-l"), session: func(t *testing.T, h *host) {
		if err := h.w.WriteData(stdioframe.Stdin, []byte("one\ntw")); err != nil {
			t.Error(err)
		}
		if err := h.w.WriteData(stdioframe.Stdin, []byte("o\n")); err != nil {
			t.Error(err)
		}
		if err := h.w.WriteFrame(stdioframe.StdinEOF, nil); err != nil {
			t.Error(err)
		}
	}})
	o.checkFinished(t, 0)
	if strings.TrimSpace(o.stdout) != "2" {
		t.Errorf("wc -l printed %q, want 2", o.stdout)
	}
}

// TestSignalFrame: a SIGNAL frame reaches the command.
func TestSignalFrame(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("sh", "-c", `trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done`),
		session: func(t *testing.T, h *host) {
			h.waitStdout(t, "ready\n", 2*time.Minute)
			if err := h.w.WriteSignal(15); err != nil {
				t.Error(err)
			}
		}})
	o.checkFinished(t, 42)
	if !strings.Contains(o.stdout, "got TERM") {
		t.Errorf("stdout %q", o.stdout)
	}
}

// TestCommandNotFound: 127 with a message on stderr; the command never
// started, so there is no second milestone.
func TestCommandNotFound(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("no-such-command", "x")})
	o.checkFinished(t, 127)
	if !strings.Contains(o.stderr, "no-such-command") || !strings.Contains(o.stderr, "not found") {
		t.Errorf("stderr %q", o.stderr)
	}
	if !bytes.Equal(o.milestones, []byte{initconfig.MilestoneInit}) {
		t.Errorf("milestones %v, want [1]", o.milestones)
	}
}

// TestTTY: the command gets /dev/pts/0 as its controlling terminal, the
// config's window size, and WINSIZE frames change it.
func TestTTY(t *testing.T) {
	cfg := initconfig.New("sh", "-c", `tty; stty size; read x; echo "line=$x"; stty size`)
	cfg.TTY = true
	cfg.Winsize = &initconfig.Winsize{Rows: 33, Cols: 97}
	cfg.Env = append(cfg.Env, "TERM=xterm")
	o := run(t, guest{cfg: cfg, session: func(t *testing.T, h *host) {
		h.waitStdout(t, "33 97", 2*time.Minute)
		if err := h.w.WriteWinsize(50, 150); err != nil {
			t.Error(err)
		}
		if err := h.w.WriteData(stdioframe.Stdin, []byte("go\r")); err != nil {
			t.Error(err)
		}
	}})
	o.checkFinished(t, 0)
	// A terminal turns \n into \r\n and echoes the input.
	for _, want := range []string{"/dev/pts/0\r\n", "33 97\r\n", "go\r\n", "line=go\r\n", "50 150\r\n"} {
		if !strings.Contains(o.stdout, want) {
			t.Errorf("stdout lacks %q: %q", want, o.stdout)
		}
	}
	if o.stderr != "" {
		t.Errorf("stderr %q (a terminal has only one output)", o.stderr)
	}
}
