package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/initramfs/kmod"
)

// File is a file placed into a guest's initramfs: from the host file Src or,
// if Src is empty, with content Data.
type File struct {
	Dst  string      // absolute guest path
	Src  string      // host path
	Data []byte      // content when Src is empty
	Mode os.FileMode // permission bits (0 means 0644, or 0755 under /bin)
}

func (f File) add(ib *Initramfs) {
	mode := f.Mode
	if mode == 0 {
		mode = 0o644
		if filepath.Dir(f.Dst) == "/bin" || filepath.Dir(f.Dst) == "/usr/bin" {
			mode = 0o755
		}
	}
	if f.Src != "" {
		ib.AddFile(f.Dst, f.Src, mode)
	} else {
		ib.AddBytes(f.Dst, f.Data, mode)
	}
}

// nestedModules are loaded in the outer guest of a nested-KVM test (their
// dependencies irqbypass, kvm and ccp come along).
func nestedModules() []string { return []string{"kvm_amd"} }

// NestedOptions configure NestedKVM.
type NestedOptions struct {
	Payload []File // files for the outer initramfs (VMM binary, inner kernel and initramfs, images)
	// Script runs in the outer guest (sh -e) once /dev/kvm exists. It must
	// start the inner VM and check the inner verdict; see InnerGuest.
	Script string
	// Modules are extra modules for the outer guest besides kvm_amd.
	Modules []string
	// HostBinaries are host programs placed in the outer initramfs at
	// their own paths, with the shared libraries ldd names (passt,
	// qemu-storage-daemon); a program not installed skips the test.
	HostBinaries []string
	// Prepare, when set, is called with each outer VM NestedKVM builds
	// (one per try) before it starts: to add drives or devices. A try
	// that is run again gets a fresh VM, so Prepare should give it fresh
	// writable files too.
	Prepare   func(vm *VM)
	MemoryMiB int           // outer guest RAM (default 2048: room for an inner guest)
	CPUs      int           // outer vCPUs (default 1)
	Timeout   time.Duration // default 300 s
	Cmdline   string        // extra outer kernel command line
	// Tries is how many times NestedKVM runs the outer VM when an inner
	// guest hangs or the outer one wedges (default 2). A test that keeps
	// nested SVM busy for minutes (the restart test: 40 plugin kills
	// under I/O) wedges often enough under TCG to need more.
	Tries int
}

// NewNestedVM prepares an outer VM for a nested-KVM test without starting
// it, so devices can be added. The outer guest has kvm_amd loaded and checks
// that /dev/kvm exists before Script runs.
func NewNestedVM(t testing.TB, a *Assets, opts NestedOptions) *VM {
	t.Helper()
	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, append(nestedModules(), opts.Modules...)...)
	for _, f := range opts.Payload {
		f.add(ib)
	}
	for _, b := range opts.HostBinaries {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s is not installed: %v", b, err)
		}
		ib.AddHostBinary(b)
	}
	ib.SetInit(`[ -c /dev/kvm ] || e2e_fail "/dev/kvm missing after loading kvm_amd (CPU flags: $(grep -m1 -o -w -e svm -e npt /proc/cpuinfo | tr '\n' ' '))"
# A heartbeat: the test kills an outer guest that stops printing it.
( while :; do sleep ` + fmt.Sprint(int(heartbeatEvery/time.Second)) + `; echo ` + heartbeatMarker + `; done ) &
` + opts.Script)
	if opts.MemoryMiB <= 0 {
		opts.MemoryMiB = DefaultNestedMemoryMiB
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultNestedTimeout
	}
	return NewVM(t, Options{
		Kernel:    a.Kernel,
		Initramfs: ib,
		MemoryMiB: opts.MemoryMiB,
		CPUs:      opts.CPUs,
		CPU:       "max", // TCG's max CPU offers SVM (AMD-V)
		Accel:     "tcg",
		Timeout:   opts.Timeout,
		Cmdline:   strings.TrimSpace(nestedCmdline + " " + opts.Cmdline),
	})
}

// nestedCmdline keeps the outer kernel's tick periodic. With the tick
// one-shot (NOHZ, high-resolution timers), an outer guest running a nested
// guest under TCG's emulated SVM loses its timer for good now and then:
// from then on nothing in it that sleeps wakes up (its heartbeat and a
// /dev/kmsg heartbeat both stopped), which looked like the whole VM
// wedging. The restart e2e test wedged in 10 of 10 tries that way on
// 2026-12-04 and passed first time with a periodic tick; a periodic
// LAPIC timer keeps firing after an interrupt goes missing.
const nestedCmdline = "nohz=off highres=off"

