package vmm_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/internal/vmtest"
)

const (
	blkQcow2Package = "github.com/krun-core/krun-core/plugins/blk-qcow2"
	blkVerifyPkg    = "github.com/krun-core/krun-core/internal/vmtest/blkverify"

	// restartKills is how many times each disk's plugin is killed.
	restartKills = 20
	// restartDiskMiB is the size each pass of the guest's loop writes and
	// verifies per disk. The 64 MiB is too slow nested under TCG
	// (where a pass of 16 MiB over both disks takes a minute or more on a
	// loaded machine): 16 MiB per disk, as many passes as the 40 kills
	// take, each pass verified in full.
	restartDiskMiB = 16
)

// restartInnerScript runs in the inner guest: blkverify's write-then-verify
// loop (O_DIRECT, patterns unique per pass, device and offset) on both
// disks, until the host, done killing plugins, types "stop"; then no I/O
// error may be in the kernel log.
var restartInnerScript = fmt.Sprintf(`
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
	[ -b /dev/vda ] && [ -b /dev/vdb ] && break
	sleep 0.5
done
[ -b /dev/vdb ] || e2e_fail "no /dev/vda and /dev/vdb ($(ls /sys/block | tr '\n' ' '))"
blkverify -size %d -depth 8 -chunk 262144 -stop /tmp/stop /dev/vda /dev/vdb &
vpid=$!
read -t 3000 line || e2e_fail "no stop line on the console"
[ "$line" = stop ] || e2e_fail "console: got '$line'"
touch /tmp/stop
rc=0
wait $vpid || rc=$?
[ $rc = 0 ] || e2e_fail "blkverify exited $rc"
if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|critical'; then
	e2e_fail "the kernel logged I/O errors"
fi
echo "inner verify ok"
`, restartDiskMiB<<20)

func restartInitramfs(a *vmtest.Assets, blkverify string) *vmtest.Initramfs {
	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_mmio", "virtio_blk")
	ib.AddFile("/bin/blkverify", blkverify, 0o755)
	ib.SetInit(restartInnerScript)
	return ib
}

var restartedLineRE = regexp.MustCompile(`plugin restarted; the device serves again: .*took=([0-9.]+[mµn]?s)`)

// TestPluginRestartUnderIO is the end-to-end test of plugin restarts: a
// guest runs a write-then-verify loop on a raw and a qcow2 disk while the
// host kills each disk's plugin with SIGKILL 20 times at random moments.
// krun-core restarts them; the guest's loop must finish with every byte
// right and no I/O error in its kernel log, krun-core must exit 0 after
// the guest powers off, and qemu-img check must find no corruption in the
// qcow2 image (leaked clusters are fine). Nested KVM (vmtest.NestedKVM)
// where the host's KVM cannot boot a stock kernel.
func TestPluginRestartUnderIO(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end boot test skipped in -short mode")
	}
	if vmtest.DirectKVM(t) {
		restartDirect(t)
		return
	}
	restartNested(t)
}

