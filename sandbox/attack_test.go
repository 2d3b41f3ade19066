package sandbox

// Security attack probes: a sandboxed plugin (this test binary, helper mode
// "attack") tries what a compromised plugin would, in a real sandboxed
// launch (LaunchConfig.Apply + trampoline). Each Test* test FAILS
// when the plugin gets further than docs/SECURITY.md says it can.

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

const envAttackMode = "KRUN_ATTACK_MODE"
const envAttackArg = "KRUN_ATTACK_ARG"

// Fds of the attack probe: 3 disk, 4 vhost-user end, 5 an extra file
// (guest RAM memfd) when the test hands one.
const (
	revDisk  = 3
	revVhost = 4
	revExtra = 5
)

type attackResult struct {
	Mode    string            `json:"mode"`
	Err     string            `json:"err,omitempty"`
	Errnos  map[string]int    `json:"errnos,omitempty"`
	Values  map[string]uint64 `json:"values,omitempty"`
	Details map[string]string `json:"details,omitempty"`
}

func attackEmit(r attackResult) {
	b, _ := json.Marshal(r)
	os.Stdout.Write(append(b, '\n'))
}

func attackMain() int {
	mode := os.Getenv(envAttackMode)
	arg, _ := strconv.ParseUint(os.Getenv(envAttackArg), 10, 64)
	res := attackResult{Mode: mode, Errnos: map[string]int{}, Values: map[string]uint64{}, Details: map[string]string{}}
	restrict := func(kind string) bool {
		p, _ := DefaultPolicy(kind, -1)
		if err := Restrict(p, hclog.NewNullLogger()); err != nil {
			res.Err = "restrict: " + err.Error()
			attackEmit(res)
			return false
		}
		return true
	}
	switch mode {
	case "nrflood":
		// A refused call with a new number each time (x32 numbers have
		// no name), to flood the launcher's log and grow its counts.
		var refused uint64
		for i := uint64(0); i < arg; i++ {
			if _, err := sys(uintptr(x32SyscallBit | i)); err == unix.EPERM {
				refused++
			}
		}
		res.Values["refused"] = refused
	case "memfd":
		// A compromised block plugin (after Restrict) fills a memfd of its
		// own: shmem pages, not counted by RLIMIT_DATA.
		if !restrict("blk") {
			return 3
		}
		var lim unix.Rlimit
		unix.Prlimit(0, unix.RLIMIT_DATA, nil, &lim)
		res.Values["rlimit_data"] = lim.Cur
		fd, err := unix.MemfdCreate("hog", unix.MFD_CLOEXEC)
		if err != nil {
			res.Errnos["memfd_create"] = errnoOf(err)
			break
		}
		chunk := make([]byte, 1<<20)
		for i := range chunk {
			chunk[i] = 1
		}
		var written uint64
		for written < arg {
			n, err := unix.Pwrite(fd, chunk, int64(written))
			if err != nil {
				res.Errnos["pwrite"] = errnoOf(err)
				break
			}
			written += uint64(n)
		}
		res.Values["memfd_bytes"] = written
		attackEmit(res)
		bufio.NewReader(os.Stdin).ReadString('\n') // hold it while the test looks
		return 0
	case "threads":
		// A compromised plugin makes OS threads (clone with the Go
		// runtime's own thread flags is allowed) until told to stop.
		if !restrict("blk") {
			return 3
		}
		debug.SetMaxThreads(1 << 20)
		ready := make(chan struct{})
		block := make(chan struct{})
		for i := uint64(0); i < arg; i++ {
			go func() {
				runtime.LockOSThread()
				ready <- struct{}{}
				<-block
			}()
			<-ready
		}
		res.Values["threads_made"] = arg
		var lim unix.Rlimit
		unix.Prlimit(0, unix.RLIMIT_NPROC, nil, &lim)
		res.Values["rlimit_nproc"] = lim.Cur
		attackEmit(res)
		bufio.NewReader(os.Stdin).ReadString('\n')
		return 0
	case "rowrite":
		// fd 5 is a share the user declared readonly=on. fs-virtio's
		// policy for it is the same as for a writable share
		// (plugins/fs-virtio/main.go Policy: DefaultPolicy("fs", fd)).
		p, _ := DefaultPolicy("fs", revExtra)
		if err := Restrict(p, hclog.NewNullLogger()); err != nil {
			res.Err = "restrict: " + err.Error()
			break
		}
		fd, err := unix.Openat(revExtra, "planted", unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o755)
		res.Errnos["create"] = errnoOf(err)
		if err == nil {
			unix.Write(fd, []byte("#!/bin/sh\n"))
			unix.Close(fd)
		}
		res.Errnos["unlink"] = errnoOf(unix.Unlinkat(revExtra, "victim", 0))
	case "guestmem":
		// fd 5 is guest RAM as the core shares it (SET_MEM_TABLE). A
		// compromised block plugin shrinks it.
		if !restrict("blk") {
			return 3
		}
		var st unix.Stat_t
		unix.Fstat(revExtra, &st)
		res.Values["size_before"] = uint64(st.Size)
		res.Errnos["ftruncate_0"] = errnoOf(unix.Ftruncate(revExtra, 0))
		unix.Fstat(revExtra, &st)
		res.Values["size_after"] = uint64(st.Size)
		attackEmit(res)
		return 0
	case "growdisk":
		// A compromised block plugin grows its image (fd 3) every way
		// its profile allows, to fill the host's file system: writes far
		// past the end, ftruncate, fallocate that grows the size, and
		// fallocate that allocates past the end without growing it
		// (KEEP_SIZE). arg is its RLIMIT_FSIZE, with the lowest bit set
		// to skip Restrict: the trampoline's filter alone.
		if arg&1 == 0 && !restrict("blk") {
			return 3
		}
		limit := int64(arg &^ 1)
		var lim unix.Rlimit
		unix.Prlimit(0, unix.RLIMIT_FSIZE, nil, &lim)
		res.Values["rlimit_fsize"] = lim.Cur
		buf := make([]byte, 8192)
		n, err := unix.Pwrite(revDisk, buf, limit-4096) // crosses the limit: a short write
		res.Values["write_across"] = uint64(max(n, 0))
		res.Errnos["write_across"] = errnoOf(err)
		_, err = unix.Pwrite(revDisk, buf, limit)
		res.Errnos["write_at_limit"] = errnoOf(err)
		_, err = unix.Pwrite(revDisk, buf, 1<<40)
		res.Errnos["write_far"] = errnoOf(err)
		res.Errnos["ftruncate_up"] = errnoOf(unix.Ftruncate(revDisk, 1<<40))
		res.Errnos["fallocate_grow"] = errnoOf(unix.Fallocate(revDisk, 0, limit, 64<<20))
		res.Errnos["fallocate_zero_grow"] = errnoOf(unix.Fallocate(revDisk, unix.FALLOC_FL_ZERO_RANGE, limit, 64<<20))
		res.Errnos["fallocate_keep_size"] = errnoOf(unix.Fallocate(revDisk, unix.FALLOC_FL_KEEP_SIZE, limit, 64<<20))
		res.Errnos["fallocate_zero_keep_size"] = errnoOf(unix.Fallocate(revDisk,
			unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, limit, 64<<20))
		res.Errnos["fallocate_insert"] = errnoOf(unix.Fallocate(revDisk, unix.FALLOC_FL_INSERT_RANGE, 0, 64<<20))
		// What a disk plugin does inside its image stays allowed.
		res.Errnos["write_inside"] = errnoOf(func() error { _, err := unix.Pwrite(revDisk, buf[:4096], 0); return err }())
		res.Errnos["fallocate_punch"] = errnoOf(unix.Fallocate(revDisk, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096))
		res.Errnos["fallocate_inside"] = errnoOf(unix.Fallocate(revDisk, 0, 0, 4096))
		var st unix.Stat_t
		unix.Fstat(revDisk, &st)
		res.Values["size"] = uint64(st.Size)
		res.Values["allocated"] = uint64(st.Blocks) * 512
	case "memexec":
		// A hostile third-party plugin (no Restrict) executes code it
		// wrote into a memfd, through the execveat the start-up calls
		// allow for the plugin binary's fd number.
		e, err := decodeLaunchEnv(os.Getenv(envName))
		if err != nil {
			res.Err = err.Error()
			break
		}
		res.Values["exec_fd"] = uint64(e.ExecFD)
		if os.Getenv(envAttackArg) == "restrict" && !restrict("blk") {
			return 3
		}
		fd, err := unix.MemfdCreate("payload", 0)
		if err != nil {
			res.Errnos["memfd_create"] = errnoOf(err)
			break
		}
		if _, err := unix.Pwrite(fd, tinyELF(42), 0); err != nil {
			res.Errnos["pwrite"] = errnoOf(err)
			break
		}
		nfd := fd // memfd_create may already have taken the freed number
		if fd != e.ExecFD {
			unix.Close(e.ExecFD) // in case the runtime reused the number
			nfd, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, e.ExecFD)
		}
		res.Values["payload_fd"] = uint64(nfd)
		if err != nil || nfd != e.ExecFD {
			res.Errnos["dup"] = errnoOf(err)
			res.Details["dup"] = fmt.Sprintf("got fd %d want %d", nfd, e.ExecFD)
			break
		}
		empty := cstr("")
		argv := []*byte{cstr("payload"), nil}
		envv := []*byte{nil}
		_, err = sys(unix.SYS_EXECVEAT, uintptr(nfd), uintptr(unsafe.Pointer(empty)),
			uintptr(unsafe.Pointer(&argv[0])), uintptr(unsafe.Pointer(&envv[0])), unix.AT_EMPTY_PATH)
		res.Errnos["execveat_memfd"] = errnoOf(err)
	case "hugetlb":
		// A compromised plugin takes huge pages: from the host's
		// reserved pool (vm.nr_hugepages), which other VMs on the host
		// may be counting on, and which a memory cgroup does not
		// charge (hugetlb has a controller of its own), so the
		// documented remedy for memory in memfds does not bound it.
		// Before Restrict (the launch filter) when arg is 0, after it
		// otherwise.
		if arg != 0 && !restrict("blk") {
			return 3
		}
		const huge = 2 << 20
		b, err := sys(unix.SYS_MMAP, 0, huge, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_SHARED|unix.MAP_ANONYMOUS|unix.MAP_HUGETLB, ^uintptr(0), 0)
		if err == nil {
			sys(unix.SYS_MUNMAP, b, huge)
		}
		res.Errnos["mmap_hugetlb"] = errnoOf(err)
		fd, err := sys(unix.SYS_MEMFD_CREATE, uintptr(unsafe.Pointer(cstr("huge"))), unix.MFD_CLOEXEC|unix.MFD_HUGETLB)
		if err == nil {
			res.Errnos["fallocate_hugetlb"] = errnoOf(unix.Fallocate(int(fd), 0, 0, huge))
			closeFD(fd)
		}
		res.Errnos["memfd_create_hugetlb"] = errnoOf(err)
	case "tty":
		// fd 5 is a terminal the user's shell reads (the console
		// plugin holds krun-core's stdin, stdout and stderr). A
		// compromised console plugin (after Restrict with its policy
		// when arg is 1) makes it its controlling terminal, types into
		// it (TIOCSTI: the shell would run what it types), changes its
		// line discipline and settings, and so on.
		if arg != 0 && !restrict("net") {
			return 3
		}
		signal.Ignore(syscall.SIGHUP) // TIOCNOTTY of its controlling terminal hangs the session up
		ioctl := func(req uint, p unsafe.Pointer) error {
			_, err := sys(unix.SYS_IOCTL, revExtra, uintptr(req), uintptr(p))
			return err
		}
		try := func(name string, f func() error) { res.Errnos[name] = errnoOf(f()) }
		try("TIOCSCTTY", func() error { return ioctl(unix.TIOCSCTTY, nil) })
		try("TIOCSTI", func() error {
			for _, c := range []byte("id\n") {
				if err := ioctl(unix.TIOCSTI, unsafe.Pointer(&c)); err != nil {
					return err
				}
			}
			return nil
		})
		try("TIOCLINUX", func() error { sub := byte(6); return ioctl(unix.TIOCLINUX, unsafe.Pointer(&sub)) })
		try("TIOCSETD", func() error { ld := int32(0); return ioctl(unix.TIOCSETD, unsafe.Pointer(&ld)) }) // N_TTY
		try("TCSETS", func() error {
			var tio unix.Termios
			if err := ioctl(unix.TCGETS, unsafe.Pointer(&tio)); err != nil {
				return err
			}
			tio.Lflag ^= unix.ECHO
			return ioctl(unix.TCSETS, unsafe.Pointer(&tio))
		})
		try("TIOCSWINSZ", func() error { ws := unix.Winsize{Row: 1, Col: 1}; return ioctl(unix.TIOCSWINSZ, unsafe.Pointer(&ws)) })
		try("FIONBIO", func() error { on := int32(1); return ioctl(0x5421, unsafe.Pointer(&on)) }) // not in x/sys
		try("TIOCNOTTY", func() error { return ioctl(unix.TIOCNOTTY, nil) })
	case "setfl":
		// fd 5 is krun-core's stderr, a file (krun-core ... 2>>log): the
		// console plugin is handed it as the guest's stderr, and a
		// regular file keeps its one open file description, shared
		// with krun-core and the user's shell. A compromised console
		// plugin (after Restrict) sets O_DIRECT on it, so that their
		// unaligned writes (krun-core's log, the refusals of this very
		// plugin among them) fail with EINVAL, and O_ASYNC, which
		// sends SIGIO (fatal by default) to the description's owner.
		if !restrict("net") {
			return 3
		}
		fl, err := unix.FcntlInt(revExtra, unix.F_GETFL, 0)
		if err != nil {
			res.Err = "F_GETFL: " + err.Error()
			break
		}
		// What the Go runtime does (SetNonblock), and back.
		_, err = unix.FcntlInt(revExtra, unix.F_SETFL, fl|unix.O_NONBLOCK)
		res.Errnos["setfl_nonblock"] = errnoOf(err)
		_, err = unix.FcntlInt(revExtra, unix.F_SETFL, fl)
		res.Errnos["setfl_back"] = errnoOf(err)
		_, err = unix.FcntlInt(revExtra, unix.F_SETFL, fl|unix.O_ASYNC)
		res.Errnos["setfl_async"] = errnoOf(err)
		_, err = unix.FcntlInt(revExtra, unix.F_SETFL, fl|unix.O_DIRECT) // and left so
		res.Errnos["setfl_direct"] = errnoOf(err)
	case "sockshut":
		// fd 5 is krun-core's stdout, a socket (a systemd service's
		// journal stream, say): the console plugin is handed it
		// duplicated, one socket shared with krun-core and every other
		// process writing to that stream. A compromised console plugin
		// (after Restrict with its policy when arg is 1) shuts it down
		// and sets options on it.
		if arg != 0 {
			p, _ := DefaultPolicy("console", -1)
			if err := Restrict(p, hclog.NewNullLogger()); err != nil {
				res.Err = "restrict: " + err.Error()
				break
			}
		}
		tv := unix.Timeval{Usec: 1}
		res.Errnos["setsockopt_sndtimeo"] = errnoOf(unix.SetsockoptTimeval(revExtra, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv))
		res.Errnos["setsockopt_sndbuf"] = errnoOf(unix.SetsockoptInt(revExtra, unix.SOL_SOCKET, unix.SO_SNDBUF, 1))
		res.Errnos["shutdown"] = errnoOf(unix.Shutdown(revExtra, unix.SHUT_RDWR))
	case "misc":
		// Things that should be refused after Restrict (block).
		e, _ := decodeLaunchEnv(os.Getenv(envName))
		if !restrict("blk") {
			return 3
		}
		try := func(name string, f func() error) { res.Errnos[name] = errnoOf(f()) }
		try("execveat_binary_fd", func() error {
			argv := []*byte{cstr("x"), nil}
			_, err := sys(unix.SYS_EXECVEAT, uintptr(e.ExecFD), uintptr(unsafe.Pointer(cstr(""))),
				uintptr(unsafe.Pointer(&argv[0])), uintptr(unsafe.Pointer(&argv[1])), unix.AT_EMPTY_PATH)
			return err
		})
		try("clone_newuser_thread_flags", func() error {
			r, _, en := unix.RawSyscall6(unix.SYS_CLONE, uintptr(goThreadCloneFlags|unix.CLONE_NEWUSER), 0, 0, 0, 0, 0)
			if en == 0 && r == 0 {
				unix.RawSyscall(unix.SYS_EXIT, 0, 0, 0)
			}
			if en != 0 {
				return en
			}
			return nil
		})
		try("clone3", func() error { _, err := sys(435, 0, 0); return err })
		try("x32_getpid", func() error { _, err := sys(uintptr(x32SyscallBit | 39)); return err })
		try("kill_minus1", func() error { _, err := sys(unix.SYS_KILL, ^uintptr(0), 0); return err })
		try("tiocsti_stderr", func() error {
			c := byte('x')
			_, err := sys(unix.SYS_IOCTL, 2, unix.TIOCSTI, uintptr(unsafe.Pointer(&c)))
			return err
		})
		try("socket_unix", func() error {
			fd, err := sys(unix.SYS_SOCKET, unix.AF_UNIX, unix.SOCK_STREAM, 0)
			if err == nil {
				closeFD(fd)
			}
			return err
		})
		try("mprotect_exec", func() error {
			b, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
			if err != nil {
				return err
			}
			_, err = sys(unix.SYS_MPROTECT, uintptr(unsafe.Pointer(&b[0])), 4096, unix.PROT_READ|unix.PROT_EXEC)
			return err
		})
		try("setrlimit_nofile", func() error {
			l := unix.Rlimit{Cur: 1 << 20, Max: 1 << 20}
			_, err := sys(unix.SYS_SETRLIMIT, unix.RLIMIT_NOFILE, uintptr(unsafe.Pointer(&l)))
			return err
		})
		try("fcntl_add_seals", func() error { _, err := unix.FcntlInt(revDisk, unix.F_ADD_SEALS, 0); return err })
		try("fcntl_setown", func() error { _, err := unix.FcntlInt(revVhost, unix.F_SETOWN, 1); return err })
		try("prctl_set_pdeathsig", func() error { return unix.Prctl(unix.PR_SET_PDEATHSIG, 0, 0, 0, 0) })
		try("openat_after_restrict", func() error {
			fd, err := sys(unix.SYS_OPENAT, atFDCWD(), uintptr(unsafe.Pointer(cstr("/"))), unix.O_RDONLY)
			if err == nil {
				closeFD(fd)
			}
			return err
		})
	default:
		if strings.HasPrefix(mode, "x-") {
			return extraAttackMain(mode, os.Getenv(envAttackArg)) // attack_extra_probe_test.go
		}
		res.Err = "unknown attack mode " + mode
	}
	attackEmit(res)
	return 0
}

