package devspec

import (
	"fmt"
	"slices"
	"strings"

	"github.com/krun-core/krun-core/sandbox"
)

// GrantReason is the reason recorded for a system call the user granted
// on the command line.
const GrantReason = "granted by the user (--plugin-syscalls)"

// SyscallGrants are the system calls the user grants plugins beyond their
// launch profile, by plugin kind (--plugin-syscalls KIND=NAME,...). A
// third-party plugin that declares extra system calls in its policy gets
// them only if its launcher grants them too; this is that consent. The
// sandbox still refuses ForbiddenSyscalls and calls it allows only with
// argument limits.
type SyscallGrants map[string][]sandbox.Syscall

// Add parses one --plugin-syscalls value, KIND=NAME[,NAME...], and checks
// the names against the kind's launch profile.
func (g SyscallGrants) Add(v string) error {
	kind, list, ok := strings.Cut(v, "=")
	if !ok {
		return fmt.Errorf("%s: want KIND=NAME[,NAME...]", printable(v))
	}
	if !validKind(kind) {
		return fmt.Errorf("plugin kind %s: want 1-64 characters of a-z, 0-9 and '-'", printable(kind))
	}
	if _, dup := g[kind]; dup {
		return fmt.Errorf("%s given twice; list its system calls in one KIND=NAME,... value", kind)
	}
	var calls []sandbox.Syscall
	for _, name := range strings.Split(list, ",") {
		switch {
		case name == "":
			return fmt.Errorf("%s: empty system call name", printable(v))
		case slices.ContainsFunc(calls, func(s sandbox.Syscall) bool { return s.Name == name }):
			return fmt.Errorf("%s: %s listed twice", kind, printable(name))
		}
		calls = append(calls, sandbox.Syscall{Name: name, Reason: GrantReason})
	}
	p := sandbox.Policy{Kind: "launch", Syscalls: sandbox.KindProfile(kind), ExtraSyscalls: calls}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("%s: %w", kind, err)
	}
	g[kind] = calls
	return nil
}

// Check returns an error for a grant to a kind that no --plugin names:
// the built-in devices' plugins declare no extra calls, and a grant that
// applies to nothing is most likely a typo.
func (g SyscallGrants) Check(specs []Spec) error {
	for kind := range g {
		if !slices.ContainsFunc(specs, func(s Spec) bool {
			p, ok := s.(*PluginSpec)
			return ok && p.PluginKind == kind
		}) {
			return fmt.Errorf("%s: no --plugin %s to grant them to", kind, kind)
		}
	}
	return nil
}
