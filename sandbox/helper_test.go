package sandbox

// The test binary doubles as the sandboxed plugin, and as the launcher's
// trampoline (it imports this package): TestMain runs a helper mode when
// KRUN_SANDBOX_TEST_HELPER is set. The helper must not import net (with
// cgo enabled that links runtime/cgo, and AllThreadsSyscall refuses to run
// in cgo binaries), so sockets are raw.
//
// Every forbidden action goes through unix.Syscall where it can: a refused
// call waits for the launcher's answer, and a thread waiting in a raw
// system call keeps its P meanwhile (harmless now that the answer comes
// from another process, but slower for the rest of the probe).

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/disk/raw"
)

const (
	envHelper  = "KRUN_SANDBOX_TEST_HELPER" // probe, launch, execed, idle, hostile
	envKind    = "KRUN_SANDBOX_TEST_KIND"   // blk, net or fs
	envParent  = "KRUN_SANDBOX_TEST_PARENT" // host pid of the test process
	envHostDir = "KRUN_SANDBOX_TEST_DIR"    // a host directory the plugin must not reach
	envSock    = "KRUN_SANDBOX_TEST_SOCK"   // a listening unix socket on the host
	envTCP     = "KRUN_SANDBOX_TEST_TCP"    // a listening TCP port on 127.0.0.1
	envSelf    = "KRUN_SANDBOX_TEST_SELF"   // path of this binary
	envLaunch  = "KRUN_SANDBOX_TEST_LAUNCH" // launch mode: LaunchConfig as JSON
	envNFiles  = "KRUN_SANDBOX_TEST_NFILES" // launch mode: number of fds from 3 to pass on
)

// probeSocket is the probe's listener, in its socket directory
// (PLUGIN_UNIX_SOCKET_DIR), as go-plugin's gRPC listener would be.
const probeSocket = "probe.sock"

// Fds of the probe.
const (
	fdDisk   = 3 // a disk image (regular file), read-write
	fdVhost  = 4 // one end of a socketpair: the vhost-user socket
	fdShared = 5 // fs kind only: the shared directory
)

func TestMain(m *testing.M) {
	switch os.Getenv(envHelper) {
	case "":
		os.Exit(m.Run())
	case "probe":
		os.Exit(probeMain())
	case "hostile":
		os.Exit(hostileMain())
	case "share": // share_test.go
		os.Exit(shareMain())
	case "drop": // privileges_test.go
		os.Exit(dropMain())
	case "launch":
		os.Exit(launchMain())
	case "attack": // attack_test.go
		os.Exit(attackMain())
	case "rootless": // host_test.go
		os.Exit(rootlessMain())
	case "filtercost": // filtercost_test.go
		os.Exit(filterCostMain())
	case "execed":
		fmt.Println(`{"phase":"execed"}`)
		os.Exit(0)
	case "idle": // launched with Apply but never restricted by itself
		fmt.Println(`{"phase":"ready"}`)
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(0)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper mode")
		os.Exit(2)
	}
}

// attempt is one forbidden action tried on one thread.
type attempt struct {
	Action string `json:"action"`
	Thread string `json:"thread"`
	TID    int    `json:"tid"`
	Errno  int    `json:"errno"` // 0: the action succeeded
	Err    string `json:"err,omitempty"`
}

type ioResult struct {
	Name string `json:"name"`
	Err  string `json:"err,omitempty"`
}

type probeLine struct {
	Raw      []byte     `json:"-"`     // the line as sent
	Phase    string     `json:"phase"` // restrict-error, attempts, io, ready, execed, hostile
	Error    string     `json:"error,omitempty"`
	Attempts []attempt  `json:"attempts,omitempty"`
	IO       []ioResult `json:"io,omitempty"`
	NewTIDs  int        `json:"new_tids,omitempty"`
}

func emit(l probeLine) {
	b, _ := json.Marshal(l)
	os.Stdout.Write(append(b, '\n'))
}

// sys runs a system call through unix.Syscall6 and returns its errno.
func sys(trap uintptr, a ...uintptr) (uintptr, error) {
	var args [6]uintptr
	copy(args[:], a)
	r, _, e := unix.Syscall6(trap, args[0], args[1], args[2], args[3], args[4], args[5])
	if e != 0 {
		return r, e
	}
	return r, nil
}

func cstr(s string) *byte {
	p, err := unix.BytePtrFromString(s)
	if err != nil {
		panic(err)
	}
	return p
}