// tinyELF is a minimal static x86-64 executable: exit_group(code).
func tinyELF(code byte) []byte {
	const base = 0x400000
	text := []byte{0xbf, code, 0, 0, 0, 0xb8, 231, 0, 0, 0, 0x0f, 0x05} // mov edi,code; mov eax,231; syscall
	b := make([]byte, 64+56)
	copy(b, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0})
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2)    // ET_EXEC
	le.PutUint16(b[18:], 0x3e) // x86-64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[24:], base+120) // entry
	le.PutUint64(b[32:], 64)       // phoff
	le.PutUint16(b[52:], 64)       // ehsize
	le.PutUint16(b[54:], 56)       // phentsize
	le.PutUint16(b[56:], 1)        // phnum
	ph := b[64:]
	le.PutUint32(ph[0:], 1)     // PT_LOAD
	le.PutUint32(ph[4:], 5)     // R+X
	le.PutUint64(ph[16:], base) // vaddr
	le.PutUint64(ph[24:], base)
	le.PutUint64(ph[32:], uint64(120+len(text)))
	le.PutUint64(ph[40:], uint64(120+len(text)))
	le.PutUint64(ph[48:], 0x1000)
	return append(b, text...)
}

type attackProc struct {
	cmd    *exec.Cmd
	out    *bufio.Scanner
	stdin  interface{ Close() error }
	stderr *syncbuf.Buffer
}

