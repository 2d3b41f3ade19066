package sandbox

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReviewExtraSyscallKnownOnArch (from review; test by a helper):
// docs/PLUGINS.md says an ExtraSyscalls entry outside the launcher's
// profile stays refused and Restrict logs a warning naming it. That holds for uname or mprotect, but a plugin asking
// for sysinfo, statfs, getitimer or inotify_init1 (all amd64 system calls)
// is refused at launch with "is not known on this architecture": the name
// table (sysnum_amd64.go) lists about 200 of the architecture's calls, and
// the launcher's refusal log named such a call "#99". The table now holds
// every name golang.org/x/sys/unix has for the architecture.
func TestReviewExtraSyscallKnownOnArch(t *testing.T) {
	for _, tc := range []struct {
		name string
		nr   int
	}{
		{"sysinfo", unix.SYS_SYSINFO},
		{"statfs", unix.SYS_STATFS},
		{"getitimer", unix.SYS_GETITIMER},
		{"inotify_init1", unix.SYS_INOTIFY_INIT1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := Policy{Kind: "hello", Syscalls: ProfileNet,
				ExtraSyscalls: []Syscall{{Name: tc.name, Reason: "the device needs it"}}}
			if err := p.Validate(); err != nil && strings.Contains(err.Error(), "not known on this architecture") {
				t.Errorf("%s (nr %d on this architecture): %v", tc.name, tc.nr, err)
			}
		})
	}
}
