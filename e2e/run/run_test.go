// Package run_test is the end-to-end test of `krun-core run --root DIR --
// CMD`: a busybox root directory on the host, the command run in a microVM
// whose root is that directory (served by krun-plugin-fs-virtio), its
// standard I/O through krun-plugin-console and krun-init, its exit status
// passed through. Where this host's KVM cannot boot a stock kernel it runs
// inside a QEMU TCG guest with nested SVM.
package run_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/internal/vmtest"
)

var bins = vmtest.BinSet{Name: "run", Pkgs: map[string]string{
	"krun-core":             "github.com/krun-core/krun-core/cmd/krun-core",
	"krun-init":             "github.com/krun-core/krun-core/guest/init",
	"krun-plugin-fs-virtio": "github.com/krun-core/krun-core/plugins/fs-virtio",
	"krun-plugin-console":   "github.com/krun-core/krun-core/plugins/console",
	"krun-plugin-net-passt": "github.com/krun-core/krun-core/plugins/net-passt",
	"ptyrun":                "github.com/krun-core/krun-core/e2e/run/internal/ptyrun",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// innerModules are what krun-core run --root needs from the kernel.
var innerModules = []string{"virtio_mmio", "virtiofs", "virtio_console", "virtio_net"}

// rootSetup makes /r in the outer guest: a root directory of busybox and
// its applets (absolute links to /bin/busybox, which resolve inside the
// root).
const rootSetup = `
mkdir -p /r/bin /r/tmp /r/etc /r/root /r/proc /r/sys /r/dev /r/run
cp /bin/busybox /r/bin/busybox
for applet in $(/r/bin/busybox --list); do
	[ "$applet" = busybox ] || ln -s /bin/busybox /r/bin/$applet
done
# krun-core runs as root here, so its plugins run as nobody:nogroup, and
# this outer root (an initramfs on Debian 6.1) has no ID-mapped mounts:
# krun-core warns and hands over the plain directory, which must be theirs.
chown 65534:65534 /r
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
# kr NAME STDIN ARGS...: krun-core run ARGS with stdin from STDIN, stdout in
# /tmp/NAME.out and stderr in /tmp/NAME.err; its status in $rc. A run that
# makes no progress is a nested hang. $KR_WRAP (ptyrun ROWS COLS) runs it
# on a terminal. --handshake-timeout: this guest's clock can run many times
# faster than the host's when it booted on a loaded machine, so a plugin's
# 60 s handshake deadline could be a few seconds (e2e/net, CI run 22).
kr() {
	name=$1 in=$2
	shift 2
	$KR_WRAP krun-core run --handshake-timeout 10m --kernel $KERNEL --plugin-dir /bin --memory 256M --boot-timeout 120 "$@" <"$in" >/tmp/$name.out 2>/tmp/$name.err &
	p=$!
	i=0
	while kill -0 $p 2>/dev/null; do
		i=$((i+1))
		if [ $i -gt 480 ]; then
			kill -9 $p
			sed "s/^/$name err| /" /tmp/$name.err
			e2e_nested_hang "$name"
		fi
		sleep 0.5
	done
	rc=0
	wait $p || rc=$?
	head -c 2000 /tmp/$name.out | sed "s/^/$name out| /"
	head -c 2000 /tmp/$name.err | tr -c '[:print:]\n' '.' | sed "s/^/$name err| /"
	echo "$name rc=$rc"
	if grep -q 'boot watchdog' /tmp/$name.err; then e2e_nested_hang "$name never started"; fi
	inner_rebooted $name
	return 0
}
# inner_rebooted NAME: an inner guest that rebooted before its command
# reported (an inner kernel crash: seen once in many runs under TCG's
# nested SVM, never with KVM) is retried like a nested hang; NestedKVM
# runs the outer VM once more, and a second such crash fails the test.
inner_rebooted() {
	if grep -q 'the guest ended (reboot) without reporting' /tmp/$1.err; then
		e2e_nested_hang "$1: the inner guest rebooted before its command reported"
	fi
}
`

// runScript is the outer guest's part of TestRun.
const runScript = `
kr basic /dev/null --root /r -- /bin/sh -c 'echo out; echo err >&2; exit 7'
[ "$rc" = 7 ] || e2e_fail "basic: exit $rc, want 7"
[ "$(cat /tmp/basic.out)" = out ] || e2e_fail "basic: stdout is not exactly 'out'"
[ "$(cat /tmp/basic.err)" = err ] || e2e_fail "basic: stderr is not exactly 'err'"

kr killed /dev/null --root /r -- /bin/sh -c 'kill -9 $$'
[ "$rc" = 137 ] || e2e_fail "killed: exit $rc, want 137"

# A guest that ends without reporting a status (its kernel panics, and
# panic=-1 reboots it): the error names the reason and the last lines of
# the console (quiet, so only the kernel's errors) show why. Not through
# kr: an inner guest's reboot is what this run is about.
rc=0
e2e_bounded 240 /tmp/panic.log krun-core run --handshake-timeout 10m --kernel $KERNEL --plugin-dir /bin --memory 256M --boot-timeout 120 --root /r -- \
	/bin/sh -c 'echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger' || rc=$?
sed 's/^/panic| /' /tmp/panic.log | tail -50
[ "$rc" = 125 ] || e2e_fail "panic: exit $rc, want 125"
tail -1 /tmp/panic.log | grep -q 'the guest ended (reboot) without reporting' || e2e_fail "panic: the last line does not say the guest rebooted"
grep -q "the last lines of the guest's console" /tmp/panic.log || e2e_fail "panic: no console lines"
grep -q '^  guest| .*Kernel panic' /tmp/panic.log || e2e_fail "panic: the console lines lack the kernel's panic"

# One run (every inner boot costs seconds under nested TCG): environment,
# working directory, limits, host name, piped stdin, files written under /,
# and 2 MiB of random bytes through stderr.
dd if=/dev/urandom of=/tmp/blob bs=64k count=32 2>/dev/null
cp /tmp/blob /r/blob
printf 'a\nb\n' >/tmp/two-lines
kr combo /tmp/two-lines --root /r --env FOO=bar --workdir /tmp --rlimit nofile=100:200 --hostname box -- \
	/bin/sh -c 'echo "$FOO"; pwd; ulimit -n; ulimit -Hn; hostname; wc -l; echo written-in-the-guest >/hello; mkdir -p /made/here; cat /blob >&2'
[ "$rc" = 0 ] || e2e_fail "combo: exit $rc"
[ "$(tr '\n' ' ' </tmp/combo.out | tr -s ' ')" = "bar /tmp 100 200 box 2 " ] || e2e_fail "combo: got '$(tr '\n' ' ' </tmp/combo.out)'"
[ "$(cat /r/hello)" = written-in-the-guest ] || e2e_fail "combo: /hello is not on the host"
[ -d /r/made/here ] || e2e_fail "combo: the guest's directory is not on the host"
cmp -s /tmp/blob /tmp/combo.err || e2e_fail "combo: 2 MiB of random bytes did not come through stderr unchanged"

# On a terminal: the command gets one, of the same size, and what is typed.
printf 'tty; stty size; exit 3\n' >/tmp/typed
KR_WRAP="ptyrun 40 100" kr tty /tmp/typed --root /r -- /bin/sh
[ "$rc" = 3 ] || e2e_fail "tty: exit $rc, want 3"
grep -q '^/dev/pts/[0-9]' /tmp/tty.out || e2e_fail "tty: the command has no terminal"
grep -q '^40 100' /tmp/tty.out || e2e_fail "tty: the terminal is not 40x100"

# The same boot checks --user, resolved by name in the root's /etc/passwd
# and /etc/group (HOME from it too), a share at a mount point of its own
# (--fs mount=), and --no-stdin (the command's input is empty, whatever
# krun-core's stdin holds).
printf 'root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n' >/r/etc/passwd
printf 'root:x:0:\nstaff:x:50:\nwheel:x:10:alice\n' >/r/etc/group
mkdir -p /s && echo from-the-share >/s/hello && chown -R 65534:65534 /s
kr timing /tmp/two-lines --root /r --timing --no-stdin --user alice --fs path=/s,tag=data,mount=/srv/data -- \
	/bin/sh -c 'echo "$(id -u) $(id -g) $(id -G) $HOME"; cat /srv/data/hello; wc -l'
[ "$rc" = 0 ] || e2e_fail "timing: exit $rc"
[ "$(tr '\n' ' ' </tmp/timing.out)" = "1000 1000 1000 10 /home/alice from-the-share 0 " ] || e2e_fail "user, share and --no-stdin: got '$(tr '\n' ' ' </tmp/timing.out)'"
grep 'krun-core timing:' /tmp/timing.err | sed 's/^/TIMING /'

# Once the VM is set up, krun-core has no_new_privs and, of its
# capabilities, only CAP_KILL, CAP_SETUID and CAP_SETGID (0xe0), on every
# thread. The command waits on its stdin while the script looks.
# waiting NAME: runs a command that says "started" and then waits for a
# line on its stdin (fd 3 of this shell, from /tmp/NAME.in); krun-core's
# pid in $p, once the command has started.
waiting() {
	w=$1
	shift
	mkfifo /tmp/$w.in
	krun-core run --handshake-timeout 10m --kernel $KERNEL --plugin-dir /bin --memory 256M --boot-timeout 120 "$@" --root /r -- \
		/bin/sh -c 'echo started; read x; echo "got $x"' </tmp/$w.in >/tmp/$w.out 2>/tmp/$w.err &
	set -- $w
	p=$!
	exec 3>/tmp/$1.in
	i=0
	until grep -qs started /tmp/$1.out; do
		kill -0 $p 2>/dev/null || { sed "s/^/$1 err| /" /tmp/$1.err; inner_rebooted $1; e2e_fail "$1: krun-core ended early"; }
		i=$((i+1))
		[ $i -lt 960 ] || { kill -9 $p; sed "s/^/$1 err| /" /tmp/$1.err; e2e_nested_hang $1; }
		sleep 0.25
	done
}
# --root-open-files is the root's plugin's RLIMIT_NOFILE (below this
# guest's own hard limit, 4096, which would cap it).
waiting privs --root-open-files 2048
grep -E '^Max open files +2048 +2048 ' /proc/$(pidof krun-plugin-fs-virtio)/limits ||
	e2e_fail "privs: the root's plugin has $(grep '^Max open files' /proc/$(pidof krun-plugin-fs-virtio)/limits), want 2048 (--root-open-files)"
for s in /proc/$p/task/*/status; do
	grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd|CapInh|CapAmb):' $s | tr '\t' ' ' | sed "s|^|privs $(basename $(dirname $s)) |"
	grep -q '^NoNewPrivs:.1$' $s || e2e_fail "privs: $s has no no_new_privs"
	for k in CapEff CapPrm CapBnd; do
		grep -q "^$k:.00000000000000e0\$" $s || e2e_fail "privs: $s: $(grep ^$k: $s)"
	done
done
echo go >&3
exec 3>&-
rc=0
wait $p || rc=$?
[ "$rc" = 0 ] && [ "$(cat /tmp/privs.out)" = "$(printf 'started\ngot go')" ] || e2e_fail "privs: exit $rc, out '$(cat /tmp/privs.out)'"
echo "run privileges ok"

# The root's plugin dies under a running command: krun-core ends the run
# with 125 and a line naming the root file system, instead of leaving the
# command hanging on a dead share (its plugin is not restarted).
waiting rootdies
kill -9 $(pidof krun-plugin-fs-virtio) || e2e_fail "rootdies: no krun-plugin-fs-virtio to kill"
i=0
while kill -0 $p 2>/dev/null; do
	i=$((i+1))
	[ $i -lt 240 ] || { kill -9 $p; sed 's/^/rootdies err| /' /tmp/rootdies.err; e2e_fail "rootdies: krun-core went on for a minute after its root's plugin died"; }
	sleep 0.25
done
exec 3>&-
rc=0
wait $p || rc=$?
sed 's/^/rootdies err| /' /tmp/rootdies.err
[ "$rc" = 125 ] || e2e_fail "rootdies: exit $rc, want 125"
head -n 1 /tmp/rootdies.err | grep -q '^krun-core run: the root file system (virtio-fs) failed; the guest cannot go on without it' ||
	e2e_fail "rootdies: stderr does not start with the line that says the root file system failed"
[ "$(wc -l </tmp/rootdies.err)" = 1 ] || e2e_fail "rootdies: stderr has more than that one line"
echo "root dies ok"

# The reader of krun-core's stdout goes away (| head -1): the command gets
# SIGPIPE, as a pipeline's writer does, and the run ends with its status
# (it went on for ever, its output dropped).
rc=0
e2e_bounded 240 /tmp/headone.log sh -c "{ krun-core run --handshake-timeout 10m --kernel $KERNEL --plugin-dir /bin --memory 256M --boot-timeout 120 --root /r -- /bin/yes; echo \$? >/tmp/headone.rc; } | head -1 >/tmp/headone.out" || rc=$?
sed 's/^/headone| /' /tmp/headone.log | tail -20
[ "$(cat /tmp/headone.rc)" = 141 ] || e2e_fail "headone: krun-core exit $(cat /tmp/headone.rc), want 141"
[ "$(cat /tmp/headone.out)" = y ] || e2e_fail "headone: got '$(head -c 100 /tmp/headone.out)'"
echo "head -1 ok"
echo "outer checks ok"
`

// TestRun runs commands with a busybox root directory: stdout and stderr
// apart and byte for byte, the exit status (and 128+N for a signal),
// --env, --workdir, --rlimit, --hostname, piped stdin, a file written
// under / appearing on the host, and a terminal when krun-core has one.
func TestRun(t *testing.T) {
	a := vmtest.Require(t)
	dir := bins.Dir(t)
	if vmtest.DirectKVM(t) {
		runDirect(t, a, dir)
		return
	}
	files, kernel := vmtest.InnerKernelTree(t, a, "/nested", innerModules...)
	payload := append(files, binFiles(dir)...)
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload: payload,
		// Two outer vCPUs: an inner guest that wedges the vCPU running it
		// (nested SVM under TCG, rarely) leaves the other to the script,
		// which reports the hang for a retry.
		CPUs:    2,
		Timeout: 12 * time.Minute,
		Script:  "KERNEL=" + kernel + "\n" + rootSetup + runScript,
	})
	for _, want := range []string{"basic rc=7", "killed rc=137", "run privileges ok", "root dies ok", "head -1 ok", "outer checks ok"} {
		if !strings.Contains(r.Console, want) {
			t.Errorf("outer console lacks %q", want)
		}
	}
	for _, line := range strings.Split(r.Console, "\n") {
		if i := strings.Index(line, "TIMING "); i >= 0 {
			t.Logf("nested: %s", line[i+len("TIMING "):])
		}
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

// TestRunNet: --port H:G (krunvm's --port) forwards a host port to a
// server the command runs, through the passt network it adds (the one
// --net passt,ports=H:G gives); the host fetches a page from it, then
// stops krun-core with SIGTERM, which reaches the command (exit 143).
func TestRunNet(t *testing.T) {
	a := vmtest.Require(t)
	dir := bins.Dir(t)
	if vmtest.DirectKVM(t) {
		t.Skip("the direct path of TestRunNet needs a network namespace harness; it runs nested here")
	}
	files, kernel := vmtest.InnerKernelTree(t, a, "/nested", innerModules...)
	payload := append(files, binFiles(dir)...)
	payload = append(payload, vmtest.PasstUsers()...)
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload:      payload,
		HostBinaries: vmtest.PasstBinaries(),
		Modules:      []string{"dummy"},
		CPUs:         2,
		Timeout:      10 * time.Minute,
		Script: "KERNEL=" + kernel + "\n" + rootSetup + fmt.Sprintf(`
ip link set lo up
ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy
ip addr add 10.200.0.2/24 dev dummy0
ip link set dummy0 up
ip route add default via 10.200.0.1 dev dummy0
# passt isolates itself with pivot_root, which fails on the initramfs root:
# run from a tmpfs moved over / in a mount namespace of its own.
mkdir /newroot
mount -t tmpfs -o size=1g tmpfs /newroot
for d in bin sbin usr lib lib64 etc nested r; do [ -e /$d ] && cp -a /$d /newroot/; done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp
mount -t proc proc /newroot/proc
mount --rbind /sys /newroot/sys
mount --rbind /dev /newroot/dev
unshare -m sh -c 'cd /newroot && mount --move /newroot / && exec chroot . krun-core run --handshake-timeout 10m --kernel %[1]s --plugin-dir /bin \
	--memory 256M --boot-timeout 120 --port %[2]d:8080 --root /r -- /bin/sh -c \
	"mkdir -p /www; echo hello-from-the-guest >/www/page; httpd -f -p 8080 -h /www"' </dev/null >/tmp/net.out 2>/tmp/net.err &
pid=$!
i=0
until grep -qs hello-from-the-guest /tmp/page; do
	kill -0 $pid 2>/dev/null || { sed 's/^/net err| /' /tmp/net.err; e2e_fail "krun-core ended before the page was fetched"; }
	i=$((i+1))
	[ $i -lt 240 ] || { kill -9 $pid; sed 's/^/net err| /' /tmp/net.err; e2e_nested_hang "the page never came"; }
	printf 'GET /page HTTP/1.0\r\n\r\n' | nc 127.0.0.1 %[2]d >/tmp/page 2>/dev/null || true
	sleep 1
done
echo "host fetched the page"
kill -TERM $pid
i=0
while kill -0 $pid 2>/dev/null; do
	i=$((i+1)); [ $i -lt 120 ] || { kill -9 $pid; e2e_fail "krun-core did not end after SIGTERM"; }
	sleep 0.5
done
rc=0
wait $pid || rc=$?
sed 's/^/net err| /' /tmp/net.err
echo "net rc=$rc"
[ "$rc" = 143 ] || e2e_fail "SIGTERM: exit $rc, want 143 (the command killed by the forwarded signal)"
echo "outer checks ok"
`, kernel, 18080)})
	for _, want := range []string{"host fetched the page", "net rc=143", "outer checks ok"} {
		if !strings.Contains(r.Console, want) {
			t.Errorf("outer console lacks %q", want)
		}
	}
}

