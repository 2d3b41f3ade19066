// Command krun-plugin-blk-raw serves a raw disk image as a virtio-blk device
// over vhost-user. The host opens the image (fd "image", read-write or, with
// readonly=on, read-only) and hands it over; the plugin opens no paths and
// never looks at the image's content to decide how to serve it: raw is raw.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// Options besides devspec's format and readonly.
const (
	// optPath is the image's host path, for messages only.
	optPath = devopts.OptPath
	// optQueues is the number of request queues offered (1..64). A
	// front-end uses as many as it wants up to that.
	optQueues = devopts.OptQueues
	// defaultQueues leaves room for a multi-vCPU guest's queue per CPU.
	defaultQueues = 8
)

type plugin struct{}

func (plugin) Kind() string { return devopts.KindBlkRaw }

func (plugin) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("blk", -1)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, devopts.OptFormat, devopts.OptReadOnly, optPath, optQueues); err != nil {
		return nil, err
	}
	if f, ok := opts[devopts.OptFormat]; ok && disk.Format(f) != disk.Raw {
		return nil, fmt.Errorf("option format=%q: this plugin serves raw images only", f)
	}
	ro, err := pluginsdk.OnOff(opts, devopts.OptReadOnly, false)
	if err != nil {
		return nil, err
	}
	queues, err := pluginsdk.IntOption(opts, optQueues, defaultQueues, 1, blk.MaxQueues)
	if err != nil {
		return nil, err
	}
	img := files[devopts.FileImage]
	if img == nil {
		return nil, fmt.Errorf("no %q file was passed", devopts.FileImage)
	}
	if extra := pluginsdk.UnknownFiles(files, devopts.FileImage); len(extra) > 0 {
		return nil, fmt.Errorf("unexpected files %q: a raw image has no backing or data file", extra)
	}
	d, err := raw.Open(img, raw.Options{ReadOnly: ro})
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", name(opts), err)
	}
	// A regular file's buffered writes are serialized by the kernel on the
	// inode's lock: writing one at a time saves the contention
	// (docs/BENCHMARKS.md, "Block writes: where the time goes").
	st, err := img.Stat()
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("image %s: %w", name(opts), err)
	}
	dev, err := blk.New(blk.Config{Disk: d, NumQueues: queues, Log: log, OwnsDisk: true,
		SerialWrites: st.Mode().IsRegular()})
	if err != nil {
		d.Close()
		return nil, err
	}
	log.Info("serving raw image", "image", logName(opts[optPath]), "bytes", d.Size(), "readonly", ro, "queues", queues)
	return dev, nil
}

// logName is the image's path for a log field, which hclog quotes
// itself where needed.
func logName(p string) string {
	if p == "" {
		return "(fd)"
	}
	return p
}

func name(opts map[string]string) string {
	if p := opts[optPath]; p != "" {
		return strconv.Quote(p)
	}
	return "(fd)"
}

func main() { pluginsdk.Serve(plugin{}) }