// NestedHangMarker is what e2e_nested_hang prints: the outer script saw an
// inner guest make no progress.
const NestedHangMarker = "KRUN-E2E-NESTED-HANG"

// The outer guest prints heartbeatMarker every heartbeatEvery; an outer
// guest silent for wedgeAfter is wedged as a whole (seen under TCG's
// nested SVM: QEMU busy, the outer kernel no longer scheduling) and is
// killed and retried like a nested hang.
const (
	heartbeatMarker = "KRUN-E2E-HEARTBEAT"
	heartbeatEvery  = 15 * time.Second
	wedgeAfter      = 100 * time.Second
)

// softLockupMarker is the outer kernel's watchdog line for a CPU stuck in
// the kernel (seen waiting for a TLB flush IPI that the CPU running the
// nested guest never answers).
const softLockupMarker = "BUG: soft lockup - CPU#"

// outerPanicMarker is the outer kernel's last line when it panics. The
// outer QEMU runs with panic=-1 and -no-reboot, so such a panic ends it
// without a verdict; an inner guest's panic ends only its own VMM and
// leaves the outer guest running. Seen under TCG's nested SVM: a general
// protection fault recursing in the outer kernel while it ran the nested
// guest ("stack guard page was hit", "corrupted stack end detected inside
// scheduler"), a fault of the emulation, not of the test.
const outerPanicMarker = "Kernel panic - not syncing"

// outerKernelCrashed says whether r is an outer guest that ended in its
// own kernel's panic before any verdict: QEMU exited by itself (not
// killed by the harness) with a panic among the console's last 40 lines.
func outerKernelCrashed(r *Result, killed bool) bool {
	return r.Verdict == "" && !killed && strings.Contains(LastLines(r.Console, 40), outerPanicMarker)
}

// outerOopsRE matches the first line of a report by the outer kernel
// itself (a line that starts with its timestamp) of a fault it survived:
// an oops kills the task that faulted (krun-core, the test's VMM, say)
// and the outer guest goes on, heartbeat and all, to a failing verdict.
// Seen under TCG's nested SVM: "BUG: TASK stack guard page was hit" in
// exc_general_protection while kvm_amd ran the nested guest, a fault of
// the emulation, not of the test.
var outerOopsRE = regexp.MustCompile(`(?m)^` + kernelStamp + ` (BUG: [^\r\n]*|Oops: [^\r\n]*|general protection fault[^\r\n]*)`)

// innerTripleFaultMarker is what krun-core logs (a warning) when a guest
// triple-faults. An inner Debian kernel that triple-faults mid-boot with
// no message of its own (seen once in CI: ended right after pps_core's
// line, about 3 s into its boot, a nested-network test whose other runs
// all passed) is taken for a fault of TCG's emulated SVM, like the outer
// kernel's faults above, and retried; the test's log names it, with the
// registers krun-core logged.
const innerTripleFaultMarker = "guest triple fault: treated as reboot"

// innerTripleFault says whether r is an outer guest that failed after an
// inner guest triple-faulted (the script printed krun-core's log line),
// and returns that line.
func innerTripleFault(r *Result) (string, bool) {
	if r.Verdict == "ok" {
		return "", false
	}
	for _, l := range strings.Split(r.Console, "\n") {
		if strings.Contains(l, innerTripleFaultMarker) {
			return strings.TrimSpace(l), true
		}
	}
	return "", false
}

// kernelStamp is the timestamp the kernel puts before each console line.
const kernelStamp = `\[ *[0-9]+\.[0-9]+\]`

// outerKernelOopsed says whether r is an outer guest whose kernel reported
// a fault of its own (outerOopsRE) before a verdict other than ok. It
// returns that line, trimmed.
func outerKernelOopsed(r *Result) (string, bool) {
	if r.Verdict == "ok" {
		return "", false
	}
	m := outerOopsRE.FindStringSubmatch(r.Console)
	if m == nil {
		return "", false
	}
	return strings.TrimSpace(m[1]), true
}

// oopsGrace is how long an outer guest whose kernel reported a fault of
// its own (outerOopsRE) may print nothing but its heartbeat.
const oopsGrace = 90 * time.Second

