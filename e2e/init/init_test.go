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
	"github.com/krun-core/krun-core/internal/vmtest"
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

// TestKilledBySignal: a command killed by SIGKILL reports 128+9; it runs
// with the configured uid, gid and supplementary groups.
func TestKilledBySignal(t *testing.T) {
	cfg := initconfig.New("sh", "-c", `echo "ids=$(id -u):$(id -g):$(id -G)"; kill -9 $$; echo after`)
	cfg.UID, cfg.GID, cfg.AdditionalGIDs = 1000, 1001, []uint32{10, 20}
	o := run(t, guest{cfg: cfg})
	o.checkFinished(t, 137)
	if o.stdout != "ids=1000:1001:1001 10 20\n" {
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

// TestDevLinks: /dev/stdout and its kin exist, as on any system with udev
// and under runc: devtmpfs lacks them, and echo >/dev/stdout made a
// regular file in /dev, so the output never reached the host.
func TestDevLinks(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("sh", "-c", `echo out >/dev/stdout; echo err >/dev/stderr; read x </dev/stdin; echo "in=$x"; ls /dev/fd/ >/dev/null && echo fd=ok`),
		session: func(t *testing.T, h *host) {
			h.w.WriteData(stdioframe.Stdin, []byte("hi\n"))
			h.w.WriteFrame(stdioframe.StdinEOF, nil)
		}})
	o.checkFinished(t, 0)
	if o.stdout != "out\nin=hi\nfd=ok\n" || o.stderr != "err\n" {
		t.Errorf("stdout %q, stderr %q", o.stdout, o.stderr)
	}
}

// TestStdioOwnedByUser: a command run as another user can open its own
// standard I/O again (/dev/stdout, /proc/self/fd/N: what images that log
// to /dev/stdout do), as under runc, which hands the descriptors to the
// user: pipes and the terminal are made by root with mode 0600 and 0620.
func TestStdioOwnedByUser(t *testing.T) {
	cfg := initconfig.New("sh", "-c", `echo out >/dev/stdout && echo err >/dev/stderr && echo ok`)
	cfg.UID, cfg.GID = 1000, 1000
	o := run(t, guest{cfg: cfg})
	o.checkFinished(t, 0)
	if o.stdout != "out\nok\n" || o.stderr != "err\n" {
		t.Errorf("stdout %q, stderr %q", o.stdout, o.stderr)
	}
}

