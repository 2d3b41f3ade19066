package vmtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// QEMUBinary is the emulator the harness runs.
const QEMUBinary = "qemu-system-x86_64"

// Defaults chosen for a loaded 2-core CI machine running TCG.
const (
	DefaultMemoryMiB       = 512
	DefaultTimeout         = 120 * time.Second
	DefaultNestedMemoryMiB = 2048
	DefaultNestedTimeout   = 300 * time.Second
)

// Options configure a VM. Only Kernel and Initramfs are required.
type Options struct {
	Kernel    *Kernel    // kernel to boot (Vmlinuz)
	Initramfs *Initramfs // busybox is added automatically if missing
	// Initrd is a prebuilt initramfs booted as it is, instead of
	// Initramfs (e.g. guest/initramfs's krun-init archive). Such a guest
	// prints no verdict: Wait succeeds when QEMU exits by itself (the
	// guest powered off or wrote to an isa-debug-exit port) and
	// Result.ExitCode holds QEMU's exit status.
	Initrd string
	// MemoryMiB is the guest RAM, backed by a shared memfd so vhost-user
	// back-ends can map it (default 512).
	MemoryMiB int
	CPUs      int           // -smp (default 1)
	CPU       string        // -cpu model (default "max")
	Accel     string        // -accel (default "tcg")
	Cmdline   string        // appended to the default kernel command line
	Timeout   time.Duration // hard limit for the whole run; QEMU is killed (default 120 s)
	// Quiet passes "quiet" to the kernel: only warnings reach the console.
	Quiet bool
	// BootBzImage boots Kernel.Vmlinuz even when the uncompressed
	// Kernel.Vmlinux (PVH entry, about 3 s faster under TCG) is available.
	BootBzImage bool
	// NoConsoleLog stops copying the console into the test log line by
	// line even under go test -v or KRUN_E2E_CONSOLE=1 (StreamConsole).
	// Without streaming, a failure prints the console's last lines and
	// saves all of it to a file it names.
	NoConsoleLog bool
	// ExtraFiles are passed to QEMU as file descriptors 3, 4, ... (for
	// -netdev socket,fd=3 and the like). The VM does not close them.
	ExtraFiles []*os.File
}

// Result is the outcome of a guest run.
type Result struct {
	OK      bool   // the guest printed "<marker> ok"
	Verdict string // the text after the marker: "ok", "fail <reason>", or "" if none
	Reason  string // why the run is not OK (guest reason, timeout, crash)
	Console string // everything the guest printed
	Stderr  string // QEMU's own stderr
	// BootTime is the time from starting QEMU until /init printed its first
	// line; ReadyTime until the modules were loaded and the test script
	// started; Total until QEMU exited.
	BootTime, ReadyTime, Total time.Duration
	// GuestUptime is the guest's /proc/uptime when /init started (kernel
	// boot time as the guest saw it).
	GuestUptime time.Duration
	ExitErr     error // QEMU's exit status, nil when it exited 0
	ExitCode    int   // QEMU's exit code (-1 when killed by a signal)
}

// VM is one QEMU instance. Create it with NewVM, add devices, then Run (or
// Start, Expect/Send, Wait).
type VM struct {
	t    testing.TB
	opts Options
	args []string // device arguments, in order
	nid  int      // id counter for chardevs / drives / netdevs
	dir  string   // per-VM temp dir

	cmd     *exec.Cmd
	stdin   *os.File // write end of QEMU's stdin pipe
	con     *console
	stderr  bytes.Buffer
	start   time.Time
	done    chan struct{} // closed after QEMU exited and output drained
	waitErr error
	timeout *time.Timer
	killed  string // reason QEMU was killed, if it was

	mu       sync.Mutex
	result   *Result
	started  bool
	finished bool
}