// binFiles places the built binaries in /bin of the outer guest.
func binFiles(dir string) []vmtest.File {
	var out []vmtest.File
	for name := range bins.Pkgs {
		out = append(out, vmtest.File{Dst: "/bin/" + name, Src: filepath.Join(dir, name), Mode: 0o755})
	}
	return out
}

// runDirect is TestRun on a host whose KVM boots stock kernels: the same
// cases, run from Go.
func runDirect(t *testing.T, a *vmtest.Assets, dir string) {
	root := t.TempDir()
	os.Chmod(root, 0o755) // --user alice searches it, as a root file system's /
	for _, d := range []string{"bin", "tmp", "etc", "root", "proc", "sys", "dev", "run"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	b, err := os.ReadFile(a.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "echo", "cat", "true", "wc", "pwd", "hostname", "mkdir", "kill", "id"} {
		os.Symlink("/bin/busybox", filepath.Join(root, "bin", applet))
	}
	blob := make([]byte, 2<<20)
	for i := range blob {
		blob[i] = byte(i*131 + i>>9)
	}
	os.WriteFile(filepath.Join(root, "blob"), blob, 0o644)
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nstaff:x:50:\nwheel:x:10:alice\n"), 0o644)
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "hello"), []byte("from-the-share\n"), 0o644)
	base := []string{"run", "--kernel", a.Kernel.Vmlinuz, "--plugin-dir", dir, "--memory", "256M", "--root", root}
	for _, tc := range []struct {
		name   string
		args   []string
		stdin  string
		rc     int
		stdout string
		stderr string
	}{
		{"basic", []string{"--", "/bin/sh", "-c", "echo out; echo err >&2; exit 7"}, "", 7, "out\n", "err\n"},
		{"killed", []string{"--", "/bin/sh", "-c", "kill -9 $$"}, "", 137, "", ""},
		{"combo", []string{"--env", "FOO=bar", "--workdir", "/tmp", "--rlimit", "nofile=100:200", "--hostname", "box", "--",
			"/bin/sh", "-c", "echo \"$FOO\"; pwd; ulimit -n; ulimit -Hn; hostname; wc -l; echo written-in-the-guest >/hello; cat /blob >&2"},
			"a\nb\n", 0, "bar\n/tmp\n100\n200\nbox\n2\n", string(blob)},
		{"user, share and no stdin", []string{"--no-stdin", "--user", "alice", "--fs", "path=" + share + ",tag=data,mount=/srv/data", "--",
			"/bin/sh", "-c", `echo "$(id -u) $(id -g) $(id -G) $HOME"; cat /srv/data/hello; wc -l`}, "a\nb\n", 0, "1000 1000 1000 10 /home/alice\nfrom-the-share\n0\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(filepath.Join(dir, "krun-core"), append(base, tc.args...)...)
			cmd.Stdin = strings.NewReader(tc.stdin)
			var stdout, stderr syncbuf.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			timer := time.AfterFunc(vmtest.DefaultDirectTimeout, func() { cmd.Process.Kill() })
			cmd.Wait()
			timer.Stop()
			if rc := cmd.ProcessState.ExitCode(); rc != tc.rc {
				t.Errorf("exit %d, want %d; stderr:\n%s", rc, tc.rc, vmtest.Tail(stderr.String(), 30))
			}
			if strings.TrimSpace(stdout.String()) != strings.TrimSpace(tc.stdout) {
				t.Errorf("stdout %q, want %q", vmtest.Tail(stdout.String(), 5), vmtest.Tail(tc.stdout, 5))
			}
			if stderr.String() != tc.stderr {
				t.Errorf("stderr %q, want %q", stderr.String(), tc.stderr)
			}
		})
	}
	if b, _ := os.ReadFile(filepath.Join(root, "hello")); string(b) != "written-in-the-guest\n" {
		t.Errorf("/hello on the host reads %q", b)
	}
	t.Run("root dies", func(t *testing.T) { rootDiesDirect(t, dir, base) })
}

