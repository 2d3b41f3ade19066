package cli

import (
	"fmt"
	"runtime/debug"
	"strings"
)

// Build is what a binary knows about its own build: the module version
// ("(devel)" when built from a source tree) and, when built from a git
// checkout, the commit and whether the tree had changes.
type Build struct {
	Version  string
	Revision string
	Modified bool
}

// ReadBuild reads the running binary's build information.
func ReadBuild() Build {
	b := Build{Version: "(devel)"}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if bi.Main.Version != "" {
		b.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

// String is "VERSION[ commit REV[ (modified)]]", the commit cut to 12
// digits; without the commit where the version already names it (the
// pseudo-version Go stamps, v0.0.0-DATE-REV[+dirty]).
func (b Build) String() string {
	var s strings.Builder
	s.WriteString(b.Version)
	if rev := b.Revision; rev != "" && !strings.Contains(b.Version, rev[:min(len(rev), 12)]) {
		fmt.Fprintf(&s, " commit %.12s", b.Revision)
		if b.Modified {
			s.WriteString(" (modified)")
		}
	}
	return s.String()
}