// NewVM prepares a VM; nothing runs until Start or Run. QEMU is killed at
// the end of the test at the latest.
func NewVM(t testing.TB, opts Options) *VM {
	t.Helper()
	if opts.Kernel == nil || (opts.Initramfs == nil) == (opts.Initrd == "") {
		t.Fatalf("vmtest.NewVM: Options.Kernel and one of Options.Initramfs and Options.Initrd are required")
	}
	if opts.MemoryMiB <= 0 {
		opts.MemoryMiB = DefaultMemoryMiB
	}
	if opts.CPUs <= 0 {
		opts.CPUs = 1
	}
	if opts.CPU == "" {
		opts.CPU = "max"
	}
	if opts.Accel == "" {
		opts.Accel = "tcg"
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	return &VM{t: t, opts: opts, dir: t.TempDir()}
}

func (vm *VM) id(prefix string) string {
	vm.nid++
	return prefix + strconv.Itoa(vm.nid)
}

// qemuOpt escapes a value for QEMU's comma-separated option syntax.
func qemuOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func props(p []string) string {
	if len(p) == 0 {
		return ""
	}
	return "," + strings.Join(p, ",")
}

// AddDrive attaches a QEMU built-in virtio-blk-pci disk (no vhost-user),
// e.g. for comparisons. format is "raw" or "qcow2". extra are additional
// -device properties ("serial=abc", "num-queues=2").
func (vm *VM) AddDrive(path, format string, readOnly bool, extra ...string) {
	id := vm.id("drive")
	ro := "off"
	if readOnly {
		ro = "on"
	}
	vm.args = append(vm.args,
		"-drive", fmt.Sprintf("file=%s,format=%s,if=none,id=%s,readonly=%s,cache=writeback", qemuOpt(path), format, id, ro),
		"-device", "virtio-blk-pci,drive="+id+props(extra))
}

// AddVhostUserBlk attaches a vhost-user-blk-pci device whose back-end
// listens on the unix socket at socket. extra are -device properties
// ("num-queues=2", "config-wce=off").
func (vm *VM) AddVhostUserBlk(socket string, extra ...string) {
	id := vm.id("vub")
	vm.args = append(vm.args,
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s", id, qemuOpt(socket)),
		"-device", "vhost-user-blk-pci,chardev="+id+props(extra))
}

// AddVhostUserFS attaches a vhost-user-fs-pci device (virtio-fs) with mount
// tag tag; the guest mounts it with `mount -t virtiofs <tag> /mnt`.
func (vm *VM) AddVhostUserFS(socket, tag string, extra ...string) {
	id := vm.id("vufs")
	vm.args = append(vm.args,
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s", id, qemuOpt(socket)),
		"-device", "vhost-user-fs-pci,chardev="+id+",tag="+qemuOpt(tag)+props(extra))
}

// AddVhostUserNet attaches a virtio-net-pci NIC whose back-end is a
// vhost-user net device at socket. extra are -device properties
// ("mac=52:54:00:12:34:56").
func (vm *VM) AddVhostUserNet(socket string, extra ...string) {
	id := vm.id("vunet")
	nd := vm.id("net")
	vm.args = append(vm.args,
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s", id, qemuOpt(socket)),
		"-netdev", "vhost-user,chardev="+id+",id="+nd,
		"-device", "virtio-net-pci,netdev="+nd+props(extra))
}

// AddArgs appends raw QEMU arguments.
func (vm *VM) AddArgs(args ...string) { vm.args = append(vm.args, args...) }

// Initramfs returns the VM's initramfs builder, to add files or modules
// before Start.
func (vm *VM) Initramfs() *Initramfs { return vm.opts.Initramfs }

// Cmdline returns the kernel command line the VM boots with.
func (vm *VM) Cmdline() string {
	// mitigations=off saves patching work that is slow under TCG; the
	// rest skips probes that only cost time in a test VM.
	c := "console=ttyS0 panic=-1 reboot=t no_timer_check tsc=reliable i8042.noaux mitigations=off"
	if vm.opts.Quiet {
		c += " quiet"
	}
	if vm.opts.Accel == "tcg" {
		if t := tscCmdline(); t != "" {
			c += " " + t
		}
	}
	if vm.opts.Cmdline != "" {
		c += " " + vm.opts.Cmdline
	}
	return c
}

// KernelPath returns the kernel file QEMU boots: Kernel.Vmlinux when
// available, else the bzImage.
func (vm *VM) KernelPath() string {
	if vm.opts.Kernel.Vmlinux != "" && !vm.opts.BootBzImage {
		return vm.opts.Kernel.Vmlinux
	}
	return vm.opts.Kernel.Vmlinuz
}

// Args returns the full QEMU argument list (after the initramfs path is
// known). Exposed for debugging and tests.
func (vm *VM) Args(initrd string) []string {
	mem := strconv.Itoa(vm.opts.MemoryMiB) + "M"
	a := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "pc", "-accel", vm.opts.Accel, "-cpu", vm.opts.CPU,
		"-smp", strconv.Itoa(vm.opts.CPUs),
		"-m", mem,
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
		"-numa", "node,memdev=mem",
		"-chardev", "stdio,id=con0,signal=off",
		"-serial", "chardev:con0",
		"-kernel", vm.KernelPath(),
		"-initrd", initrd,
		"-append", vm.Cmdline(),
	}
	return append(a, vm.args...)
}

