package sandbox

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// runBPF interprets a seccomp program over one seccomp_data, checking every
// instruction the way the kernel's checker would (aligned in-bounds loads,
// forward jumps inside the program, a RET at the end of every path).
func runBPF(prog []unix.SockFilter, data []byte) (uint32, error) {
	var a uint32
	for pc := 0; pc < len(prog); pc++ {
		in := prog[pc]
		jump := func(off int) error {
			if pc+1+off >= len(prog) {
				return fmt.Errorf("pc %d: jump past the end", pc)
			}
			pc += off
			return nil
		}
		var err error
		switch in.Code {
		case unix.BPF_LD | unix.BPF_W | unix.BPF_ABS:
			if in.K%4 != 0 || int(in.K)+4 > len(data) {
				return 0, fmt.Errorf("pc %d: load at %d", pc, in.K)
			}
			a = binary.LittleEndian.Uint32(data[in.K:])
		case unix.BPF_ALU | unix.BPF_AND | unix.BPF_K:
			a &= in.K
		case unix.BPF_JMP | unix.BPF_JA:
			err = jump(int(in.K))
		case unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K:
			if a == in.K {
				err = jump(int(in.Jt))
			} else {
				err = jump(int(in.Jf))
			}
		case unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K:
			if a >= in.K {
				err = jump(int(in.Jt))
			} else {
				err = jump(int(in.Jf))
			}
		case unix.BPF_RET | unix.BPF_K:
			return in.K, nil
		default:
			return 0, fmt.Errorf("pc %d: opcode %#x", pc, in.Code)
		}
		if err != nil {
			return 0, err
		}
	}
	return 0, errors.New("fell off the end of the program")
}

func seccompData(arch uint32, nr uint32, args ...uint64) []byte {
	d := make([]byte, 64)
	binary.LittleEndian.PutUint32(d[0:], nr)
	binary.LittleEndian.PutUint32(d[4:], arch)
	binary.LittleEndian.PutUint64(d[8:], 0x401000) // ip
	for i, v := range args {
		binary.LittleEndian.PutUint64(d[16+8*i:], v)
	}
	return d
}

const (
	testSelf  = 1
	testDeny  = unix.SECCOMP_RET_USER_NOTIF
	testWrong = unix.SECCOMP_RET_KILL_PROCESS
)

func compileProfile(t *testing.T, p Policy) []unix.SockFilter {
	t.Helper()
	rules, err := policyRules(p)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := compileFilter(filterSpec{arch: auditArch, x32Bit: x32SyscallBit, self: testSelf, rules: rules,
		nums: syscallNumbers(), deny: testDeny, wrongArch: testWrong})
	if err != nil {
		t.Fatal(err)
	}
	return prog
}

func decide(t *testing.T, prog []unix.SockFilter, name string, args ...uint64) uint32 {
	t.Helper()
	nr, ok := syscallNumbers()[name]
	if !ok {
		t.Fatalf("no number for %s", name)
	}
	r, err := runBPF(prog, seccompData(auditArch, nr, args...))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return r
}

