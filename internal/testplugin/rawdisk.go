// Package testplugin is what the tests' own plugins (the testdata commands
// of core/vmm and cmd/krun-core) are built on: a raw disk as
// krun-plugin-blk-raw serves it (its kind, sandbox policy and device), whose
// device a test plugin may wrap to misbehave in one chosen way.
package testplugin

import (
	"context"
	"errors"
	"os"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/disk/raw"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// RawDisk is a pluginsdk plugin serving its image (one queue) as a raw
// disk, as a blk-raw plugin.
type RawDisk struct {
	// Wrap, if set, makes the device served out of the one Configure
	// made for the image img.
	Wrap func(dev *blk.Device, img *os.File) backend.Device
}

// Kind is blk-raw's.
func (RawDisk) Kind() string { return devopts.KindBlkRaw }

// Policy is the blk plugins' default sandbox policy.
func (RawDisk) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("blk", -1)
	return p
}

// Configure opens the image handed as devopts.FileImage as a raw disk.
func (p RawDisk) Configure(_ context.Context, _ map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	img := files[devopts.FileImage]
	if img == nil {
		return nil, errors.New("no image")
	}
	d, err := raw.Open(img, raw.Options{})
	if err != nil {
		return nil, err
	}
	dev, err := blk.New(blk.Config{Disk: d, NumQueues: 1, Log: log, OwnsDisk: true})
	if err != nil {
		return nil, err
	}
	if p.Wrap != nil {
		return p.Wrap(dev, img), nil
	}
	return dev, nil
}
