// Command krun-plugin-console is the virtio-console plugin of `krun-core
// run -- CMD`: one named port ("krun.stdio") carrying the framed standard
// I/O of the guest program (guest/stdioframe) to and from the files the
// host hands over: krun-core's stdin, stdout and stderr, and a control
// pipe for window sizes and signals. It opens nothing; every byte from the
// guest is parsed here, not in the core.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/console"
	"github.com/krun-core/krun-core/devices/console/stdio"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

type plugin struct{}

func (plugin) Kind() string { return devopts.KindConsole }

// Policy: the console moves bytes between inherited fds and guest memory,
// like the network plugin with passt's socket, but without shutdown and
// setsockopt: a socket it is handed (krun-core's stdout or stderr) is
// krun-core's own, shared with it (sandbox.DefaultPolicy).
func (plugin) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("console", -1)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, devopts.OptName, devopts.OptTTY, devopts.OptHoldStdin, devopts.OptStdio); err != nil {
		return nil, err
	}
	if v, want := opts[devopts.OptStdio], strconv.Itoa(stdioframe.Version); v != want {
		return nil, fmt.Errorf("option %s=%q: this console plugin speaks stdio protocol %s (krun-core, krun-init and krun-plugin-console must come from the same build)", devopts.OptStdio, v, want)
	}
	hold, err := pluginsdk.OnOff(opts, devopts.OptHoldStdin, false)
	if err != nil {
		return nil, err
	}
	if _, err := pluginsdk.OnOff(opts, devopts.OptTTY, false); err != nil {
		return nil, err
	}
	if extra := pluginsdk.UnknownFiles(files, devopts.FileStdin, devopts.FileStdout, devopts.FileStderr, devopts.FileControl); len(extra) > 0 {
		return nil, fmt.Errorf("unexpected files %v", extra)
	}
	name := opts[devopts.OptName]
	if name == "" {
		return nil, fmt.Errorf("option %s= is required", devopts.OptName)
	}
	dev, err := console.New(console.Config{Name: name, Logger: log})
	if err != nil {
		return nil, err
	}
	cfg := stdio.Config{Port: dev, Logger: log, HoldStdin: hold}
	// Absent files stay nil interfaces (no typed nil *os.File).
	if f := files[devopts.FileStdin]; f != nil {
		cfg.Stdin = f
	}
	if f := files[devopts.FileStdout]; f != nil {
		cfg.Stdout = f
	}
	if f := files[devopts.FileStderr]; f != nil {
		cfg.Stderr = f
	}
	if f := files[devopts.FileControl]; f != nil {
		cfg.Control = f
	}
	go func() {
		if err := stdio.New(cfg).Run(context.Background()); err != nil {
			log.Error("stdio bridge ended", "error", err)
		}
	}()
	return dev, nil
}

func main() { pluginsdk.Serve(plugin{}) }