func TestFilterDecisions(t *testing.T) {
	const allowed, refused = unix.SECCOMP_RET_ALLOW, uint32(testDeny)
	threadFlags := uint64(goThreadCloneFlags)
	cases := []struct {
		profile Profile
		name    string
		args    []uint64
		want    uint32
	}{
		{ProfileBlock, "read", nil, allowed},
		{ProfileBlock, "pwrite64", []uint64{3, 0, 4096, 1 << 40}, allowed},
		{ProfileBlock, "fdatasync", nil, allowed},
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 0, 4096}, allowed}, // DISCARD
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_ZERO_RANGE, 0, 4096}, allowed},                            // WRITE_ZEROES
		{ProfileBlock, "fallocate", []uint64{3, 0, 0, 4096}, allowed},                                                    // allocation (RLIMIT_FSIZE bounds it)
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_KEEP_SIZE, 1 << 40, 1 << 40}, refused},                    // allocates past the end, unbounded
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 1 << 40, 4096}, refused},
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_INSERT_RANGE, 0, 4096}, refused},
		{ProfileBlock, "fallocate", []uint64{3, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE | 1<<32, 0, 4096}, refused}, // high bits
		{ProfileFS, "fallocate", []uint64{3, unix.FALLOC_FL_KEEP_SIZE, 0, 4096}, allowed},                                        // FUSE FALLOCATE: the guest's mode
		{ProfileBlock, "openat", nil, refused},
		{ProfileBlock, "execve", nil, refused},
		{ProfileBlock, "socket", []uint64{unix.AF_INET, unix.SOCK_STREAM}, refused},
		{ProfileBlock, "connect", nil, refused},
		{ProfileBlock, "mmap", []uint64{0, 4096, unix.PROT_READ | unix.PROT_WRITE, unix.MAP_SHARED, 7, 0}, allowed},
		{ProfileBlock, "mmap", []uint64{0, 4096, unix.PROT_READ | unix.PROT_EXEC, unix.MAP_SHARED, 7, 0}, refused},
		{ProfileBlock, "mmap", []uint64{0, 4096, unix.PROT_EXEC | 1<<40, unix.MAP_PRIVATE, 0, 0}, refused},
		{ProfileBlock, "mmap", []uint64{0, 2 << 20, unix.PROT_READ, unix.MAP_SHARED | unix.MAP_ANONYMOUS | unix.MAP_HUGETLB, 0, 0}, refused},
		{ProfileBlock, "memfd_create", []uint64{0, unix.MFD_CLOEXEC}, allowed},
		{ProfileBlock, "memfd_create", []uint64{0, unix.MFD_CLOEXEC | unix.MFD_HUGETLB}, refused}, // the host's huge page pool
		{ProfileBlock, "clone", []uint64{threadFlags}, allowed},
		{ProfileBlock, "clone", []uint64{threadFlags | unix.CLONE_SETTLS}, allowed},
		{ProfileBlock, "clone", []uint64{uint64(unix.SIGCHLD)}, refused},
		{ProfileBlock, "clone", []uint64{threadFlags | unix.CLONE_NEWUSER}, refused},
		{ProfileBlock, "clone", []uint64{threadFlags | 1<<32}, refused},
		{ProfileBlock, "tgkill", []uint64{testSelf, 5, 23}, allowed},
		{ProfileBlock, "tgkill", []uint64{testSelf + 1, 5, 23}, refused},
		{ProfileBlock, "tgkill", []uint64{testSelf | 1<<32, 5, 23}, refused},
		{ProfileBlock, "kill", []uint64{testSelf, 9}, allowed},
		{ProfileBlock, "kill", []uint64{0, 9}, refused},                        // own process group
		{ProfileBlock, "kill", []uint64{^uint64(0), 9}, refused},               // everyone
		{ProfileBlock, "fcntl", []uint64{3, unix.F_GETFL}, allowed},            // os.NewFile
		{ProfileBlock, "fcntl", []uint64{3, unix.F_DUPFD_CLOEXEC, 0}, allowed}, // kick fd dup
		{ProfileBlock, "fcntl", []uint64{3, unix.F_SETLK}, refused},            // locks: no plugin takes any
		{ProfileFS, "fcntl", []uint64{3, unix.F_OFD_SETLK}, refused},           // the fs server answers ENOSYS to GETLK/SETLK
		{ProfileFS, "flock", []uint64{3, unix.LOCK_EX}, refused},
		{ProfileFS, "copy_file_range", nil, refused},                                                        // nor to COPY_FILE_RANGE
		{ProfileBlock, "fcntl", []uint64{3, unix.F_SETOWN}, refused},                                        // signals to others
		{ProfileBlock, "fcntl", []uint64{3, unix.F_SETFL, unix.O_RDWR | unix.O_NONBLOCK | 0x8000}, allowed}, // SetNonblock
		{ProfileNet, "fcntl", []uint64{1, unix.F_SETFL, unix.O_WRONLY | unix.O_DIRECT}, refused},            // a shared stdout
		{ProfileNet, "fcntl", []uint64{1, unix.F_SETFL, unix.O_WRONLY | unix.O_ASYNC}, refused},             // SIGIO to its owner
		{ProfileBlock, "ioctl", []uint64{2, unix.TCGETS}, allowed},                                          // isatty
		{ProfileBlock, "ioctl", []uint64{3, unix.BLKGETSIZE64}, allowed},                                    // block-device image
		{ProfileBlock, "ioctl", []uint64{0, unix.TIOCSTI}, refused},                                         // terminal injection
		{ProfileBlock, "ioctl", []uint64{3, unix.BLKGETSIZE64 | 1<<32}, refused},                            // high bits
		{ProfileBlock, "prlimit64", []uint64{0, unix.RLIMIT_NOFILE, 0, 0x1000}, allowed},
		{ProfileBlock, "prlimit64", []uint64{0, unix.RLIMIT_NOFILE, 0x1000, 0}, refused},
		{ProfileBlock, "recvmsg", nil, allowed},
		{ProfileBlock, "accept4", nil, allowed},
		{ProfileNet, "pread64", nil, refused},
		{ProfileNet, "fallocate", nil, refused},
		{ProfileNet, "ioctl", []uint64{3, unix.BLKGETSIZE64}, refused},
		{ProfileNet, "sendmsg", nil, allowed},
		{ProfileNet, "shutdown", []uint64{3, unix.SHUT_WR}, allowed},     // half-close to passt
		{ProfileMinimal, "shutdown", []uint64{1, unix.SHUT_WR}, refused}, // the console's shared stdout
		{ProfileMinimal, "setsockopt", []uint64{1, unix.SOL_SOCKET, unix.SO_SNDTIMEO}, refused},
		{ProfileBlock, "shutdown", nil, refused},
		{ProfileFS, "shutdown", nil, allowed}, // the union
		{ProfileMinimal, "fdatasync", nil, refused},
		{ProfileFS, "openat", nil, allowed},
		{ProfileFS, "getdents64", nil, allowed},
		{ProfileFS, "fcntl", []uint64{3, unix.F_GETFL}, allowed},
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFIFO | 0o644, 0}, allowed},
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFREG | 0o644, 0}, allowed},
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFCHR | 0o644, 0x0103}, refused},
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFBLK | 0o644, 0x0801}, refused},
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFCHR | 0o644, 0}, allowed},       // overlayfs whiteout
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFCHR | 0o644, 1 << 32}, refused}, // high bits of dev
		{ProfileFS, "mknodat", []uint64{4, 0, unix.S_IFBLK | 0o644, 0}, refused},       // 0/0 block device
		{ProfileFS, "fchmodat2", []uint64{9, 0, 0o640, unix.AT_EMPTY_PATH}, allowed},   // SETATTR mode
		{ProfileFS, "umask", []uint64{0}, allowed},                                     // fs-virtio main
		{ProfileBlock, "fchmodat2", nil, refused},
		{ProfileBlock, "umask", nil, refused},
		{ProfileBlock, "ioctl", []uint64{7, unix.SECCOMP_IOCTL_NOTIF_RECV, 0}, refused}, // the listener is the launcher's
		{ProfileFS, "ioctl", []uint64{7, unix.SECCOMP_IOCTL_NOTIF_SEND, 0}, refused},
		{ProfileNet, "ioctl", []uint64{7, unix.SECCOMP_IOCTL_NOTIF_ID_VALID, 0}, refused},
		{ProfileFS, "execve", nil, refused},
		{ProfileFS, "socket", nil, refused},
	}
	progs := map[Profile][]unix.SockFilter{}
	for _, c := range cases {
		prog, ok := progs[c.profile]
		if !ok {
			prog = compileProfile(t, Policy{Kind: "t", Syscalls: c.profile})
			progs[c.profile] = prog
		}
		if _, known := syscallNumbers()[c.name]; !known {
			continue
		}
		if got := decide(t, prog, c.name, c.args...); got != c.want {
			t.Errorf("%s: %s(%#x) = %#x, want %#x", c.profile, c.name, c.args, got, c.want)
		}
	}
}