func restartNested(t *testing.T) {
	a := vmtest.Require(t)
	krun := vmtest.BuildStatic(t, krunPackage)
	raw := vmtest.BuildStatic(t, blkRawPackage)
	qcow2 := vmtest.BuildStatic(t, blkQcow2Package)
	verify := vmtest.BuildStatic(t, blkVerifyPkg)
	inner := restartInitramfs(a, verify)
	payload := vmtest.InnerGuest(t, a, inner, "/nested")
	payload = append(payload,
		vmtest.File{Dst: "/bin/krun-core", Src: krun, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-blk-raw", Src: raw, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-blk-qcow2", Src: qcow2, Mode: 0o755})
	marker := inner.ResultMarker()
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload:      payload,
		HostBinaries: []string{"qemu-img"},
		Timeout:      40 * time.Minute, // 40 restarts nested under TCG on a loaded 2-core machine
		// The outer guest wedges under TCG in about every other try of
		// this test (silent, heartbeat too, during the kill loop; seen in
		// CI and here, 2026-12-04): four tries.
		Tries: 4,
		Script: fmt.Sprintf(`
mkdir -p /tmp
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
dd if=/dev/zero of=/tmp/disk.raw bs=1M count=%[1]d 2>/dev/null
qemu-img create -q -f qcow2 /tmp/disk.qcow2 %[1]dM
# krun-core's log has a file of its own: in the console stream its lines
# (one per kill and restart) would split the guest's.
show() { sed 's/^/inner| /' /tmp/inner.log; sed 's/^/inner-log| /' /tmp/inner.err; }
alive() {
	kill -0 $pid 2>/dev/null && return 0
	show
	grep -q 'boot watchdog' /tmp/inner.err && e2e_nested_hang "the inner guest never started"
	e2e_fail "krun-core ended early"
}
# waitfor TEXT SECONDS: until the inner console shows TEXT.
waitfor() {
	i=0
	until grep -q "$1" /tmp/inner.log; do
		alive
		i=$((i+1)); [ $i -lt $(($2*2)) ] || { show; kill -9 $pid; e2e_nested_hang "no $1 within $2 s"; }
		sleep 0.5
	done
}
restarts() { grep -c 'plugin restarted; the device serves again' /tmp/inner.err || true; }
mkfifo /tmp/console.in
krun-core run --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
	--plugin-dir /bin --boot-timeout 120 --cmdline "%[2]s" --plugin-restarts 1000/10m --log-level info \
	--disk path=/tmp/disk.raw,format=raw --disk path=/tmp/disk.qcow2,format=qcow2 \
	</tmp/console.in >/tmp/inner.log 2>/tmp/inner.err &
pid=$!
exec 4>/tmp/console.in
waitfor 'BLKVERIFY start' 600
n=0
for i in $(seq 1 %[3]d); do
	for p in krun-plugin-blk-raw krun-plugin-blk-qcow2; do
		# A random moment: up to a second into the loop's I/O.
		sleep 0.$((RANDOM %% 10))$((RANDOM %% 10))
		kill -9 $(pidof $p) || { show; e2e_fail "no $p to kill (kill $((n+1)))"; }
		n=$((n+1))
		# The next kill hits a plugin that serves again.
		j=0
		until [ "$(restarts)" -ge $n ]; do
			alive
			j=$((j+1)); [ $j -lt 600 ] || { show; e2e_fail "restart $n did not complete in 120 s"; }
			sleep 0.2
		done
	done
	echo "killed both plugins $i times"
done
# One more pass after the last kill, then stop.
passes=$(grep -c 'BLKVERIFY /dev/vdb pass' /tmp/inner.log || true)
waitfor "BLKVERIFY /dev/vdb pass $((passes+1)) ok" 900
echo stop >&4
waitfor 'BLKVERIFY done' 900
waitfor 'reboot: Power down' 120
rc=0
wait $pid || rc=$?
exec 4>&-
echo "krun-exit=$rc" >>/tmp/inner.log
show
grep -q '%[4]s ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
grep -q 'inner verify ok' /tmp/inner.log || e2e_fail "the guest's loop did not verify"
grep -q '^krun-exit=0$' /tmp/inner.log || e2e_fail "krun-core did not exit 0"
[ "$(restarts)" = $n ] || e2e_fail "$(restarts) restarts logged, $n kills"
grep -q 'the device fails' /tmp/inner.err && e2e_fail "a device failed"
echo "requests in flight replayed: $(sed -n 's/.*resubmitting requests a previous back-end left in flight.*requests=\([0-9]*\).*/\1/p' /tmp/inner.err | awk '{s+=$1} END {print s+0}')"
qemu-img check --output=json /tmp/disk.qcow2 >/tmp/check.json || true
sed 's/^/check| /' /tmp/check.json
grep -q '"check-errors": 0' /tmp/check.json || e2e_fail "qemu-img check could not check the image"
grep -q '"corruptions"' /tmp/check.json && e2e_fail "qemu-img check found corruptions"
echo "restart e2e ok"
`, restartDiskMiB, innerCmdline, restartKills, marker),
	})
	if !strings.Contains(r.Console, "restart e2e ok") {
		t.Fatal("outer script did not finish")
	}
	logRestartTimes(t, r.Console)
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

// logRestartTimes logs the median and worst of the restart times krun-core
// reported ("took"): from the decision to restart to the device serving.
func logRestartTimes(t *testing.T, log string) {
	var took []time.Duration
	for _, m := range restartedLineRE.FindAllStringSubmatch(log, -1) {
		if d, err := time.ParseDuration(m[1]); err == nil {
			took = append(took, d)
		}
	}
	if len(took) == 0 {
		return
	}
	sortDurations(took)
	t.Logf("restarts: %d, plugin death to device serving: median %v, worst %v", len(took), took[len(took)/2], took[len(took)-1])
}

func sortDurations(d []time.Duration) {
	for i := 1; i < len(d); i++ {
		for j := i; j > 0 && d[j] < d[j-1]; j-- {
			d[j], d[j-1] = d[j-1], d[j]
		}
	}
}

