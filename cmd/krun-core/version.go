package main

import (
	"fmt"
	"runtime"

	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/proto/pluginpb"
)

// buildVersion may be set at link time (-ldflags "-X main.buildVersion=v1.2.3").
var buildVersion string

// versionText is what --version prints: the version, the commit it was
// built from, the Go release and the plugin protocol version.
func versionText() string {
	b := cli.ReadBuild()
	if buildVersion != "" {
		b.Version = buildVersion
	}
	return fmt.Sprintf("krun-core %s, %s, plugin protocol %d\n", b, runtime.Version(), pluginpb.ProtocolVersion)
}