// startAttack launches this binary in helper mode "attack" in the full
// sandbox, with a disk, a vhost-user socket end and extra as fds 3, 4, 5.
func startAttack(t *testing.T, kind, mode, arg string, lc LaunchConfig, extra *os.File) *attackProc {
	t.Helper()
	requireSandboxHost(t)
	dir, err := os.MkdirTemp("", "krun-attack-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	disk, err := os.OpenFile(filepath.Join(dir, "disk.img"), os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { disk.Close() })
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(pair[0]), "a"), os.NewFile(uintptr(pair[1]), "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	sockDir := filepath.Join(dir, "sock")
	os.Mkdir(sockDir, 0o700)
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = []string{envHelper + "=attack", envAttackMode + "=" + mode, envAttackArg + "=" + arg,
		envSocketDir + "=" + sockDir}
	cmd.ExtraFiles = []*os.File{disk, b}
	if extra != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, extra)
	}
	p := &attackProc{cmd: cmd, stderr: &syncbuf.Buffer{}}
	cmd.Stderr = p.stderr
	cmd.WaitDelay = 10 * time.Second
	stdin, _ := cmd.StdinPipe()
	p.stdin = stdin
	stdout, _ := cmd.StdoutPipe()
	if lc.Kind == "" {
		lc.Kind = kind
	}
	lc.Log = hclog.New(&hclog.LoggerOptions{Output: p.stderr})
	if err := lc.Apply(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("attack probe stderr:\n%s", p.stderr.String())
		}
	})
	p.out = bufio.NewScanner(stdout)
	p.out.Buffer(make([]byte, 1<<20), 1<<20)
	return p
}