// Start builds the initramfs and starts QEMU.
func (vm *VM) Start() error {
	vm.t.Helper()
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.started {
		return fmt.Errorf("vmtest: VM already started")
	}
	vm.started = true
	initrd := vm.opts.Initrd
	if ib := vm.opts.Initramfs; ib != nil {
		if !ib.HasBusybox() {
			bb, err := FetchBusybox(testContext(vm.t))
			if err != nil {
				return fmt.Errorf("vmtest: get busybox: %w", err)
			}
			ib.AddBusybox(bb)
		}
		initrd = filepath.Join(vm.dir, "initramfs.cpio")
		if err := ib.Write(initrd); err != nil {
			return fmt.Errorf("vmtest: build initramfs: %w", err)
		}
	}
	args := vm.Args(initrd)
	vm.t.Logf("vmtest: %s %s", QEMUBinary, strings.Join(args, " "))

	cmd := exec.Command(QEMUBinary, args...)
	cmd.Dir = vm.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.ExtraFiles = vm.opts.ExtraFiles
	// An os.Pipe (unlike cmd.StdinPipe) supports write deadlines, so Send
	// cannot hang when QEMU stops reading.
	stdinR, stdin, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("vmtest: stdin pipe: %w", err)
	}
	defer stdinR.Close() // QEMU holds its own copy after Start
	cmd.Stdin = stdinR
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("vmtest: stdout pipe: %w", err)
	}
	cmd.Stderr = &lockedWriter{mu: &vm.mu, w: &vm.stderr}
	vm.start = time.Now()
	t := vm.t
	var logLine func(string)
	if vm.streams() {
		logLine = func(s string) { t.Log(s) }
	}
	vm.con = newConsole(vm.start, logLine, "KRUN-E2E-INIT", "KRUN-E2E-READY")
	if err := cmd.Start(); err != nil {
		stdin.Close()
		return fmt.Errorf("vmtest: start %s: %w", QEMUBinary, err)
	}
	vm.cmd, vm.stdin = cmd, stdin
	vm.done = make(chan struct{})
	vm.timeout = time.AfterFunc(vm.opts.Timeout, func() {
		vm.kill(fmt.Sprintf("timed out after %v", vm.opts.Timeout))
	})
	go func() {
		_, _ = io.Copy(vm.con, stdout)
		vm.con.flush()
		err := cmd.Wait()
		vm.timeout.Stop()
		vm.mu.Lock()
		vm.waitErr = err
		vm.mu.Unlock()
		vm.con.close()
		stdin.Close()
		close(vm.done)
	}()
	vm.t.Cleanup(func() {
		vm.kill("test ended")
		<-vm.done
	})
	return nil
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// kill stops QEMU (if still running), recording why.
func (vm *VM) kill(reason string) {
	vm.mu.Lock()
	if vm.cmd == nil || vm.cmd.Process == nil {
		vm.mu.Unlock()
		return
	}
	if vm.killed == "" {
		vm.killed = reason
	}
	p := vm.cmd.Process
	vm.mu.Unlock()
	select {
	case <-vm.done:
		return
	default:
	}
	_ = p.Kill()
}

// Kill stops QEMU now.
func (vm *VM) Kill() { vm.kill("killed by the test") }

// wasKilled says whether the harness (a timeout, a watchdog or the test)
// killed QEMU, as against QEMU exiting by itself.
func (vm *VM) wasKilled() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.killed != ""
}

