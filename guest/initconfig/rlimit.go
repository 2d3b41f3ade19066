package initconfig

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// RlimInfinity is RLIM_INFINITY, the value of "unlimited".
const RlimInfinity = math.MaxUint64

// rlimitNumbers maps canonical names to Linux's resource numbers
// (include/uapi/asm-generic/resource.h, which x86-64 uses).
var rlimitNumbers = map[string]int{
	"RLIMIT_CPU":        0,
	"RLIMIT_FSIZE":      1,
	"RLIMIT_DATA":       2,
	"RLIMIT_STACK":      3,
	"RLIMIT_CORE":       4,
	"RLIMIT_RSS":        5,
	"RLIMIT_NPROC":      6,
	"RLIMIT_NOFILE":     7,
	"RLIMIT_MEMLOCK":    8,
	"RLIMIT_AS":         9,
	"RLIMIT_LOCKS":      10,
	"RLIMIT_SIGPENDING": 11,
	"RLIMIT_MSGQUEUE":   12,
	"RLIMIT_NICE":       13,
	"RLIMIT_RTPRIO":     14,
	"RLIMIT_RTTIME":     15,
}

// RlimitNames returns the canonical names, sorted.
func RlimitNames() []string {
	out := make([]string, 0, len(rlimitNumbers))
	for n := range rlimitNumbers {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// CanonicalRlimit turns "nofile", "NOFILE" or "rlimit_nofile" (any case)
// into "RLIMIT_NOFILE".
func CanonicalRlimit(name string) (string, error) {
	n := strings.ToUpper(strings.TrimSpace(name))
	if !strings.HasPrefix(n, "RLIMIT_") {
		n = "RLIMIT_" + n
	}
	if _, ok := rlimitNumbers[n]; !ok {
		return "", fmt.Errorf("unknown resource limit %q (one of %s, case-insensitive, RLIMIT_ optional)",
			name, strings.ToLower(strings.Join(trimPrefixes(RlimitNames()), ", ")))
	}
	return n, nil
}

func trimPrefixes(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = strings.TrimPrefix(n, "RLIMIT_")
	}
	return out
}

// RlimitNumber returns the resource number of a canonical name for
// setrlimit/prlimit.
func RlimitNumber(canonical string) (int, bool) {
	n, ok := rlimitNumbers[canonical]
	return n, ok
}

// isDecimal says whether s is a non-empty run of decimal digits.
func isDecimal(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }

// rlimitByNumber turns a resource number, "7" (as libkrun's
// krun_set_rlimits has them), into its canonical name, "RLIMIT_NOFILE".
func rlimitByNumber(s string) (string, error) {
	if n, err := strconv.Atoi(s); err == nil {
		for name, v := range rlimitNumbers {
			if v == n {
				return name, nil
			}
		}
	}
	return "", fmt.Errorf("unknown resource number %s (0 to %d, or a name: %s)",
		s, len(rlimitNumbers)-1, strings.ToLower(strings.Join(trimPrefixes(RlimitNames()), ", ")))
}

// parseLimitValue parses a decimal limit or "unlimited" (also "infinity",
// "-1").
func parseLimitValue(s string) (uint64, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "unlimited", "infinity", "-1":
		return RlimInfinity, nil
	}
	v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("limit %q is not a non-negative integer or \"unlimited\"", s)
	}
	return v, nil
}

// ParseRlimit parses the argument of --rlimit: NAME=SOFT:HARD, or NAME=N
// for soft = hard = N. NAME is case-insensitive with an optional RLIMIT_
// prefix, or Linux's resource number as libkrun's krun_set_rlimits takes
// it ("6=4096:8192" is nproc); a value may be "unlimited".
func ParseRlimit(s string) (Rlimit, error) {
	name, vals, ok := strings.Cut(s, "=")
	if !ok {
		return Rlimit{}, fmt.Errorf("rlimit %q: want NAME=SOFT:HARD", s)
	}
	var canon string
	var err error
	if isDecimal(name) {
		canon, err = rlimitByNumber(name)
	} else {
		canon, err = CanonicalRlimit(name)
	}
	if err != nil {
		return Rlimit{}, fmt.Errorf("rlimit %q: %w", s, err)
	}
	softS, hardS, two := strings.Cut(vals, ":")
	soft, err := parseLimitValue(softS)
	if err != nil {
		return Rlimit{}, fmt.Errorf("rlimit %q: soft %w", s, err)
	}
	hard := soft
	if two {
		if hard, err = parseLimitValue(hardS); err != nil {
			return Rlimit{}, fmt.Errorf("rlimit %q: hard %w", s, err)
		}
	}
	if soft > hard {
		return Rlimit{}, fmt.Errorf("rlimit %q: soft limit above hard limit", s)
	}
	return Rlimit{Type: canon, Soft: soft, Hard: hard}, nil
}

// String formats r the way ParseRlimit reads it.
func (r Rlimit) String() string {
	f := func(v uint64) string {
		if v == RlimInfinity {
			return "unlimited"
		}
		return strconv.FormatUint(v, 10)
	}
	return strings.ToLower(strings.TrimPrefix(r.Type, "RLIMIT_")) + "=" + f(r.Soft) + ":" + f(r.Hard)
}