func (p *attackProc) result(t *testing.T) (attackResult, bool) {
	t.Helper()
	done := make(chan bool, 1)
	var r attackResult
	go func() {
		if !p.out.Scan() {
			done <- false
			return
		}
		if err := json.Unmarshal(p.out.Bytes(), &r); err != nil {
			r.Err = "garbage: " + p.out.Text()
		}
		done <- true
	}()
	select {
	case ok := <-done:
		if ok && r.Err != "" {
			t.Fatalf("probe: %s\nstderr:\n%s", r.Err, p.stderr.String())
		}
		return r, ok
	case <-time.After(120 * time.Second):
		t.Fatalf("no result from the attack probe in 120s; stderr:\n%s", p.stderr.String())
	}
	return r, false
}

// A compromised plugin cannot make as many threads (host tasks, host
// pids) as it likes: the trampoline sets RLIMIT_NPROC (Limits.Tasks,
// counted in the plugin's own user namespace), so a thread bomb ends the
// plugin, not the host's pids (the core must create threads to run, or
// its Go runtime aborts). Before the fix a plugin ran 3000 threads, with
// the host's RLIMIT_NPROC (from review).
func TestThreadCountBounded(t *testing.T) {
	const n = 3000
	p := startAttack(t, "blk", "threads", strconv.Itoa(n), LaunchConfig{}, nil)
	r, ok := p.result(t)
	if !ok {
		if err := p.cmd.Wait(); !strings.Contains(p.stderr.String(), "failed to create new OS thread") {
			t.Fatalf("probe died (%v), not for want of threads; stderr:\n%s", err, p.stderr.String())
		}
		return // the bomb ended the plugin at its limit
	}
	st, _ := readStatus(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	threads, _ := strconv.Atoi(st["Threads"])
	if threads >= n || r.Values["rlimit_nproc"] > DefaultTasks {
		t.Errorf("sandboxed block plugin (after Restrict) runs %d threads (RLIMIT_NPROC %d): no bound on tasks",
			threads, int64(r.Values["rlimit_nproc"]))
	}
}

// A compromised block plugin must not fill the host's file system through
// its image: the launcher sets RLIMIT_FSIZE (Limits.FileBytes, from the
// image: devspec.Opened.FileBytes), so a write, ftruncate or fallocate
// past it fails with EFBIG, and the plugin lives on (SIGXFSZ is ignored);
// the block profile refuses fallocate with KEEP_SIZE but for punching a
// hole, which would allocate past the end without changing the size
// (RLIMIT_FSIZE does not see that). Both with the plugin's own Restrict
// and with the trampoline's filter alone. Before the fix the plugin grew
// its image to 1 TiB (ftruncate) and allocated 64 MiB past its end.
func TestBlockPluginCannotGrowImage(t *testing.T) {
	const limit = 1 << 20
	for _, c := range []struct {
		name string
		arg  uint64
	}{{"restricted", limit}, {"launch filter", limit | 1}} {
		t.Run(c.name, func(t *testing.T) {
			p := startAttack(t, "blk-raw", "growdisk", strconv.FormatUint(c.arg, 10),
				LaunchConfig{Limits: Limits{FileBytes: limit}}, nil)
			r, ok := p.result(t)
			if !ok {
				err := p.cmd.Wait()
				t.Fatalf("probe died (%v): killed by SIGXFSZ? stderr:\n%s", err, p.stderr.String())
			}
			if r.Err != "" {
				t.Fatal(r.Err)
			}
			if r.Values["rlimit_fsize"] != limit {
				t.Errorf("RLIMIT_FSIZE %d, want %d", r.Values["rlimit_fsize"], limit)
			}
			if r.Values["size"] > limit || r.Values["allocated"] > limit+(1<<20) {
				t.Errorf("the plugin grew its image to %d bytes, %d allocated, past its limit of %d (errnos %v)",
					r.Values["size"], r.Values["allocated"], limit, r.Errnos)
			}
			if r.Values["write_across"] != 4096 || r.Errnos["write_across"] != 0 {
				t.Errorf("a write across the limit wrote %d bytes (errno %d), want the 4096 below it",
					r.Values["write_across"], r.Errnos["write_across"])
			}
			efbig := []string{"write_at_limit", "write_far", "ftruncate_up", "fallocate_grow"}
			if r.Errnos["fallocate_zero_grow"] != int(unix.EOPNOTSUPP) {
				efbig = append(efbig, "fallocate_zero_grow") // a file system with ZERO_RANGE
			}
			for _, k := range efbig {
				if r.Errnos[k] != int(unix.EFBIG) {
					t.Errorf("%s: errno %d, want EFBIG (%d)", k, r.Errnos[k], unix.EFBIG)
				}
			}
			for _, k := range []string{"fallocate_keep_size", "fallocate_zero_keep_size", "fallocate_insert"} {
				if r.Errnos[k] != int(unix.EPERM) {
					t.Errorf("%s: errno %d, want EPERM (%d) from the filter", k, r.Errnos[k], unix.EPERM)
				}
			}
			for _, k := range []string{"write_inside", "fallocate_punch", "fallocate_inside"} {
				if e := r.Errnos[k]; e != 0 && e != int(unix.EOPNOTSUPP) {
					t.Errorf("%s: errno %d: a disk plugin's own use of its image is refused", k, e)
				}
			}
		})
	}
}

// Guest RAM is a memfd the core maps and hands to every plugin; ftruncate
// is allowed after Restrict (for the inflight region). The core seals its
// size (guestmem.SealSize), so a compromised plugin cannot shrink it and
// make the core's own accesses fault (SIGBUS, fatal to krun-core where it
// reads guest RAM outside a fault-catching path, e.g. resuming a restarted
// plugin's queues). Before the fix the plugin truncated it to 0 (from
// review).
func TestGuestRAMCannotBeShrunk(t *testing.T) {
	ram, err := guestmem.NewMemfd("krun-guest-ram", 1<<20) // as the core makes it
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	if err := guestmem.SealSize(ram); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(ram.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	m[4096] = 1
	p := startAttack(t, "blk", "guestmem", "", LaunchConfig{}, ram)
	r, ok := p.result(t)
	if !ok {
		t.Fatalf("probe died; stderr:\n%s", p.stderr.String())
	}
	fi, _ := ram.Stat()
	faulted := func() (f bool) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() { f = recover() != nil }()
		attackSink = m[4096] // the core reading guest RAM (usedIndex)
		return false
	}()
	if r.Errnos["ftruncate_0"] == 0 || fi.Size() != 1<<20 || faulted {
		t.Errorf("sandboxed block plugin (after Restrict) truncated guest RAM from %d to %d bytes (ftruncate errno %d); "+
			"the core's read of its own mapping faults: %v",
			r.Values["size_before"], fi.Size(), r.Errnos["ftruncate_0"], faulted)
	}
}

// `--fs ...,readonly=on` and `run --root-readonly`: the launcher makes the
// share read-only below the plugin (LaunchConfig.ReadOnlyDirs: the
// trampoline's Landlock rule beneath it grants reading only; a root
// launcher's ID-mapped mount is MOUNT_ATTR_RDONLY too), so a compromised
// fs-virtio plugin cannot write there whatever its own policy declares
// (fs-virtio's is read-write: DefaultPolicy("fs", fd)). Before the fix
// only the FUSE server's own EROFS checks stood in the way, and such a
// plugin planted and deleted files in a share exported read-only (from
// review).
func TestReadOnlyShareNotWritable(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o777)
	if err := os.WriteFile(filepath.Join(dir, "victim"), []byte("host data"), 0o644); err != nil {
		t.Fatal(err)
	}
	share, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer share.Close()
	p := startAttack(t, "fs-virtio", "rowrite", "", LaunchConfig{ReadOnlyDirs: true}, share)
	r, ok := p.result(t)
	if !ok {
		t.Fatalf("probe died; stderr:\n%s", p.stderr.String())
	}
	_, errPlanted := os.Stat(filepath.Join(dir, "planted"))
	_, errVictim := os.Stat(filepath.Join(dir, "victim"))
	if errPlanted == nil || errVictim != nil {
		t.Errorf("a sandboxed fs-virtio plugin (after Restrict with its policy) serving a readonly=on share: "+
			"create errno %d, unlink errno %d; planted file exists: %v, victim removed: %v",
			r.Errnos["create"], r.Errnos["unlink"], errPlanted == nil, errVictim != nil)
	}
}