// watchWedge kills vm when its console stays silent for wedgeAfter, shows
// a soft lockup, or gives no verdict within oopsGrace of an outer kernel
// fault; it reports through wedged and ends when the VM does.
func watchWedge(vm *VM, wedged *atomic.Bool) {
	w := wedgeWatch{lastLen: -1}
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-vm.done:
			return
		case <-tick.C:
		}
		if why := w.check(vm.Console(), time.Now()); why != "" {
			wedged.Store(true)
			vm.kill("killed: " + why)
			return
		}
	}
}

// wedgeWatch is watchWedge's state between two looks at the console.
type wedgeWatch struct {
	last    time.Time // when the console last grew
	lastLen int
	oopsAt  time.Time // when an outer kernel fault was first seen
	// progress: when the test script last printed a line (not a
	// heartbeat, not a kernel message); scanned: how far the console
	// has been read for that.
	progress time.Time
	scanned  int
}

// kernelLineRE matches a line the kernel printed (its timestamp first).
var kernelLineRE = regexp.MustCompile(`^` + kernelStamp)

// scriptProgressed reads the whole lines of con past w.scanned and says
// whether one of them is the script's own: a kernel that keeps reporting
// stalls after a fault is no progress.
func (w *wedgeWatch) scriptProgressed(con string) bool {
	if len(con) < w.scanned {
		w.scanned = 0 // the console was cut at its cap
	}
	rest := con[w.scanned:]
	end := strings.LastIndexByte(rest, '\n')
	if end < 0 {
		return false
	}
	w.scanned += end + 1
	for _, line := range strings.Split(rest[:end], "\n") {
		line = strings.TrimSpace(line)
		if line != "" && line != heartbeatMarker && !kernelLineRE.MatchString(line) {
			return true
		}
	}
	return false
}

// check looks at the console at now and says why the outer guest counts
// as wedged, or "".
func (w *wedgeWatch) check(con string, now time.Time) string {
	if strings.Contains(con, softLockupMarker) {
		// The outer kernel's watchdog keeps the console busy while a
		// CPU spins waiting for the one in the nested guest: wedged all
		// the same.
		return "the outer guest reported a soft lockup (a CPU stuck behind the nested guest)"
	}
	if w.scriptProgressed(con) || w.progress.IsZero() {
		w.progress = now
	}
	if w.oopsAt.IsZero() && outerOopsRE.MatchString(con) {
		w.oopsAt = now
	}
	if !w.oopsAt.IsZero() && now.Sub(w.oopsAt) > oopsGrace && now.Sub(w.progress) > oopsGrace {
		// The faulting task may have died holding locks: the script
		// then waits for good, and only the heartbeat and the kernel
		// (stall reports) print. A script that goes on printing is
		// left to its verdict.
		return fmt.Sprintf("the outer kernel reported a fault of its own, and for %v the test printed nothing", oopsGrace)
	}
	if n := len(con); n != w.lastLen {
		w.last, w.lastLen = now, n
		return ""
	}
	if now.Sub(w.last) > wedgeAfter {
		return fmt.Sprintf("the outer guest printed nothing (not even its heartbeat) for %v", wedgeAfter)
	}
	return ""
}

// NestedKVM runs a nested-KVM test: an outer TCG guest with /dev/kvm runs
// opts.Script, which typically starts krun-core on an inner kernel and
// initramfs from opts.Payload. It fails the test unless the outer script
// succeeds.
//
// Nested KVM on TCG's emulated SVM has been seen to leave an inner guest
// idle for good on a loaded machine, with QEMU itself as the inner VMM as
// much as with krun-core (see TestNestedInnerGuest). A script that bounds
// its inner runs (e2e_bounded, or its own check that calls
// e2e_nested_hang) reports such a hang; NestedKVM then runs the whole
// outer VM once more (up to opts.Tries runs in all), and says so in the
// log. An outer kernel that panics before the verdict (outerPanicMarker),
// or reports a fault of its own before a failing one (outerOopsRE), or
// whose script printed an inner guest's triple fault before a failing
// verdict (innerTripleFault), is retried the same way. A hang or crash on the last try, and every
// other failure, fails the test.
func NestedKVM(t testing.TB, a *Assets, opts NestedOptions) *Result {
	t.Helper()
	for try := 1; ; try++ {
		vm := NewNestedVM(t, a, opts)
		if opts.Prepare != nil {
			opts.Prepare(vm)
		}
		if err := vm.Start(); err != nil {
			t.Fatal(err)
		}
		var wedged atomic.Bool
		go watchWedge(vm, &wedged)
		r, err := vm.Wait()
		if err == nil {
			return r
		}
		hung := strings.Contains(r.Console, NestedHangMarker) || wedged.Load()
		crashed := outerKernelCrashed(r, vm.wasKilled())
		oops, oopsed := outerKernelOopsed(r)
		fault, faulted := innerTripleFault(r)
		if !(hung || crashed || oopsed || faulted) || try >= max(opts.Tries, 2) {
			t.Fatalf("vmtest: %v\n%s", err, vm.failureText())
		}
		what := "hung"
		switch {
		case crashed:
			what = "crashed the outer kernel (" + outerPanicLine(r.Console) + ")"
		case oopsed:
			what = "faulted in the outer kernel (" + oops + ")"
		case faulted:
			what = "triple-faulted the inner guest (" + fault + ")"
		}
		t.Logf("vmtest: nested KVM under TCG %s on try %d (%v); running the outer VM once more", what, try, err)
	}
}