// Expect waits up to timeout for the regular expression pattern to match
// console output that arrived after the previous Expect's match, and returns
// the match followed by its submatches.
func (vm *VM) Expect(pattern string, timeout time.Duration) ([]string, error) {
	re, err := regexp.Compile(pattern)
	if err != nil {
		return nil, fmt.Errorf("vmtest: expect: %w", err)
	}
	if vm.con == nil {
		return nil, fmt.Errorf("vmtest: expect before Start")
	}
	return vm.con.expect(re, timeout)
}

// MustExpect is Expect that fails the test (with the console so far).
func (vm *VM) MustExpect(pattern string, timeout time.Duration) []string {
	vm.t.Helper()
	m, err := vm.Expect(pattern, timeout)
	if err != nil {
		vm.t.Fatalf("vmtest: %v\n%s", err, vm.failureText())
	}
	return m
}

// sendTimeout bounds how long Send waits for QEMU to take the input.
const sendTimeout = 30 * time.Second

// Send writes s to the guest's serial console (it is what a user would
// type; include "\n" to end a line). It fails if QEMU has exited or does
// not take the input within 30 s.
func (vm *VM) Send(s string) error {
	if vm.stdin == nil {
		return fmt.Errorf("vmtest: send before Start")
	}
	select {
	case <-vm.done:
		return fmt.Errorf("vmtest: send to console: QEMU has exited")
	default:
	}
	if err := vm.stdin.SetWriteDeadline(time.Now().Add(sendTimeout)); err != nil {
		return fmt.Errorf("vmtest: send to console: %w", err)
	}
	if _, err := io.WriteString(vm.stdin, s); err != nil {
		return fmt.Errorf("vmtest: send to console: %w", err)
	}
	return nil
}

// Console returns the console output so far.
func (vm *VM) Console() string {
	if vm.con == nil {
		return ""
	}
	return vm.con.String()
}

// failureTail is how many console lines a failure message shows. A
// failing test's log stays short enough that CI's excerpt of it (its
// first lines) holds the reason and the end of the console; the whole
// console goes to a file (saveConsole).
const failureTail = 80

// StreamConsole reports whether guests' consoles are copied into the
// test log line by line as they print: under go test -v, or with
// KRUN_E2E_CONSOLE=1. Otherwise only a failure shows the console's tail.
func StreamConsole() bool {
	return testing.Verbose() || os.Getenv("KRUN_E2E_CONSOLE") == "1"
}

func (vm *VM) streams() bool { return !vm.opts.NoConsoleLog && StreamConsole() }

func (vm *VM) failureText() string {
	vm.mu.Lock()
	stderr := vm.stderr.String()
	vm.mu.Unlock()
	con := vm.Console()
	head := "---- guest console ----\n"
	tail := LastLines(con, failureTail)
	if tail != strings.TrimRight(con, "\r\n") {
		where := "all of it is logged above"
		if !vm.streams() {
			where = saveConsole(vm.t.Name(), con)
		}
		head = fmt.Sprintf("---- last %d lines of the guest console (%s) ----\n", failureTail, where)
	}
	s := head + tail + "\n---- end of console ----"
	if stderr != "" {
		s += "\n---- qemu stderr ----\n" + LastLines(stderr, 20) + "\n---- end of stderr ----"
	}
	return s
}

// saveConsole writes a failed guest's whole console to a file outside the
// test's temporary directory (which is removed) and says where.
func saveConsole(test, con string) string {
	name := strings.Map(func(r rune) rune {
		if r == '/' || r == ' ' {
			return '_'
		}
		return r
	}, test)
	f, err := os.CreateTemp("", "krun-e2e-"+name+"-*.console")
	if err != nil {
		return fmt.Sprintf("whole console not saved: %v", err)
	}
	defer f.Close()
	if _, err := f.WriteString(con); err != nil {
		return fmt.Sprintf("whole console not saved: %v", err)
	}
	return "all of it in " + f.Name()
}

// LastLines returns the last n lines of s (a console), without its
// trailing line end.
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\r\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// MustWait is Wait for a test: a guest that did not report ok fails the
// test with the reason and the console's last lines.
func (vm *VM) MustWait() *Result {
	vm.t.Helper()
	r, err := vm.Wait()
	if err != nil {
		vm.t.Fatalf("%v\n%s", err, vm.failureText())
	}
	return r
}