// After Restrict the same is refused (narrowing filter): recorded as sound.
func TestMemfdExecAfterRestrictRefused(t *testing.T) {
	p := startAttack(t, "blk", "memexec", "restrict", LaunchConfig{}, nil)
	r, ok := p.result(t)
	if !ok {
		err := p.cmd.Wait()
		t.Fatalf("probe gone without a result (%v): exec after Restrict worked?", err)
	}
	if r.Errnos["execveat_memfd"] != int(unix.EPERM) {
		t.Errorf("execveat after Restrict: %v", r.Errnos)
	}
}

// Everything here must be refused after Restrict; recorded as sound.
func TestMiscRefusedAfterRestrict(t *testing.T) {
	p := startAttack(t, "blk", "misc", "", LaunchConfig{}, nil)
	r, ok := p.result(t)
	if !ok {
		t.Fatalf("probe died: %s", p.stderr.String())
	}
	var bad []string
	for k, v := range r.Errnos {
		if v == 0 {
			bad = append(bad, k)
		}
	}
	t.Logf("errnos: %v", r.Errnos)
	if len(bad) > 0 {
		t.Errorf("allowed after Restrict: %s", strings.Join(bad, ", "))
	}
}

// A compromised plugin cannot take huge pages (MAP_HUGETLB mappings,
// MFD_HUGETLB memfds): they come from the host's reserved pool, which
// other VMs may rely on, and a memory cgroup (the remedy docs/SECURITY.md
// gives for memory in memfds) does not charge them. The filter refuses
// both, before and after Restrict. Before the fix both reached the kernel
// (ENOMEM on a host without a pool, the pages on one with it).
func TestHugePagesRefused(t *testing.T) {
	for _, tc := range []struct {
		name, arg string
	}{{"launch filter", "0"}, {"after Restrict", "1"}} {
		t.Run(tc.name, func(t *testing.T) {
			p := startAttack(t, "blk", "hugetlb", tc.arg, LaunchConfig{}, nil)
			r, ok := p.result(t)
			if !ok {
				t.Fatalf("probe died: %s", p.stderr.String())
			}
			for _, k := range []string{"mmap_hugetlb", "memfd_create_hugetlb"} {
				if got := r.Errnos[k]; got != int(unix.EPERM) {
					t.Errorf("%s: %s gave errno %d (%v), want EPERM from the filter", tc.name, k, got, unix.Errno(got))
				}
			}
		})
	}
}

