package sandbox

import (
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// A tiny classic-BPF assembler with labels, enough for seccomp filters.

// seccomp_data layout (linux/seccomp.h): nr int32, arch u32, ip u64, args [6]u64.
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// argLo and argHi are the offsets of the low and high 32-bit halves of
// argument i (little-endian: amd64, arm64).
func argLo(i int) uint32 { return uint32(offArgs + 8*i) }
func argHi(i int) uint32 { return uint32(offArgs + 8*i + 4) }

type label int

const next label = 0 // fall through to the following instruction

type asmInsn struct {
	op     uint16
	k      uint32
	jt, jf label // conditional jumps
	ja     label // unconditional jump target
	define label // pseudo-instruction: defines a label here
}

type assembler struct {
	ins    []asmInsn
	labels int
}

func (a *assembler) newLabel() label { a.labels++; return label(a.labels) }

func (a *assembler) mark(l label) { a.ins = append(a.ins, asmInsn{define: l}) }

func (a *assembler) loadAbs(off uint32) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, k: off})
}

func (a *assembler) and(k uint32) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_ALU | unix.BPF_AND | unix.BPF_K, k: k})
}

func (a *assembler) jeq(k uint32, jt, jf label) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, k: k, jt: jt, jf: jf})
}

func (a *assembler) jge(k uint32, jt, jf label) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K, k: k, jt: jt, jf: jf})
}

func (a *assembler) jump(l label) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_JMP | unix.BPF_JA, ja: l})
}

func (a *assembler) ret(k uint32) {
	a.ins = append(a.ins, asmInsn{op: unix.BPF_RET | unix.BPF_K, k: k})
}

// maxFilterLen is BPF_MAXINSNS, the kernel's limit on a filter's length.
const maxFilterLen = 4096

// assemble resolves labels. Conditional jumps reach at most 255 instructions
// forward; the caller keeps them short and uses jump for long distances.
func (a *assembler) assemble() ([]unix.SockFilter, error) {
	pos := map[label]int{}
	n := 0
	for _, in := range a.ins {
		if in.define != 0 {
			pos[in.define] = n
			continue
		}
		n++
	}
	out := make([]unix.SockFilter, 0, n)
	target := func(l label, at int) (int, error) {
		if l == next {
			return 0, nil
		}
		p, ok := pos[l]
		if !ok {
			return 0, fmt.Errorf("bpf: undefined label %d", l)
		}
		d := p - (at + 1)
		if d < 0 {
			return 0, fmt.Errorf("bpf: backward jump to label %d", l)
		}
		return d, nil
	}
	for _, in := range a.ins {
		if in.define != 0 {
			continue
		}
		at := len(out)
		f := unix.SockFilter{Code: in.op, K: in.k}
		switch {
		case in.op == unix.BPF_JMP|unix.BPF_JA:
			d, err := target(in.ja, at)
			if err != nil {
				return nil, err
			}
			f.K = uint32(d)
		case in.op&0x07 == unix.BPF_JMP:
			jt, err := target(in.jt, at)
			if err != nil {
				return nil, err
			}
			jf, err := target(in.jf, at)
			if err != nil {
				return nil, err
			}
			if jt > 255 || jf > 255 {
				return nil, fmt.Errorf("bpf: conditional jump of %d/%d instructions at %d", jt, jf, at)
			}
			f.Jt, f.Jf = uint8(jt), uint8(jf)
		}
		out = append(out, f)
	}
	if len(out) > maxFilterLen {
		return nil, fmt.Errorf("bpf: filter of %d instructions exceeds %d", len(out), maxFilterLen)
	}
	return out, nil
}

// filterSpec is everything compileFilter needs; it is a plain value so tests
// can build filters for any architecture number and pid.
type filterSpec struct {
	arch      uint32
	x32Bit    uint32 // non-zero: refuse every nr with this bit (amd64 x32)
	self      uint64 // the pid isSelf conditions compare with
	rules     []rule
	nums      map[string]uint32
	deny      uint32 // action for a refused call (USER_NOTIF or ERRNO|EPERM)
	wrongArch uint32 // action for a foreign architecture
}

// compileFilter builds the seccomp program:
//
//	check arch (foreign: wrongArch), load nr, refuse x32 numbers,
//	for each rule: nr == N ? (unconditional: ALLOW ; else jump to its block),
//	default: deny,
//	one block per conditional rule: each alternative tests its conditions on
//	both 32-bit halves of the argument and returns ALLOW; else deny.
func compileFilter(s filterSpec) ([]unix.SockFilter, error) {
	var a assembler
	archOK := a.newLabel()
	deny := a.newLabel()
	a.loadAbs(offArch)
	a.jeq(s.arch, archOK, next)
	a.ret(s.wrongArch)
	a.mark(archOK)
	a.loadAbs(offNr)
	if s.x32Bit != 0 {
		ok := a.newLabel()
		a.jge(s.x32Bit, next, ok)
		a.jump(deny)
		a.mark(ok)
	}
	type block struct {
		l label
		r rule
	}
	var blocks []block
	seen := map[uint32]string{}
	for _, r := range s.rules {
		nr, ok := s.nums[r.name]
		if !ok {
			return nil, fmt.Errorf("seccomp: unknown system call %q", r.name)
		}
		if prev, dup := seen[nr]; dup {
			return nil, fmt.Errorf("seccomp: %q and %q share number %d", prev, r.name, nr)
		}
		seen[nr] = r.name
		if r.alts == nil {
			// Equal: fall into RET ALLOW; not equal: skip it.
			skip := a.newLabel()
			a.jeq(nr, next, skip)
			a.ret(unix.SECCOMP_RET_ALLOW)
			a.mark(skip)
			continue
		}
		b := block{l: a.newLabel(), r: r}
		blocks = append(blocks, b)
		skip := a.newLabel()
		a.jeq(nr, next, skip)
		a.jump(b.l)
		a.mark(skip)
	}
	a.mark(deny)
	a.ret(s.deny)
	for _, b := range blocks {
		a.mark(b.l)
		for _, alt := range b.r.alts {
			if err := emitAlt(&a, b.r.name, alt, s.self, unix.SECCOMP_RET_ALLOW); err != nil {
				return nil, err
			}
		}
		a.ret(s.deny)
	}
	return a.assemble()
}