func TestFilterForeignArchAndX32(t *testing.T) {
	prog := compileProfile(t, Policy{Kind: "t", Syscalls: ProfileBlock})
	r, err := runBPF(prog, seccompData(unix.AUDIT_ARCH_I386, 3))
	if err != nil || r != testWrong {
		t.Errorf("i386 read: %#x %v, want kill", r, err)
	}
	if x32SyscallBit != 0 {
		r, err := runBPF(prog, seccompData(auditArch, x32SyscallBit|0)) // x32 read
		if err != nil || r != testDeny {
			t.Errorf("x32 read: %#x %v, want refused", r, err)
		}
	}
}

func TestFilterForbiddenNeverAllowed(t *testing.T) {
	nums := syscallNumbers()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, prof := range Profiles() {
		prog := compileProfile(t, Policy{Kind: "t", Syscalls: prof})
		for _, name := range ForbiddenSyscalls() {
			nr, ok := nums[name]
			if !ok {
				continue
			}
			for i := 0; i < 20; i++ {
				args := []uint64{rng.Uint64(), rng.Uint64(), rng.Uint64(), rng.Uint64(), rng.Uint64(), rng.Uint64()}
				if i == 0 {
					args = nil
				}
				r, err := runBPF(prog, seccompData(auditArch, nr, args...))
				if err != nil || r != testDeny {
					t.Fatalf("%s allows forbidden %s: %#x %v", prof, name, r, err)
				}
			}
		}
	}
}