// The console plugin holds the user's terminal. A compromised one cannot
// type into it (TIOCSTI: the user's shell would run what it types; this
// kernel's dev.tty.legacy_tiocsti may allow it to the terminal's
// controlling process, and the plugin, a session leader without one, could
// make it its own with TIOCSCTTY), change its line discipline, settings or
// window size, or make it non-blocking: the filter allows no ioctl on it
// but TCGETS, before and after Restrict. Without the seccomp layer the same
// probe does type into it, so the test can tell (the pty is raw, so the
// typed bytes are read back at once). The "tiocsti_stderr" probe of
// TestMiscRefusedAfterRestrict could not: its stderr is a pipe.
func TestTerminalIoctlsRefused(t *testing.T) {
	for _, tc := range []struct {
		name, arg string
		lc        LaunchConfig
		sound     bool
	}{
		{"launch filter", "0", LaunchConfig{}, true},
		{"after Restrict", "1", LaunchConfig{}, true},
		{"without seccomp", "1", LaunchConfig{Disable: []Layer{LayerSeccomp}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
			if err != nil {
				t.Skipf("no pty: %v", err)
			}
			defer ptmx.Close()
			if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
				t.Fatal(err)
			}
			n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
			if err != nil {
				t.Fatal(err)
			}
			pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer pts.Close()
			tio, err := unix.IoctlGetTermios(int(pts.Fd()), unix.TCGETS)
			if err != nil {
				t.Fatal(err)
			}
			// Raw: what is typed into it can be read at once.
			tio.Lflag &^= unix.ICANON | unix.ECHO | unix.ISIG | unix.IEXTEN
			tio.Cc[unix.VMIN], tio.Cc[unix.VTIME] = 0, 0
			if err := unix.IoctlSetTermios(int(pts.Fd()), unix.TCSETS, tio); err != nil {
				t.Fatal(err)
			}
			before := *tio
			kind := "console"
			p := startAttack(t, kind, "tty", tc.arg, tc.lc, pts)
			r, ok := p.result(t)
			if !ok {
				t.Fatalf("probe died: %s", p.stderr.String())
			}
			t.Logf("errnos: %v", r.Errnos)
			if err := unix.SetNonblock(int(pts.Fd()), true); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 64)
			m, _ := unix.Read(int(pts.Fd()), buf)
			typed := string(buf[:max(m, 0)])
			after, _ := unix.IoctlGetTermios(int(pts.Fd()), unix.TCGETS)
			changed := after == nil || *after != before
			if !tc.sound {
				if typed == "" {
					t.Fatalf("without seccomp the probe typed nothing (%v): it cannot tell whether the filter stops it", r.Errnos)
				}
				return
			}
			for name, e := range r.Errnos {
				if e != int(unix.EPERM) {
					t.Errorf("%s on the user's terminal: errno %d (%v), want EPERM from the filter", name, e, unix.Errno(e))
				}
			}
			if typed != "" || changed {
				t.Errorf("a compromised console plugin typed %q into the user's terminal; settings changed: %v", typed, changed)
			}
		})
	}
}