// restartDirect is the same test on a host whose KVM boots stock kernels.
func restartDirect(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Minute)
	defer cancel()
	k, err := vmtest.FetchKernel(ctx)
	if err != nil {
		t.Skipf("no Debian kernel for the guest: %v", err)
	}
	bb, err := vmtest.FetchBusybox(ctx)
	if err != nil {
		t.Skipf("no busybox for the guest: %v", err)
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian package qemu-utils)")
	}
	a := &vmtest.Assets{Kernel: k, Busybox: bb}
	dir := t.TempDir()
	krun := vmtest.BuildStatic(t, krunPackage)
	for pkg, name := range map[string]string{blkRawPackage: "krun-plugin-blk-raw", blkQcow2Package: "krun-plugin-blk-qcow2"} {
		if err := os.Rename(vmtest.BuildStatic(t, pkg), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	inner := restartInitramfs(a, vmtest.BuildStatic(t, blkVerifyPkg))
	initrd := filepath.Join(dir, "initramfs.cpio")
	if err := inner.Write(initrd); err != nil {
		t.Fatal(err)
	}
	rawImg, qImg := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(rawImg, make([]byte, restartDiskMiB<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", qImg, fmt.Sprintf("%dM", restartDiskMiB)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, krun, "run", "--kernel", k.Vmlinuz, "--initrd", initrd, "--memory", "256M",
		"--plugin-dir", dir, "--cmdline", innerCmdline, "--plugin-restarts", "1000/10m", "--log-level", "info",
		"--disk", "path="+rawImg+",format=raw", "--disk", "path="+qImg+",format=qcow2")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		if t.Failed() {
			t.Logf("krun-core output:\n%s", out.String())
		}
	}()
	waitFor := func(cond func() bool, what string) {
		t.Helper()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for !cond() {
			select {
			case err := <-done:
				t.Fatalf("krun-core ended (%v) while waiting for %s", err, what)
			case <-ctx.Done():
				t.Fatalf("no %s in time", what)
			case <-tick.C:
			}
		}
	}
	has := func(s string) func() bool { return func() bool { return strings.Contains(out.String(), s) } }
	restarts := func() int { return strings.Count(out.String(), "plugin restarted; the device serves again") }
	waitFor(has("BLKVERIFY start"), "the guest's loop")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	n := 0
	for range restartKills {
		for _, p := range []string{"krun-plugin-blk-raw", "krun-plugin-blk-qcow2"} {
			time.Sleep(time.Duration(rng.IntN(1000)) * time.Millisecond)
			killPlugin(t, cmd.Process.Pid, p)
			n++
			waitFor(func() bool { return restarts() >= n }, fmt.Sprintf("restart %d", n))
		}
	}
	passes := strings.Count(out.String(), "BLKVERIFY /dev/vdb pass")
	waitFor(has(fmt.Sprintf("BLKVERIFY /dev/vdb pass %d ok", passes+1)), "a pass after the last kill")
	io.WriteString(stdin, "stop\n")
	if err := <-done; err != nil {
		t.Fatalf("krun-core: %v", err)
	}
	for _, want := range []string{inner.ResultMarker() + " ok", "inner verify ok", "BLKVERIFY done"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("guest output lacks %q", want)
		}
	}
	if strings.Contains(out.String(), "the device fails") {
		t.Fatal("a device failed")
	}
	b, _ := exec.Command("qemu-img", "check", "--output=json", qImg).Output()
	var res struct {
		Corruptions int `json:"corruptions"`
		CheckErrors int `json:"check-errors"`
		Leaks       int `json:"leaks"`
	}
	if err := json.Unmarshal(b, &res); err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %v\n%s", err, b)
	}
	t.Logf("qemu-img check: no corruption, %d leaked clusters", res.Leaks)
	replayed := 0
	for _, m := range replayedLineRE.FindAllStringSubmatch(out.String(), -1) {
		n, _ := strconv.Atoi(m[1])
		replayed += n
	}
	t.Logf("requests in flight replayed: %d", replayed)
	logRestartTimes(t, out.String())
}

var replayedLineRE = regexp.MustCompile(`resubmitting requests a previous back-end left in flight: .*requests=([0-9]+)`)

// killPlugin SIGKILLs the child of ppid whose executable is named name
// (process names are cut at 15 bytes: krun-plugin-blk-raw and
// krun-plugin-blk-qcow2 share one).
func killPlugin(t *testing.T, ppid int, name string) {
	t.Helper()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		var state string
		var parent int
		fmt.Sscanf(string(b[i+1:]), " %s %d", &state, &parent)
		if parent != ppid {
			continue
		}
		dir := filepath.Dir(f)
		exe, err := os.Readlink(filepath.Join(dir, "exe"))
		if err != nil || filepath.Base(strings.TrimSuffix(exe, " (deleted)")) != name {
			continue
		}
		var pid int
		fmt.Sscanf(filepath.Base(dir), "%d", &pid)
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			return
		}
	}
	t.Fatalf("no %s child of %d to kill", name, ppid)
}