func sockaddrUnix(path string) (unsafe.Pointer, uintptr) {
	var sa unix.RawSockaddrUnix
	sa.Family = unix.AF_UNIX
	for i := 0; i < len(path) && i < len(sa.Path)-1; i++ {
		sa.Path[i] = int8(path[i])
	}
	return unsafe.Pointer(&sa), unsafe.Sizeof(sa)
}

func sockaddrLoopback(port int) (unsafe.Pointer, uintptr) {
	var sa unix.RawSockaddrInet4
	sa.Family = unix.AF_INET
	sa.Port = uint16(port>>8) | uint16(port&0xff)<<8
	sa.Addr = [4]byte{127, 0, 0, 1}
	return unsafe.Pointer(&sa), unsafe.Sizeof(sa)
}

// atFDCWD is AT_FDCWD (-100) as a system call argument.
func atFDCWD() uintptr {
	v := unix.AT_FDCWD
	return uintptr(v)
}

func closeFD(fd uintptr) { sys(unix.SYS_CLOSE, fd) }

// forbiddenActions are what a compromised plugin would try. Each returns nil
// only if the action succeeded.
func forbiddenActions() []struct {
	name string
	run  func() error
} {
	hostDir := os.Getenv(envHostDir)
	parent, _ := strconv.Atoi(os.Getenv(envParent))
	port, _ := strconv.Atoi(os.Getenv(envTCP))
	self := os.Getenv(envSelf)
	return []struct {
		name string
		run  func() error
	}{
		{"open_etc_passwd", func() error {
			fd, err := sys(unix.SYS_OPENAT, atFDCWD(), uintptr(unsafe.Pointer(cstr("/etc/passwd"))), unix.O_RDONLY|unix.O_CLOEXEC)
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"create_file", func() error {
			p := fmt.Sprintf("%s/created-%d", hostDir, unix.Gettid())
			fd, err := sys(unix.SYS_OPENAT, atFDCWD(), uintptr(unsafe.Pointer(cstr(p))),
				unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"connect_unix", func() error {
			fd, err := sys(unix.SYS_SOCKET, unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer closeFD(fd)
			sa, n := sockaddrUnix(os.Getenv(envSock))
			_, err = sys(unix.SYS_CONNECT, fd, uintptr(sa), n)
			return err
		}},
		{"tcp_socket", func() error {
			fd, err := sys(unix.SYS_SOCKET, unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"tcp_connect", func() error {
			fd, err := sys(unix.SYS_SOCKET, unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer closeFD(fd)
			sa, n := sockaddrLoopback(port)
			_, err = sys(unix.SYS_CONNECT, fd, uintptr(sa), n)
			return err
		}},
		{"execve", func() error {
			argv, _ := syscall.SlicePtrFromStrings([]string{self})
			envv, _ := syscall.SlicePtrFromStrings([]string{envHelper + "=execed"})
			_, err := sys(unix.SYS_EXECVE, uintptr(unsafe.Pointer(cstr(self))),
				uintptr(unsafe.Pointer(&argv[0])), uintptr(unsafe.Pointer(&envv[0])))
			return err
		}},
		{"fork", func() error {
			// Raw, unlike the others: a forked child must not run the
			// scheduler's exitsyscall (its other threads are gone), it
			// exits at once. The probe runs with GOGC=off so no collection
			// stops the world while this waits for the supervisor.
			r, _, e := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.SIGCHLD), 0, 0, 0, 0, 0)
			if e == 0 && r == 0 {
				unix.RawSyscall(unix.SYS_EXIT_GROUP, 99, 0, 0) // the child
			}
			var err error
			if e != 0 {
				err = e
			} else {
				var ws unix.WaitStatus
				sys(unix.SYS_WAIT4, r, uintptr(unsafe.Pointer(&ws)), 0, 0)
			}
			return err
		}},
		{"ptrace_parent", func() error {
			_, err := sys(unix.SYS_PTRACE, unix.PTRACE_ATTACH, uintptr(parent), 0, 0)
			if err == nil {
				sys(unix.SYS_PTRACE, unix.PTRACE_DETACH, uintptr(parent), 0, 0)
			}
			return err
		}},
		{"mount", func() error {
			_, err := sys(unix.SYS_MOUNT, uintptr(unsafe.Pointer(cstr("none"))), uintptr(unsafe.Pointer(cstr(hostDir))),
				uintptr(unsafe.Pointer(cstr("tmpfs"))), 0, 0)
			if err == nil {
				sys(unix.SYS_UMOUNT2, uintptr(unsafe.Pointer(cstr(hostDir))), unix.MNT_DETACH)
			}
			return err
		}},
		{"kill_parent", func() error {
			// Signal 0: the permission check of a real kill, without the kill.
			_, err := sys(unix.SYS_KILL, uintptr(parent), 0)
			return err
		}},
		{"raise_limit", func() error {
			var cur unix.Rlimit
			if _, err := sys(unix.SYS_PRLIMIT64, 0, unix.RLIMIT_NOFILE, 0, uintptr(unsafe.Pointer(&cur))); err != nil {
				return fmt.Errorf("get: %w", err)
			}
			raised := unix.Rlimit{Cur: cur.Max + 1, Max: cur.Max + 1}
			_, err := sys(unix.SYS_PRLIMIT64, 0, unix.RLIMIT_NOFILE, uintptr(unsafe.Pointer(&raised)), 0)
			return err
		}},
		{"io_uring_setup", func() error {
			var params [120]byte
			fd, err := sys(unix.SYS_IO_URING_SETUP, 4, uintptr(unsafe.Pointer(&params[0])))
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"mmap_exec", func() error {
			addr, err := sys(unix.SYS_MMAP, 0, 4096, unix.PROT_READ|unix.PROT_EXEC, unix.MAP_SHARED, fdDisk, 0)
			if err == nil {
				sys(unix.SYS_MUNMAP, addr, 4096)
			}
			return err
		}},
		{"keyctl", func() error {
			_, err := sys(unix.SYS_KEYCTL, unix.KEYCTL_GET_KEYRING_ID, uintptr(0xfffffffe) /* user keyring */, 0)
			return err
		}},
		{"userfaultfd", func() error {
			fd, err := sys(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK)
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"netlink_socket", func() error {
			fd, err := sys(unix.SYS_SOCKET, unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
			if err == nil {
				closeFD(fd)
			}
			return err
		}},
		{"seccomp_new_listener", func() error {
			// A listener of its own would catch, and could let through,
			// the calls the launcher's filter refuses.
			fd, err := installListeningFilter()
			if err == nil {
				closeFD(uintptr(fd))
			}
			return err
		}},
	}
}

// installListeningFilter tries to install a filter that hands every call
// to a new listener, as a compromised plugin would.
// Its filter catches one unused number only, so that where no seccomp layer
// stops it (the layers-alone tests) nothing else waits on its listener.
func installListeningFilter() (int, error) {
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offNr},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: 4095, Jt: 0, Jf: 1},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_USER_NOTIF},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, err := sys(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_NEW_LISTENER,
		uintptr(unsafe.Pointer(&fprog)))
	return int(r), err
}

// lockedThread runs functions on one locked OS thread.
type lockedThread struct {
	tid  int
	work chan func()
}

func startLockedThread() *lockedThread {
	t := &lockedThread{work: make(chan func())}
	ready := make(chan int)
	go func() {
		runtime.LockOSThread()
		ready <- unix.Gettid()
		for f := range t.work {
			f()
		}
	}()
	t.tid = <-ready
	return t
}

func (t *lockedThread) do(f func()) {
	done := make(chan struct{})
	t.work <- func() { f(); close(done) }
	<-done
}

func threadIDs() map[int]bool {
	out := map[int]bool{}
	ents, _ := os.ReadDir("/proc/self/task")
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			out[n] = true
		}
	}
	return out
}

func errnoOf(err error) int {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		return int(e)
	}
	return -1
}

func probeMain() int {
	kind := os.Getenv(envKind)
	log := hclog.New(&hclog.LoggerOptions{Name: "probe", Output: os.Stderr, JSONFormat: true, Level: hclog.Debug})
	shared := -1
	if kind == "fs" {
		shared = fdShared
	}
	p, err := DefaultPolicy(kind, shared)
	if err != nil {
		emit(probeLine{Phase: "restrict-error", Error: err.Error()})
		return 3
	}
	// Threads that exist before Restrict.
	var old []*lockedThread
	for i := 0; i < 3; i++ {
		old = append(old, startLockedThread())
	}
	before := threadIDs()
	// Like go-plugin's gRPC listener: created before Restrict, in the
	// socket directory (the plugin's private tmpfs), with the
	// SO_REUSEADDR that Go's net.Listen sets on every stream listener.
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err == nil {
		err = unix.SetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	}
	if err == nil {
		err = unix.Bind(lfd, &unix.SockaddrUnix{Name: filepath.Join(os.Getenv(envSocketDir), probeSocket)})
	}
	if err == nil {
		err = unix.Listen(lfd, 4)
	}
	if err != nil {
		emit(probeLine{Phase: "restrict-error", Error: "listener: " + err.Error()})
		return 3
	}

	if err := Restrict(p, log); err != nil {
		emit(probeLine{Phase: "restrict-error", Error: err.Error()})
		return 3
	}

	// Threads created after Restrict: lock goroutines until the runtime has
	// had to clone at least two new OS threads.
	var fresh []*lockedThread
	for i := 0; i < 16 && len(fresh) < 2; i++ {
		t := startLockedThread()
		if !before[t.tid] {
			fresh = append(fresh, t)
		}
		old = append(old, t) // keep it locked so the next one needs a new M
	}

	var atts []attempt
	run := func(thread string, on func(func())) {
		for _, a := range forbiddenActions() {
			var at attempt
			on(func() {
				err := a.run()
				at = attempt{Action: a.name, Thread: thread, TID: unix.Gettid(), Errno: errnoOf(err)}
				if err != nil {
					at.Err = err.Error()
				}
			})
			atts = append(atts, at)
		}
	}
	run("main", func(f func()) { f() })
	for i, t := range old[:3] {
		run(fmt.Sprintf("old-%d", i), t.do)
	}
	for i, t := range fresh {
		run(fmt.Sprintf("new-%d", i), t.do)
	}
	emit(probeLine{Phase: "attempts", Attempts: atts, NewTIDs: len(fresh)})

	emit(probeLine{Phase: "io", IO: probeIO(kind, lfd)})
	unix.Close(lfd)
	emit(probeLine{Phase: "ready"})
	// Wait until the test has looked at us from outside.
	bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

// probeIO is the work a block or fs plugin does; all of it must still work.
func probeIO(kind string, lfd int) []ioResult {
	var out []ioResult
	step := func(name string, f func() error) {
		r := ioResult{Name: name}
		if err := f(); err != nil {
			r.Err = err.Error()
		}
		out = append(out, r)
	}
	step("pwrite_pread", func() error {
		w := make([]byte, 4096)
		for i := range w {
			w[i] = byte(i * 7)
		}
		if _, err := unix.Pwrite(fdDisk, w, 8192); err != nil {
			return err
		}
		r := make([]byte, 4096)
		if _, err := unix.Pread(fdDisk, r, 8192); err != nil {
			return err
		}
		if string(r) != string(w) {
			return errors.New("read back differs")
		}
		return nil
	})
	step("fdatasync", func() error { return unix.Fdatasync(fdDisk) })
	step("fallocate_punch_hole", func() error {
		if err := unix.Fallocate(fdDisk, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 4096); err != nil {
			return err
		}
		r := make([]byte, 4096)
		if _, err := unix.Pread(fdDisk, r, 8192); err != nil {
			return err
		}
		for _, b := range r {
			if b != 0 {
				return errors.New("hole reads non-zero")
			}
		}
		return nil
	})
	step("raw_write_zeroes", func() error {
		// The raw back-end's own discard and write-zeroes: the modes it
		// passes fallocate are the ones the block profile allows.
		d, err := raw.Open(os.NewFile(fdDisk, "disk"), raw.Options{})
		if err != nil {
			return err
		}
		for _, unmap := range []bool{false, true} {
			if err := d.WriteZeroes(8192, 4096, unmap); err != nil {
				return err
			}
		}
		return d.Discard(8192, 4096)
	})
	step("fstat", func() error {
		var st unix.Stat_t
		return unix.Fstat(fdDisk, &st)
	})
	step("eventfd_epoll", func() error {
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return err
		}
		defer unix.Close(efd)
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return err
		}
		defer unix.Close(ep)
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, efd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(efd)}); err != nil {
			return err
		}
		if _, err := unix.Write(efd, []byte{5, 0, 0, 0, 0, 0, 0, 0}); err != nil {
			return err
		}
		evs := make([]unix.EpollEvent, 1)
		n, err := unix.EpollWait(ep, evs, 1000)
		if err != nil || n != 1 {
			return fmt.Errorf("epoll_wait: %d events, %v", n, err)
		}
		b := make([]byte, 8)
		if _, err := unix.Read(efd, b); err != nil || b[0] != 5 {
			return fmt.Errorf("eventfd read %v %v", b, err)
		}
		return nil
	})
	step("vhost_socket_memfd", func() error {
		if _, err := unix.Write(fdVhost, []byte("hello")); err != nil {
			return err
		}
		buf := make([]byte, 16)
		oob := make([]byte, unix.CmsgSpace(4))
		n, oobn, _, _, err := unix.Recvmsg(fdVhost, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return err
		}
		if string(buf[:n]) != "mem" {
			return fmt.Errorf("got %q", buf[:n])
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			return fmt.Errorf("control messages: %d, %v", len(msgs), err)
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			return fmt.Errorf("rights: %v %v", fds, err)
		}
		defer unix.Close(fds[0])
		m, err := unix.Mmap(fds[0], 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("mmap memfd: %w", err)
		}
		if string(m[:12]) != "guest memory" {
			unix.Munmap(m)
			return fmt.Errorf("memfd holds %q", m[:12])
		}
		copy(m, "plugin wrote")
		if err := unix.Munmap(m); err != nil {
			return err
		}
		_, err = unix.Write(fdVhost, []byte("ok"))
		return err
	})
	step("accept_pre_restrict_listener", func() error {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			return err
		}
		defer unix.Close(cfd)
		b := make([]byte, 4)
		if n, err := unix.Read(cfd, b); err != nil || string(b[:n]) != "ping" {
			return fmt.Errorf("read %q %v", b, err)
		}
		_, err = unix.Write(cfd, []byte("pong"))
		return err
	})
	step("runtime", func() error {
		done := make(chan int)
		for i := 0; i < 8; i++ {
			go func(i int) {
				s := make([]byte, 1<<20)
				time.Sleep(time.Millisecond)
				done <- len(s) + i
			}(i)
		}
		for i := 0; i < 8; i++ {
			<-done
		}
		runtime.GC()
		time.Sleep(5 * time.Millisecond)
		return nil
	})
	if kind == "fs" {
		step("fs_create_in_shared_dir", func() error {
			fd, err := unix.Openat(fdShared, "made-by-plugin", unix.O_CREAT|unix.O_RDWR|unix.O_CLOEXEC, 0o644)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if _, err := unix.Write(fd, []byte("inside")); err != nil {
				return err
			}
			if err := unix.Mkdirat(fdShared, "subdir", 0o755); err != nil {
				return err
			}
			d, err := unix.Openat(fdShared, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(d)
			buf := make([]byte, 4096)
			n, err := unix.Getdents(d, buf)
			if err != nil || n == 0 {
				return fmt.Errorf("getdents: %d %v", n, err)
			}
			return nil
		})
		step("fs_whiteout", func() error {
			// MKNOD of the 0/0 character device: an overlayfs whiteout.
			return unix.Mknodat(fdShared, "whiteout", unix.S_IFCHR|0o600, 0)
		})
		step("fs_device_refused", func() error {
			err := unix.Mknodat(fdShared, "null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
			if !errors.Is(err, unix.EPERM) {
				return fmt.Errorf("mknod of /dev/null's device: %v, want EPERM", err)
			}
			return nil
		})
		step("fs_fchmodat2", func() error {
			fd, err := unix.Openat(fdShared, "made-by-plugin", unix.O_PATH|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Fchmodat(fd, "", 0o640, unix.AT_EMPTY_PATH)
		})
		step("fs_escape_shared_dir_refused", func() error {
			fd, err := unix.Openat(fdShared, "../outside", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err == nil {
				unix.Close(fd)
				return errors.New("opened a file beside the shared directory")
			}
			if !errors.Is(err, unix.EACCES) {
				return fmt.Errorf("want EACCES from landlock, got %w", err)
			}
			return nil
		})
	}
	return out
}

// launchMain is a launcher process: it starts the probe under LaunchConfig
// (from envLaunch) with its own stdio and fds 3.. passed on, prints the
// probe's pid as the first line, and waits for it.
func launchMain() int {
	var lc LaunchConfig
	if err := json.Unmarshal([]byte(os.Getenv(envLaunch)), &lc); err != nil {
		fmt.Fprintln(os.Stderr, "launch config:", err)
		return 2
	}
	lc.Log = hclog.New(&hclog.LoggerOptions{Name: "launcher", Output: os.Stderr})
	n, _ := strconv.Atoi(os.Getenv(envNFiles))
	cmd := exec.Command(os.Getenv(envSelf))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	for i := 0; i < n; i++ {
		cmd.ExtraFiles = append(cmd.ExtraFiles, os.NewFile(uintptr(3+i), "passed"))
	}
	for _, kv := range os.Environ() {
		if (strings.HasPrefix(kv, "KRUN_SANDBOX_TEST_") || strings.HasPrefix(kv, envSocketDir+"=")) &&
			!strings.HasPrefix(kv, envLaunch) && !strings.HasPrefix(kv, envHelper) {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	helper := os.Getenv(envKind + "_HELPER")
	if helper == "" {
		helper = "probe"
	}
	cmd.Env = append(cmd.Env, envHelper+"="+helper)
	if err := lc.Apply(cmd); err != nil {
		fmt.Fprintln(os.Stderr, "apply:", err)
		return 2
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		return 2
	}
	fmt.Printf("{\"phase\":\"pid\",\"error\":\"%d\"}\n", cmd.Process.Pid)
	if err := cmd.Wait(); err != nil {
		return 1
	}
	// The launcher's seccomp supervisor logs from a goroutine; give the
	// last lines time to be written.
	time.Sleep(100 * time.Millisecond)
	return 0
}

// hostileLine is what the hostile plugin reports.
type hostileLine struct {
	Phase string `json:"phase"` // hostile
	// ProcFD is the error listing /proc/self/fd ("" when it could).
	ProcFD string `json:"proc_fd"`
	// ProcListeners are fds /proc/self/fd names as seccomp listeners.
	ProcListeners []int `json:"proc_listeners,omitempty"`
	// OpenFDs are the fds 0..1023 that are open.
	OpenFDs []int `json:"open_fds"`
	// Ioctls are the listener ioctls tried on every open fd, with their
	// errnos.
	Ioctls   []attempt `json:"ioctls"`
	Attempts []attempt `json:"attempts"`
}

// hostileMain is a hostile third-party plugin: it never restricts itself,
// it looks for the seccomp listener of its filter among its fds (through
// /proc/self/fd where there is one, and by trying every fd number), tries
// the listener ioctls on every fd it holds (among them an answer with
// SECCOMP_USER_NOTIF_FLAG_CONTINUE, which would let a refused call run),
// tries to make a listener of its own, and then makes the calls that ran
// when a plugin held its listener (issue #21). The test checks that none of
// it works.
func hostileMain() int {
	var rep hostileLine
	rep.Phase = "hostile"
	if ents, err := os.ReadDir("/proc/self/fd"); err != nil {
		rep.ProcFD = err.Error()
	} else {
		for _, e := range ents {
			fd, _ := strconv.Atoi(e.Name())
			if t, _ := os.Readlink("/proc/self/fd/" + e.Name()); t == "anon_inode:seccomp notify" {
				rep.ProcListeners = append(rep.ProcListeners, fd)
			}
		}
	}
	for fd := 0; fd < 1024; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			rep.OpenFDs = append(rep.OpenFDs, fd)
		}
	}
	try := func(fd int, name string, f func() error) {
		err := f()
		a := attempt{Action: name, Thread: strconv.Itoa(fd), Errno: errnoOf(err)}
		if err != nil {
			a.Err = err.Error()
		}
		rep.Ioctls = append(rep.Ioctls, a)
	}
	for _, fd := range rep.OpenFDs {
		fd := fd
		try(fd, "NOTIF_SEND_CONTINUE", func() error {
			resp := seccompNotifResp{id: 1, flags: 1 /* SECCOMP_USER_NOTIF_FLAG_CONTINUE */}
			_, err := sys(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_SEND, uintptr(unsafe.Pointer(&resp)))
			return err
		})
		try(fd, "NOTIF_ID_VALID", func() error {
			id := uint64(1)
			_, err := sys(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_ID_VALID, uintptr(unsafe.Pointer(&id)))
			return err
		})
		try(fd, "NOTIF_RECV", func() error {
			// On a real listener that the filter let through, RECV would
			// wait for a notification: report that as success.
			done := make(chan error, 1)
			go func() {
				var n seccompNotif
				_, err := sys(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_RECV, uintptr(unsafe.Pointer(&n)))
				done <- err
			}()
			select {
			case err := <-done:
				return err
			case <-time.After(2 * time.Second):
				return nil
			}
		})
	}
	for _, a := range forbiddenActions() {
		err := a.run()
		at := attempt{Action: a.name, Thread: "main", TID: unix.Gettid(), Errno: errnoOf(err)}
		if err != nil {
			at.Err = err.Error()
		}
		rep.Attempts = append(rep.Attempts, at)
	}
	b, _ := json.Marshal(rep)
	os.Stdout.Write(append(b, '\n'))
	emit(probeLine{Phase: "ready"})
	bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}