// A compromised console plugin cannot set O_DIRECT or O_ASYNC on the
// files it is handed: krun-core's stdout and stderr, when they are files,
// are handed over as they are (one open file description, shared with
// krun-core and the user's shell), and O_DIRECT made krun-core's own log
// writes to its stderr fail with EINVAL (the log of the plugin's refused
// calls among them). Before the fix the probe set it and the launcher's
// next line was lost; O_NONBLOCK, which the Go runtime sets, still works.
func TestSharedFileFlagsKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "krun.log")
	stderr, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	p := startAttack(t, "console", "setfl", "", LaunchConfig{}, stderr)
	r, ok := p.result(t)
	if !ok {
		t.Fatalf("probe died: %s", p.stderr.String())
	}
	t.Logf("errnos: %v", r.Errnos)
	fl, err := unix.FcntlInt(stderr.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, werr := stderr.Write([]byte("krun-core: a log line\n")) // the launcher's own next line
	if r.Errnos["setfl_direct"] != int(unix.EPERM) || r.Errnos["setfl_async"] != int(unix.EPERM) ||
		fl&(unix.O_DIRECT|unix.O_ASYNC) != 0 || werr != nil {
		t.Errorf("a compromised console plugin set flags on krun-core's stderr (O_DIRECT errno %d, O_ASYNC errno %d): "+
			"flags now %#x; krun-core's next log line: %v", r.Errnos["setfl_direct"], r.Errnos["setfl_async"], fl, werr)
	}
	if r.Errnos["setfl_nonblock"] != 0 || r.Errnos["setfl_back"] != 0 {
		t.Errorf("F_SETFL O_NONBLOCK (Go's SetNonblock) refused: %v", r.Errnos)
	}
}