// InnerGuest writes an inner guest's initramfs to a temp file and returns
// payload files that place the kernel at dir/vmlinuz and the initramfs at
// dir/initramfs.cpio in the outer guest (dir e.g. "/nested"). The inner
// guest's verdict line starts with ib.ResultMarker(); the outer script can
// grep the inner console for it.
func InnerGuest(t testing.TB, a *Assets, ib *Initramfs, dir string) []File {
	t.Helper()
	if !ib.HasBusybox() {
		ib.AddBusybox(a.Busybox)
	}
	p := filepath.Join(t.TempDir(), "inner-initramfs.cpio")
	if err := ib.Write(p); err != nil {
		t.Fatalf("vmtest: inner initramfs: %v", err)
	}
	if dir == "" {
		dir = "/nested"
	}
	return []File{
		{Dst: filepath.Join(dir, "vmlinuz"), Src: a.Kernel.Vmlinuz, Mode: 0o644},
		{Dst: filepath.Join(dir, "initramfs.cpio"), Src: p, Mode: 0o644},
	}
}

// InnerKernelTree returns payload files that place kernel a.Kernel at
// dir/boot/vmlinuz-<release> and the named modules, with their
// dependencies, at dir/lib/modules/<release>/ (uncompressed), with the
// tree's modules.builtin: what krun-core run --root finds next to a
// kernel to build its initramfs from, without the whole module tree. It
// returns the files and the kernel's path in the outer guest.
func InnerKernelTree(t testing.TB, a *Assets, dir string, modules ...string) ([]File, string) {
	t.Helper()
	k := a.Kernel
	idx, err := kmod.NewIndex(k.ModulesDir)
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	mods, err := idx.Resolve(modules)
	if err != nil {
		t.Fatalf("vmtest: inner kernel modules: %v", err)
	}
	kernel := filepath.Join(dir, "boot", "vmlinuz-"+k.Release)
	modDir := filepath.Join(dir, "lib", "modules", k.Release)
	files := []File{{Dst: kernel, Src: k.Vmlinuz, Mode: 0o644}}
	for _, m := range mods {
		files = append(files, File{Dst: filepath.Join(modDir, m.Rel), Data: m.Image, Mode: 0o644})
	}
	for _, meta := range []string{"modules.builtin", "modules.order"} {
		if _, err := os.Stat(filepath.Join(k.ModulesDir, meta)); err == nil {
			files = append(files, File{Dst: filepath.Join(modDir, meta), Src: filepath.Join(k.ModulesDir, meta), Mode: 0o644})
		}
	}
	return files, kernel
}

// PasstUsers are the /etc/passwd and /etc/group an outer guest that runs
// passt needs: passt, started as root, changes to nobody.
func PasstUsers() []File {
	return []File{
		{Dst: "/etc/passwd", Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), Mode: 0o644},
		{Dst: "/etc/group", Data: []byte("root:x:0:\nnogroup:x:65534:\n"), Mode: 0o644},
	}
}

// PasstBinaries are the host programs (NestedOptions.HostBinaries) that
// run passt in an outer guest: passt, and Debian's passt.avx2 where the
// host has it (passt execs it on CPUs with AVX2).
func PasstBinaries() []string {
	host := []string{"passt"}
	if _, err := os.Stat("/usr/bin/passt.avx2"); err == nil {
		host = append(host, "/usr/bin/passt.avx2")
	}
	return host
}

// outerPanicLine returns the console's panic line, trimmed, for the log.
func outerPanicLine(con string) string {
	i := strings.LastIndex(con, outerPanicMarker)
	if i < 0 {
		return outerPanicMarker
	}
	line, _, _ := strings.Cut(con[i:], "\n")
	return strings.TrimSpace(line)
}
