// Command krun-plugin-null is an example third-party krun-core device
// plugin: a virtio entropy device (virtio device ID 4, "virtio-rng") whose
// bytes come from the kernel's random source, or are all zero with
// fill=zero (handy for tests).
//
// Build it static and install it next to krun-core (or in $KRUN_PLUGIN_DIR):
//
//	CGO_ENABLED=0 go build -trimpath -o krun-plugin-null ./examples/plugin-null
//
// Everything specific to this plugin is in device.go; the plugin side is one
// type implementing pluginsdk.Plugin and one call to pluginsdk.Serve.
package main

import (
	"context"
	"fmt"
	"os"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// nullPlugin is the pluginsdk.Plugin.
type nullPlugin struct{}

// Kind names the plugin; the executable is krun-plugin-null.
func (nullPlugin) Kind() string { return "null" }

// Policy: the smallest seccomp profile plus vhost-user's needs, and no file
// system access at all (the device reads no file).
func (nullPlugin) Policy(map[string]int) sandbox.Policy {
	return sandbox.Policy{Kind: "null", Syscalls: sandbox.ProfileNet}
}

// Configure takes one option, fill=random|zero, and no files.
func (nullPlugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, "fill"); err != nil {
		return nil, err
	}
	if len(files) != 0 {
		return nil, fmt.Errorf("the null device takes no files, got %d", len(files))
	}
	fill := opts["fill"]
	switch fill {
	case "", "random":
		return newEntropy(false, log), nil
	case "zero":
		return newEntropy(true, log), nil
	}
	return nil, fmt.Errorf("option fill=%q: want random or zero", fill)
}

func main() { pluginsdk.Serve(nullPlugin{}) }