// refMatch is the plain-Go meaning of a rule, to compare the program with.
func refMatch(r rule, self uint64, args []uint64) bool {
	if r.alts == nil {
		return true
	}
	for _, alt := range r.alts {
		okAll := true
		for _, c := range alt {
			v := c.value
			if c.self {
				v = self
			}
			okAll = okAll && args[c.arg]&c.mask == v
		}
		if okAll {
			return true
		}
	}
	return false
}

// Every number, with random and near-miss arguments, gets the decision the
// rules describe, and every path of the program ends in a RET.
func TestFilterMatchesRules(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, prof := range Profiles() {
		p := Policy{Kind: "t", Syscalls: prof, ExtraSyscalls: []Syscall{{Name: "sysinfo", Reason: "test"}}}
		rules, err := policyRules(p)
		if err != nil {
			t.Fatal(err)
		}
		prog := compileProfile(t, p)
		byNr := map[uint32]rule{}
		for _, r := range rules {
			byNr[syscallNumbers()[r.name]] = r
		}
		for nr := uint32(0); nr < 600; nr++ {
			r, known := byNr[nr]
			for i := 0; i < 40; i++ {
				args := make([]uint64, 6)
				for j := range args {
					args[j] = rng.Uint64()
				}
				// Near misses: plant a condition's value, sometimes flipping a bit.
				if known && r.alts != nil {
					alt := r.alts[rng.IntN(len(r.alts))]
					for _, c := range alt {
						v := c.value
						if c.self {
							v = testSelf
						}
						args[c.arg] = v | args[c.arg]&^c.mask
						if rng.IntN(3) == 0 {
							args[c.arg] ^= 1 << rng.IntN(64)
						}
					}
				}
				want := uint32(testDeny)
				if known && refMatch(r, testSelf, args) {
					want = unix.SECCOMP_RET_ALLOW
				}
				got, err := runBPF(prog, seccompData(auditArch, nr, args...))
				if err != nil {
					t.Fatalf("%s nr %d: %v", prof, nr, err)
				}
				if got != want {
					t.Fatalf("%s nr %d (%s) args %#x: %#x, want %#x", prof, nr, r.name, args, got, want)
				}
			}
		}
		if len(prog) > 1000 {
			t.Errorf("%s: %d instructions; the hot path should stay short", prof, len(prog))
		}
	}
}