// rootDiesDirect is runScript's "rootdies" on a host with KVM: the root's
// plugin is killed under a command that waits on its stdin, and krun-core
// ends the run with 125 and a line naming the root file system.
func rootDiesDirect(t *testing.T, dir string, base []string) {
	cmd := exec.Command(filepath.Join(dir, "krun-core"), append(base, "--", "/bin/sh", "-c", `echo started; read x; echo "got $x"`)...)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var stdout, stderr syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(vmtest.DefaultDirectTimeout, func() { cmd.Process.Kill() })
	defer timer.Stop()
	deadline := time.Now().Add(vmtest.DefaultDirectTimeout)
	for !strings.Contains(stdout.String(), "started") {
		if time.Now().After(deadline) {
			t.Fatalf("the command did not start; stderr:\n%s", vmtest.Tail(stderr.String(), 30))
		}
		time.Sleep(20 * time.Millisecond)
	}
	killed := false
	for _, pid := range daemontest.Children(cmd.Process.Pid) {
		// argv[0], as pidof matches it (the trampoline execs the plugin
		// through a descriptor, so its comm is not the plugin's name).
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if argv0, _, _ := strings.Cut(string(b), "\x00"); filepath.Base(argv0) == "krun-plugin-fs-virtio" {
			killed = syscall.Kill(pid, syscall.SIGKILL) == nil
		}
	}
	if !killed {
		t.Fatal("no krun-plugin-fs-virtio child to kill")
	}
	cmd.Wait()
	if rc := cmd.ProcessState.ExitCode(); rc != 125 {
		t.Errorf("exit %d, want 125; stderr:\n%s", rc, vmtest.Tail(stderr.String(), 30))
	}
	if !strings.HasPrefix(stderr.String(), "krun-core run: the root file system (virtio-fs) failed; the guest cannot go on without it") ||
		strings.Count(stderr.String(), "\n") != 1 {
		t.Errorf("stderr is not the one line that says the root file system failed:\n%s", vmtest.Tail(stderr.String(), 30))
	}
}
