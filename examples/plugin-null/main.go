// Command krun-plugin-null is an example third-party krun-core device
// plugin: a virtio entropy device (virtio device ID 4, "virtio-rng") whose
// bytes come from the kernel's random source, are all zero with fill=zero
// (handy for tests), or come from a file the user hands it with
// fill=file: --plugin null,fill=file,file.source=/dev/hwrng (krun-core
// opens the file; the plugin cannot open anything).
//
// Build it static and install it next to krun-core (or in a directory named
// with --plugin-dir or $KRUN_PLUGIN_DIR):
//
//	CGO_ENABLED=0 go build -trimpath -o krun-plugin-null ./examples/plugin-null
//	bin/krun-core serve --plugin-dir . --socket /tmp/rng.sock --plugin null,fill=zero
//
// A plugin of your own lives in a module of its own: docs/PLUGINS.md,
// "Building, naming, installing, shipping".
//
// Everything specific to this plugin is in device.go; the plugin side is one
// type implementing pluginsdk.Plugin and one call to pluginsdk.Serve.
package main

import (
	"context"
	"crypto/rand"
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

// Policy: the smallest seccomp profile (the Go runtime and vhost-user's
// needs; read(2) of a file it was handed is in it, positioned reads such as
// ReadAt are not: those need ProfileBlock), and no file system access at
// all (the device opens nothing).
func (nullPlugin) Policy(map[string]int) sandbox.Policy {
	return sandbox.Policy{Kind: "null", Syscalls: sandbox.ProfileMinimal}
}

// Configure takes one option, fill=random|zero|file, and with fill=file
// one file, source, to read the bytes from.
func (nullPlugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, "fill"); err != nil {
		return nil, err
	}
	known := []string{}
	if opts["fill"] == "file" {
		known = append(known, "source")
	}
	if extra := pluginsdk.UnknownFiles(files, known...); len(extra) > 0 {
		return nil, fmt.Errorf("file %s: the null device takes a file only with fill=file, and only source", extra[0])
	}
	fill := opts["fill"]
	switch fill {
	case "", "random":
		return newEntropy(rand.Reader, log), nil
	case "zero":
		return newEntropy(zeros{}, log), nil
	case "file":
		src := files["source"]
		if src == nil {
			return nil, fmt.Errorf("fill=file needs the file to read: file.source=PATH")
		}
		return newEntropy(src, log), nil
	}
	return nil, fmt.Errorf("option fill=%q: want random, zero or file", fill)
}

func main() { pluginsdk.Serve(nullPlugin{}) }