func TestCompileErrors(t *testing.T) {
	nums := map[string]uint32{"a": 1, "b": 1, "c": 2}
	cases := []struct {
		name  string
		rules []rule
		want  string
	}{
		{"unknown", []rule{allow("zzz", "")}, "unknown system call"},
		{"same number", []rule{allow("a", ""), allow("b", "")}, "share number"},
		{"impossible", []rule{allowIf("c", "", "", all(argCond{arg: 0, mask: 0xff, value: 1 << 40}))}, "never hold"},
	}
	for _, c := range cases {
		_, err := compileFilter(filterSpec{arch: auditArch, rules: c.rules, nums: nums})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

func TestAssemblerLongJump(t *testing.T) {
	var a assembler
	far := a.newLabel()
	a.loadAbs(0)
	a.jeq(1, far, next)
	for i := 0; i < 300; i++ {
		a.and(0xffffffff)
	}
	a.mark(far)
	a.ret(0)
	if _, err := a.assemble(); err == nil || !strings.Contains(err.Error(), "conditional jump") {
		t.Errorf("conditional jump over 300 instructions: %v, want an error", err)
	}
	var b assembler
	far = b.newLabel()
	b.jump(far)
	for i := 0; i < 300; i++ {
		b.and(1)
	}
	b.mark(far)
	b.ret(7)
	prog, err := b.assemble()
	if err != nil {
		t.Fatal(err)
	}
	if r, err := runBPF(prog, make([]byte, 64)); err != nil || r != 7 {
		t.Errorf("long ja: %d %v", r, err)
	}
	var c assembler
	c.jump(c.newLabel())
	if _, err := c.assemble(); err == nil {
		t.Error("undefined label assembled")
	}
}

// The calls a block plugin makes per request are tested first.
func TestFilterHotCallsFirst(t *testing.T) {
	rules, err := policyRules(Policy{Kind: "t", Syscalls: ProfileBlock})
	if err != nil {
		t.Fatal(err)
	}
	var first []string
	for _, r := range rules[:5] {
		first = append(first, r.name)
	}
	if strings.Join(first, ",") != "futex,read,write,pread64,pwrite64" {
		t.Errorf("block filter starts with %v", first)
	}
}

// compileLaunch compiles the trampoline's filter for a profile, with the
// plugin binary at fd 9.
func compileLaunch(t *testing.T, prof Profile) ([]unix.SockFilter, []rule) {
	t.Helper()
	rules, err := launchRules(launchEnv{Syscalls: prof, ExecFD: 9})
	if err != nil {
		t.Fatal(err)
	}
	prog, err := compileFilter(filterSpec{arch: auditArch, x32Bit: x32SyscallBit, self: testSelf, rules: rules,
		nums: syscallNumbers(), deny: testDeny, wrongArch: testWrong})
	if err != nil {
		t.Fatal(err)
	}
	return prog, rules
}

// The trampoline's filter: the launch profile plus exactly the start-up
// calls, each within its argument limits.
func TestLaunchFilterDecisions(t *testing.T) {
	const allowed, refused = unix.SECCOMP_RET_ALLOW, uint32(testDeny)
	cases := []struct {
		profile Profile
		name    string
		args    []uint64
		want    uint32
	}{
		{ProfileBlock, "execveat", []uint64{9, 0, 0, 0, unix.AT_EMPTY_PATH}, allowed},
		{ProfileBlock, "execveat", []uint64{8, 0, 0, 0, unix.AT_EMPTY_PATH}, refused}, // another fd
		{ProfileBlock, "execveat", []uint64{9, 0, 0, 0, 0}, refused},                  // a path
		{ProfileBlock, "execveat", []uint64{9 | 1<<32, 0, 0, 0, unix.AT_EMPTY_PATH}, refused},
		{ProfileBlock, "execve", nil, refused},
		{ProfileBlock, "socket", []uint64{unix.AF_UNIX, unix.SOCK_STREAM | unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK}, allowed},
		{ProfileBlock, "socket", []uint64{unix.AF_UNIX, unix.SOCK_DGRAM}, refused},
		{ProfileBlock, "socket", []uint64{unix.AF_INET, unix.SOCK_STREAM}, refused},
		{ProfileBlock, "socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW}, refused},
		{ProfileBlock, "socketpair", []uint64{unix.AF_UNIX, unix.SOCK_STREAM}, refused},
		{ProfileBlock, "connect", nil, refused},
		{ProfileBlock, "bind", nil, allowed},
		{ProfileBlock, "listen", nil, allowed},
		{ProfileBlock, "openat", nil, allowed},
		{ProfileBlock, "seccomp", []uint64{unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, 0}, allowed},
		{ProfileBlock, "seccomp", []uint64{unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_NEW_LISTENER, 0}, refused},
		{ProfileBlock, "seccomp", []uint64{unix.SECCOMP_SET_MODE_FILTER,
			unix.SECCOMP_FILTER_FLAG_NEW_LISTENER | unix.SECCOMP_FILTER_FLAG_TSYNC | unix.SECCOMP_FILTER_FLAG_TSYNC_ESRCH, 0}, refused},
		{ProfileBlock, "seccomp", []uint64{unix.SECCOMP_GET_NOTIF_SIZES, 0, 0}, refused},
		{ProfileBlock, "prctl", []uint64{unix.PR_GET_SECCOMP}, allowed},
		{ProfileBlock, "prctl", []uint64{unix.PR_SET_SECCOMP, 2}, refused},
		{ProfileBlock, "prctl", []uint64{unix.PR_SET_VMA}, refused},
		{ProfileBlock, "prctl", []uint64{unix.PR_SET_NO_NEW_PRIVS, 0}, refused},
		{ProfileBlock, "landlock_restrict_self", nil, allowed},
		{ProfileBlock, "arch_prctl", []uint64{archSetFS, 0x1000}, allowed},
		{ProfileBlock, "arch_prctl", []uint64{0x1001 /* ARCH_SET_GS */, 0x1000}, refused},
		{ProfileBlock, "ioctl", []uint64{7, unix.SECCOMP_IOCTL_NOTIF_RECV, 0}, refused},
		{ProfileBlock, "ioctl", []uint64{7, unix.SECCOMP_IOCTL_NOTIF_SEND, 0}, refused},
		{ProfileBlock, "keyctl", nil, refused},
		{ProfileBlock, "userfaultfd", nil, refused},
		{ProfileBlock, "io_uring_setup", nil, refused},
		{ProfileBlock, "clone", []uint64{uint64(unix.SIGCHLD)}, refused},
		{ProfileBlock, "pread64", nil, allowed},
		{ProfileNet, "pread64", nil, refused},
		{ProfileFS, "mkdirat", nil, allowed},
		{ProfileNet, "mkdirat", nil, refused},
	}
	// The widest profile refuses the calls known from container escapes
	// and kernel attack surface (a review of the sandbox, 2026-12-06).
	for _, name := range []string{"bpf", "perf_event_open", "process_vm_readv", "process_vm_writev", "personality",
		"unshare", "setns", "ptrace", "add_key", "request_key", "kexec_load", "init_module", "finit_module",
		"open_by_handle_at", "name_to_handle_at", "pidfd_getfd", "mount", "fsopen", "open_tree", "move_mount",
		"pivot_root", "chroot", "setuid", "setgid", "capset", "iopl", "ioperm", "quotactl", "swapon", "reboot",
		"kcmp", "lookup_dcookie", "fanotify_init", "vmsplice", "memfd_secret"} {
		cases = append(cases, struct {
			profile Profile
			name    string
			args    []uint64
			want    uint32
		}{ProfileFS, name, nil, refused})
	}
	progs := map[Profile][]unix.SockFilter{}
	for _, c := range cases {
		prog, ok := progs[c.profile]
		if !ok {
			prog, _ = compileLaunch(t, c.profile)
			progs[c.profile] = prog
		}
		if _, known := syscallNumbers()[c.name]; !known {
			continue // arch_prctl is amd64 only
		}
		if got := decide(t, prog, c.name, c.args...); got != c.want {
			t.Errorf("launch %s: %s(%#x) = %#x, want %#x", c.profile, c.name, c.args, got, c.want)
		}
	}
}

// precedence orders seccomp actions as the kernel does when several
// filters answer: the lowest signed action value wins (KILL_PROCESS, then
// KILL_THREAD, TRAP, ERRNO, USER_NOTIF, TRACE, LOG, ALLOW).
func strictest(a, b uint32) uint32 {
	if int32(a&unix.SECCOMP_RET_ACTION_FULL) < int32(b&unix.SECCOMP_RET_ACTION_FULL) {
		return a
	}
	return b
}

// The plugin's own filter stacked on the trampoline's allows exactly what
// both the launch rules and the plugin's policy allow; what the launch
// rules refuse still goes to the launcher's listener (logged), and what
// only the plugin's policy refuses gets EPERM.
func TestNarrowingMatchesRules(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const errno = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
	for _, c := range []struct{ launch, own Profile }{
		{ProfileFS, ProfileBlock}, {ProfileFS, ProfileNet}, {ProfileBlock, ProfileBlock},
		{ProfileNet, ProfileNet}, {ProfileFS, ProfileFS}, {ProfileBlock, ProfileMinimal},
	} {
		outerProg, outer := compileLaunch(t, c.launch)
		p := Policy{Kind: "t", Syscalls: c.own, ExtraSyscalls: []Syscall{{Name: "sysinfo", Reason: "test"}}}
		inner, err := policyRules(p)
		if err != nil {
			t.Fatal(err)
		}
		prog, err := compileNarrowing(narrowSpec{arch: auditArch, x32Bit: x32SyscallBit, self: testSelf,
			outer: outer, inner: inner, nums: syscallNumbers(), deny: errno})
		if err != nil {
			t.Fatal(err)
		}
		byNr := func(rs []rule) map[uint32]rule {
			m := map[uint32]rule{}
			for _, r := range rs {
				m[syscallNumbers()[r.name]] = r
			}
			return m
		}
		outerBy, innerBy := byNr(outer), byNr(inner)
		for nr := uint32(0); nr < 600; nr++ {
			o, oKnown := outerBy[nr]
			in, iKnown := innerBy[nr]
			for i := 0; i < 40; i++ {
				args := make([]uint64, 6)
				for j := range args {
					args[j] = rng.Uint64()
				}
				// Near misses of either rule's conditions.
				for _, r := range []struct {
					r  rule
					ok bool
				}{{o, oKnown}, {in, iKnown}} {
					if !r.ok || r.r.alts == nil || rng.IntN(2) == 0 {
						continue
					}
					alt := r.r.alts[rng.IntN(len(r.r.alts))]
					for _, c := range alt {
						v := c.value
						if c.self {
							v = testSelf
						}
						args[c.arg] = v | args[c.arg]&^c.mask
						if rng.IntN(3) == 0 {
							args[c.arg] ^= 1 << rng.IntN(64)
						}
					}
				}
				outerOK := oKnown && refMatch(o, testSelf, args)
				innerOK := iKnown && refMatch(in, testSelf, args)
				var want uint32
				switch {
				case !outerOK:
					want = testDeny // the trampoline's filter refuses it; the launcher logs it
				case !innerOK:
					want = errno
				default:
					want = unix.SECCOMP_RET_ALLOW
				}
				d := seccompData(auditArch, nr, args...)
				a, err1 := runBPF(outerProg, d)
				b, err2 := runBPF(prog, d)
				if err1 != nil || err2 != nil {
					t.Fatalf("nr %d: %v %v", nr, err1, err2)
				}
				if got := strictest(a, b); got != want {
					t.Fatalf("launch %s, own %s: nr %d (%s/%s) args %#x: outer %#x own %#x, want %#x",
						c.launch, c.own, nr, o.name, in.name, args, a, b, want)
				}
			}
		}
		if r, err := runBPF(prog, seccompData(unix.AUDIT_ARCH_I386, 3)); err != nil || r != unix.SECCOMP_RET_KILL_PROCESS {
			t.Errorf("i386 read through the narrowing filter: %#x %v", r, err)
		}
	}
}
