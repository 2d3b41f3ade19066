package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// buildVersion may be set at link time (-ldflags "-X main.buildVersion=v1.2.3").
var buildVersion string

// versionText is what --version prints: the version, the commit it was
// built from, the Go release and the plugin protocol version.
func versionText() string {
	v, rev, dirty := "(devel)", "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	if buildVersion != "" {
		v = buildVersion
	}
	var b strings.Builder
	fmt.Fprintf(&b, "krun-core %s", v)
	if rev != "" {
		fmt.Fprintf(&b, " commit %.12s", rev)
		if dirty {
			b.WriteString(" (modified)")
		}
	}
	fmt.Fprintf(&b, ", %s, plugin protocol %d\n", runtime.Version(), pluginpb.ProtocolVersion)
	return b.String()
}