// TestSignalBeforeStart: a SIGNAL sent while the guest still boots (the
// host writes it as soon as it is connected) reaches the command once it
// has started; it was dropped, and the command ran to its end.
func TestSignalBeforeStart(t *testing.T) {
	o := run(t, guest{cfg: initconfig.New("sleep", "20"),
		session: func(t *testing.T, h *host) {
			if err := h.w.WriteSignal(15); err != nil {
				t.Error(err)
			}
		}})
	o.checkFinished(t, 128+15)
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
		h.waitStdout(t, "33 97\r\n", 2*time.Minute)
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

// TestBigOutputWithOrphan: a megabyte of binary output arrives byte for
// byte (split into 64 KiB frames), while a background process the command
// left behind still holds its stdout: init reaps the command, drains what
// is there and does not wait for the orphan.
func TestBigOutputWithOrphan(t *testing.T) {
	a := vmtest.Require(t)
	root := makeRoot(t, a.Busybox)
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i*7 + i>>11)
	}
	if err := os.WriteFile(filepath.Join(root, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	o := run(t, guest{root: root, cfg: initconfig.New("sh", "-c", "sleep 600 & cat /big; exit 3")})
	o.checkFinished(t, 3)
	if !bytes.Equal([]byte(o.stdout), big) {
		t.Errorf("stdout: %d bytes, want the %d bytes of /big", len(o.stdout), len(big))
	}
}

// TestInitFailure: a failure of init itself (here a share that is not
// attached) is status 125 with the reason on stderr.
func TestInitFailure(t *testing.T) {
	cfg := initconfig.New("true")
	cfg.Mounts = []initconfig.Mount{{Type: "virtiofs", Source: "absent", Target: "/data"}}
	o := run(t, guest{cfg: cfg})
	o.checkFinished(t, 125)
	if !strings.HasPrefix(o.stderr, "krun-init: ") || !strings.Contains(o.stderr, `share "absent"`) {
		t.Errorf("stderr %q", o.stderr)
	}
}

// TestReadOnlyRootAndShare: a read-only root stays unwritten (its /tmp is
// a tmpfs of the guest's), and an extra share from the config's mounts is
// mounted inside it, writable (its mount point must exist: a read-only
// root cannot get a new directory).
func TestReadOnlyRootAndShare(t *testing.T) {
	root := makeRoot(t, vmtest.Require(t).Busybox)
	if err := os.Mkdir(filepath.Join(root, "srv", "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	if err := os.WriteFile(filepath.Join(data, "from-host"), []byte("host data\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := initconfig.New("sh", "-c", `touch /x 2>/dev/null && echo root=rw || echo root=ro; `+
		`echo tmp > /tmp/t && echo tmp=ok; cat /srv/data/from-host; echo guest > /srv/data/from-guest; cat /tmp/in/tmpfs/from-host`)
	cfg.Root.ReadOnly = true
	// The second share's mount point is made in krun-init's /tmp, a tmpfs
	// even in a read-only root.
	cfg.Mounts = []initconfig.Mount{{Type: "virtiofs", Source: "data", Target: "/srv/data"},
		{Type: "virtiofs", Source: "again", Target: "/tmp/in/tmpfs", ReadOnly: true}}
	o := run(t, guest{cfg: cfg, root: root, shares: map[string]string{"data": data, "again": data}})
	o.checkFinished(t, 0)
	if o.stdout != "root=ro\ntmp=ok\nhost data\nhost data\n" {
		t.Errorf("stdout %q", o.stdout)
	}
	if b, err := os.ReadFile(filepath.Join(data, "from-guest")); err != nil || string(b) != "guest\n" {
		t.Errorf("file the guest wrote to the share: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(o.root, "x")); err == nil {
		t.Error("the guest wrote to its read-only root")
	}
}

// TestPowerOff: with no device on the exit port (the write goes nowhere),
// init powers the machine off after reporting, and QEMU exits 0.
func TestPowerOff(t *testing.T) {
	cfg := initconfig.New("sh", "-c", "echo bye; exit 5")
	cfg.Ports = &initconfig.Ports{Milestone: milestonePort, Exit: 0x505}
	o := run(t, guest{cfg: cfg})
	if o.qemuExit != 0 {
		t.Errorf("QEMU exit code %d, want 0 (a power-off)", o.qemuExit)
	}
	if o.exitFrame != 5 || !o.closeReq || o.stdout != "bye\n" {
		t.Errorf("EXIT frame %d, CLOSE_REQ %v, stdout %q", o.exitFrame, o.closeReq, o.stdout)
	}
}

// TestUser: run's --user is resolved in the root: a name gives the uid,
// primary group and home of /etc/passwd and, without GROUP, the
// supplementary groups of /etc/group that list the user; GROUP replaces
// the primary group and sheds the others; a number not in /etc/passwd runs with group 0 and home /; an
// unknown name fails with one line and status 125 before the command.
func TestUser(t *testing.T) {
	root := makeRoot(t, vmtest.Require(t).Busybox)
	passwd := "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
	group := "root:x:0:\nusers:x:100:alice,bob\nstaff:x:50:carol\nwheel:x:10:alice\nalice:x:1000:alice\n"
	for name, content := range map[string]string{"etc/passwd": passwd, "etc/group": group} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		user, want string
		status     int
	}{
		{"alice", "ids=1000:1000:1000 10 100 home=/home/alice\n", 0}, // the kernel sorts the groups
		{"alice:staff", "ids=1000:50:50 home=/home/alice\n", 0},      // GROUP sheds the others
		{"4242", "ids=4242:0:0 home=/\n", 0},
		{"mallory", "", 125},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			cfg := initconfig.New("sh", "-c", `echo "ids=$(id -u):$(id -g):$(id -G) home=$HOME"`)
			cfg.Env = []string{"PATH=" + initconfig.DefaultPath} // krun-core drops its default HOME with --user
			cfg.User = tt.user
			o := run(t, guest{cfg: cfg, root: root})
			o.checkFinished(t, tt.status)
			if o.stdout != tt.want {
				t.Errorf("stdout %q, want %q", o.stdout, tt.want)
			}
			if tt.status != 0 && (!strings.HasPrefix(o.stderr, "krun-init: --user mallory: ") || !strings.Contains(o.stderr, `no user "mallory"`) || strings.Count(o.stderr, "\n") != 1) {
				t.Errorf("stderr %q, want one line naming the unknown user", o.stderr)
			}
		})
	}
}