// A compromised console plugin cannot shut down, or set options on, a
// socket krun-core hands it as the guest's stdout or stderr (a socket
// cannot be opened again, so it is the very socket krun-core and, under
// systemd, the rest of the service write their journal lines to): the
// console plugin's profile (minimal) has no shutdown and no setsockopt,
// before or after Restrict. Before the fix it shut the socket down, and
// krun-core's next log line got EPIPE.
func TestSharedSocketNotShutDown(t *testing.T) {
	for _, tc := range []struct{ name, arg string }{{"launch filter", "0"}, {"after Restrict", "1"}} {
		t.Run(tc.name, func(t *testing.T) {
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			stdout, journal := os.NewFile(uintptr(pair[0]), "stdout"), os.NewFile(uintptr(pair[1]), "journal")
			defer stdout.Close()
			defer journal.Close()
			p := startAttack(t, "console", "sockshut", tc.arg, LaunchConfig{}, stdout)
			r, ok := p.result(t)
			if !ok {
				t.Fatalf("probe died: %s", p.stderr.String())
			}
			t.Logf("errnos: %v", r.Errnos)
			line := []byte("krun-core: a log line\n")
			_, werr := unix.Write(int(stdout.Fd()), line) // the launcher's own next line
			buf := make([]byte, 64)
			n, _ := unix.Read(int(journal.Fd()), buf)
			for k, e := range r.Errnos {
				if e != int(unix.EPERM) {
					t.Errorf("%s on krun-core's stdout socket: errno %d (%v), want EPERM", k, e, unix.Errno(e))
				}
			}
			if werr != nil || string(buf[:max(n, 0)]) != string(line) {
				t.Errorf("krun-core's next line to its stdout socket: %v; the journal read %q", werr, buf[:max(n, 0)])
			}
		})
	}
}

var _ = syscall.Getpid

var attackSink byte

func TestKernelAtLeast(t *testing.T) {
	for _, tc := range []struct {
		release string
		want    bool
	}{
		{"5.14.0", true}, {"5.13.19-generic", false}, {"6.1.0-57-amd64", true}, {"4.18.0-553.el8", false},
		{"5.14", true}, {"6.18.44-fc-v1147", true}, {"garbage", false}, {"10.0", true},
	} {
		if got := kernelAtLeast(tc.release, 5, 14); got != tc.want {
			t.Errorf("kernelAtLeast(%q, 5, 14) = %v, want %v", tc.release, got, tc.want)
		}
	}
}

// TestUnnamedSyscallFloodLoggedSpacedOut: refused calls of numbers
// without a name (x32 numbers, here 5000 different ones) share one log
// count, so they are logged as one call is (the first few, then every
// 1000th). Counted per number, each was a new log line and a new map
// entry in krun-core (from review, helper-83).
func TestUnnamedSyscallFloodLoggedSpacedOut(t *testing.T) {
	const n = 5000
	p := startAttack(t, "thirdparty", "nrflood", strconv.Itoa(n), LaunchConfig{}, nil)
	res, ok := p.result(t)
	if !ok {
		t.Fatalf("no result: %s", p.stderr.String())
	}
	if res.Values["refused"] != n {
		t.Fatalf("%d of %d calls refused with EPERM", res.Values["refused"], n)
	}
	time.Sleep(500 * time.Millisecond) // the supervisor's last lines
	if lines := strings.Count(p.stderr.String(), "seccomp refused a system call"); lines < 1 || lines > 20 {
		t.Errorf("%d log lines for %d refused calls of unnamed numbers", lines, n)
	}
}
