package vmm

import (
	"slices"
	"testing"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/sandbox"
)

// TestPluginSyscallGrants: a grant reaches the launch sandbox of the
// --plugin device of its kind, and no other device's.
func TestPluginSyscallGrants(t *testing.T) {
	c := NewContext(nil)
	g := devspec.SyscallGrants{}
	if err := g.Add("hello=sysinfo"); err != nil {
		t.Fatal(err)
	}
	c.SetPluginSyscalls(g)
	hello := &pluginDevice{c: c, spec: &devspec.PluginSpec{PluginKind: "hello"}}
	other := &pluginDevice{c: c, spec: &devspec.PluginSpec{PluginKind: "other"}}
	disk, err := devspec.Parse("disk", "path=/x.img,format=raw")
	if err != nil {
		t.Fatal(err)
	}
	raw := &pluginDevice{c: c, spec: disk}
	names := func(d *pluginDevice) []string {
		var n []string
		for _, s := range d.launchConfig().ExtraSyscalls {
			n = append(n, s.Name)
		}
		return n
	}
	if got := names(hello); !slices.Equal(got, []string{"sysinfo"}) {
		t.Errorf("hello's launch grants %v, want [sysinfo]", got)
	}
	if got := names(other); got != nil {
		t.Errorf("another kind's launch grants %v", got)
	}
	if got := names(raw); got != nil {
		t.Errorf("a disk's launch grants %v", got)
	}
	c.SetSandboxOff(true)
	if lc := hello.launchConfig(); lc != (*sandbox.LaunchConfig)(nil) {
		t.Errorf("sandbox off: launch config %+v", lc)
	}
}