// emitAlt emits one alternative of a rule: its conditions, tested on both
// 32-bit halves of each argument, and RET action when all hold; a failed
// condition falls through to the code that follows.
func emitAlt(a *assembler, name string, alt []argCond, self uint64, action uint32) error {
	fail := a.newLabel()
	for _, c := range alt {
		v := c.value
		if c.self {
			v = self
		}
		for half := 0; half < 2; half++ {
			off, m, want := argLo(c.arg), uint32(c.mask), uint32(v)
			if half == 1 {
				off, m, want = argHi(c.arg), uint32(c.mask>>32), uint32(v>>32)
			}
			if m == 0 {
				if want != 0 {
					return fmt.Errorf("seccomp: %s: condition can never hold", name)
				}
				continue
			}
			a.loadAbs(off)
			if m != ^uint32(0) {
				a.and(m)
			}
			a.jeq(want, next, fail)
		}
	}
	a.ret(action)
	a.mark(fail)
	return nil
}

// narrowSpec describes the filter a plugin's own Restrict stacks on the
// trampoline's (outer) filter to narrow it to the plugin's policy (inner).
type narrowSpec struct {
	arch   uint32
	x32Bit uint32
	self   uint64
	outer  []rule // the trampoline's rules
	inner  []rule // the plugin's policy
	nums   map[string]uint32
	deny   uint32 // for what the outer filter allows and the inner does not (ERRNO|EPERM)
}

// compileNarrowing builds the plugin's own filter. The kernel runs every
// filter and takes the strictest action, so this one need not repeat the
// outer filter's refusals: it allows every call the outer filter refuses
// (the outer filter then refuses it, and the launcher, which holds the
// outer filter's notification listener, logs it), allows what the inner
// policy allows, and returns deny for the rest, the calls the outer filter
// would allow but the plugin's policy does not:
//
//	check arch (foreign: KILL_PROCESS, as the outer filter), load nr,
//	x32 numbers: ALLOW (the outer filter refuses them),
//	for each outer rule whose inner rule differs: nr == N ? jump to its block,
//	default: ALLOW,
//	block: inner alternatives -> ALLOW; outer alternatives (or none: any
//	arguments) -> deny; else ALLOW (the outer filter refuses them).
func compileNarrowing(s narrowSpec) ([]unix.SockFilter, error) {
	var a assembler
	archOK := a.newLabel()
	allowAll := a.newLabel()
	a.loadAbs(offArch)
	a.jeq(s.arch, archOK, next)
	a.ret(unix.SECCOMP_RET_KILL_PROCESS)
	a.mark(archOK)
	a.loadAbs(offNr)
	if s.x32Bit != 0 {
		ok := a.newLabel()
		a.jge(s.x32Bit, next, ok)
		a.jump(allowAll)
		a.mark(ok)
	}
	inner := map[string]rule{}
	for _, r := range s.inner {
		inner[r.name] = r
	}
	type block struct {
		l            label
		outer, inner rule
		hasInner     bool
	}
	var blocks []block
	seen := map[uint32]string{}
	for _, o := range s.outer {
		nr, ok := s.nums[o.name]
		if !ok {
			return nil, fmt.Errorf("seccomp: unknown system call %q", o.name)
		}
		if prev, dup := seen[nr]; dup {
			return nil, fmt.Errorf("seccomp: %q and %q share number %d", prev, o.name, nr)
		}
		seen[nr] = o.name
		in, has := inner[o.name]
		if has && (in.alts == nil || sameAlts(in.alts, o.alts)) {
			continue // the inner policy allows at least what the outer does
		}
		b := block{l: a.newLabel(), outer: o, inner: in, hasInner: has}
		blocks = append(blocks, b)
		skip := a.newLabel()
		a.jeq(nr, next, skip)
		a.jump(b.l)
		a.mark(skip)
	}
	a.mark(allowAll)
	a.ret(unix.SECCOMP_RET_ALLOW)
	for _, b := range blocks {
		a.mark(b.l)
		if b.hasInner {
			for _, alt := range b.inner.alts {
				if err := emitAlt(&a, b.inner.name, alt, s.self, unix.SECCOMP_RET_ALLOW); err != nil {
					return nil, err
				}
			}
		}
		if b.outer.alts == nil {
			a.ret(s.deny)
			continue
		}
		for _, alt := range b.outer.alts {
			if err := emitAlt(&a, b.outer.name, alt, s.self, s.deny); err != nil {
				return nil, err
			}
		}
		a.ret(unix.SECCOMP_RET_ALLOW)
	}
	return a.assemble()
}

// sameAlts reports whether two rules' argument conditions are identical.
func sameAlts(x, y [][]argCond) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if !slices.Equal(x[i], y[i]) {
			return false
		}
	}
	return true
}
