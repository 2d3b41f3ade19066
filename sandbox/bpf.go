package sandbox

import (
	"fmt"

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
			fail := a.newLabel()
			for _, c := range alt {
				v := c.value
				if c.self {
					v = s.self
				}
				for half := 0; half < 2; half++ {
					off, m, want := argLo(c.arg), uint32(c.mask), uint32(v)
					if half == 1 {
						off, m, want = argHi(c.arg), uint32(c.mask>>32), uint32(v>>32)
					}
					if m == 0 {
						if want != 0 {
							return nil, fmt.Errorf("seccomp: %s: condition can never hold", b.r.name)
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
			a.ret(unix.SECCOMP_RET_ALLOW)
			a.mark(fail)
		}
		a.ret(s.deny)
	}
	return a.assemble()
}