// Wait waits for QEMU to exit (the guest powers off after its verdict, or the
// timeout kills it) and returns the result. The error is non-nil unless the
// guest reported ok; it carries the reason, not the console.
func (vm *VM) Wait() (*Result, error) {
	if vm.done == nil {
		return nil, fmt.Errorf("vmtest: wait before Start")
	}
	<-vm.done
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.result != nil {
		return vm.result, vm.resultErr()
	}
	r := &Result{Console: vm.con.String(), Stderr: vm.stderr.String(), Total: time.Since(vm.start), ExitErr: vm.waitErr}
	r.BootTime, _ = vm.con.mark("KRUN-E2E-INIT")
	r.ReadyTime, _ = vm.con.mark("KRUN-E2E-READY")
	if m := regexp.MustCompile(`KRUN-E2E-INIT ([0-9.]+)`).FindStringSubmatch(r.Console); m != nil {
		if f, err := strconv.ParseFloat(m[1], 64); err == nil {
			r.GuestUptime = time.Duration(f * float64(time.Second))
		}
	}
	var ee *exec.ExitError
	if errors.As(vm.waitErr, &ee) {
		r.ExitCode = ee.ExitCode()
	}
	if vm.opts.Initramfs != nil {
		marker := vm.opts.Initramfs.ResultMarker()
		re := regexp.MustCompile(regexp.QuoteMeta(marker) + ` (ok|fail ?[^\r\n]*)`)
		if m := re.FindStringSubmatch(r.Console); m != nil {
			r.Verdict = m[1]
		}
	}
	switch {
	case vm.opts.Initramfs == nil:
		r.OK = vm.killed == "" && r.ExitCode >= 0
		if !r.OK {
			r.Reason = fmt.Sprintf("QEMU %s (%v)", vm.killed, vm.waitErr)
		}
	case r.Verdict == "ok":
		r.OK = true
	case r.Verdict != "":
		r.Reason = "guest reported " + r.Verdict
	case vm.killed != "":
		r.Reason = "no verdict from the guest: QEMU " + vm.killed
	case vm.waitErr != nil:
		r.Reason = fmt.Sprintf("no verdict from the guest: QEMU exited with %v", vm.waitErr)
	default:
		r.Reason = "no verdict from the guest: QEMU exited (guest powered off, rebooted or panicked)"
	}
	if r.OK && vm.waitErr != nil && vm.killed == "" && vm.opts.Initramfs != nil {
		r.OK = false
		r.Reason = fmt.Sprintf("guest reported ok but QEMU exited with %v", vm.waitErr)
	}
	vm.result = r
	vm.finished = true
	return r, vm.resultErr()
}

func (vm *VM) resultErr() error {
	if vm.result.OK {
		return nil
	}
	return errors.New(vm.result.Reason)
}

// Run starts the VM, waits for the guest's verdict and fails the test with
// the full console if it is not ok. It logs the boot times.
func (vm *VM) Run() *Result {
	vm.t.Helper()
	if err := vm.Start(); err != nil {
		vm.t.Fatal(err)
	}
	r, err := vm.Wait()
	vm.t.Logf("vmtest: init after %v (guest uptime %v), ready after %v, exit after %v",
		r.BootTime.Round(time.Millisecond), r.GuestUptime.Round(time.Millisecond),
		r.ReadyTime.Round(time.Millisecond), r.Total.Round(time.Millisecond))
	if err != nil {
		vm.t.Fatalf("vmtest: %v\n%s", err, vm.failureText())
	}
	return r
}

// Boot is the one-call form: it builds a VM from opts, runs it and returns
// the result, failing the test unless the guest reported ok.
func Boot(t testing.TB, opts Options) *Result {
	t.Helper()
	return NewVM(t, opts).Run()
}

// qemuAvailable reports whether the emulator is on PATH.
func qemuAvailable() (string, error) {
	p, err := exec.LookPath(QEMUBinary)
	if err != nil {
		return "", fmt.Errorf("%s not installed (Debian: apt-get install qemu-system-x86)", QEMUBinary)
	}
	return p, nil
}
