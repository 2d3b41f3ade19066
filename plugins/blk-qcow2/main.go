// Command krun-plugin-blk-qcow2 serves a qcow2 image as a virtio-blk device
// over vhost-user. The host opens the image ("image"), each declared backing
// file ("backing.0" nearest first, always read-only) and an external data
// file ("data-file") and hands them over with their declared formats; the
// plugin opens no paths. Paths, when the host passes them ("path",
// "backing.N.path", "data-file.path"), are only compared with the names the
// image records, so a chain the user did not declare is refused.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/devices/blk"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// Options besides devspec's.
const (
	optQueues     = devopts.OptQueues // request queues offered, 1..64
	defaultQueues = 8
)

const (
	optPath         = devopts.OptPath
	optDataFilePath = devopts.OptDataFilePath
)

func backingPath(n int) string { return devopts.OptBackingPath(n) }

type plugin struct{}

func (plugin) Kind() string { return devopts.KindBlkQCOW2 }

func (plugin) Policy(map[string]int) sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("blk", -1)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	allowed := []string{devopts.OptFormat, devopts.OptReadOnly, devopts.OptMaxSize, optPath, optDataFilePath, optQueues}
	known := []string{devopts.FileImage, devopts.FileDataFile}
	for n := 0; n < devopts.MaxBackingChain; n++ {
		allowed = append(allowed, devopts.OptBackingFormat(n), backingPath(n))
		known = append(known, devopts.BackingFile(n))
	}
	if err := pluginsdk.CheckOptions(opts, allowed...); err != nil {
		return nil, err
	}
	if f, ok := opts[devopts.OptFormat]; ok && disk.Format(f) != disk.QCOW2 {
		return nil, fmt.Errorf("option format=%q: this plugin serves qcow2 images only", f)
	}
	ro, err := pluginsdk.OnOff(opts, devopts.OptReadOnly, false)
	if err != nil {
		return nil, err
	}
	queues, err := pluginsdk.IntOption(opts, optQueues, defaultQueues, 1, blk.MaxQueues)
	if err != nil {
		return nil, err
	}
	var maxSize int64
	if v, ok := opts[devopts.OptMaxSize]; ok {
		if maxSize, err = strconv.ParseInt(v, 10, 64); err != nil || maxSize <= 0 {
			return nil, fmt.Errorf("option %s=%q: want a positive byte count", devopts.OptMaxSize, v)
		}
	}
	img := files[devopts.FileImage]
	if img == nil {
		return nil, fmt.Errorf("no %q file was passed", devopts.FileImage)
	}
	if extra := pluginsdk.UnknownFiles(files, known...); len(extra) > 0 {
		return nil, fmt.Errorf("unexpected files %q", extra)
	}
	path, err := absPath(opts, optPath)
	if err != nil {
		return nil, err
	}

	o := qcow2.Options{ReadOnly: ro, Path: path, MaxVirtualSize: maxSize, Logger: log}
	for n := 0; ; n++ {
		f := files[devopts.BackingFile(n)]
		if f == nil {
			if _, ok := opts[devopts.OptBackingFormat(n)]; ok {
				return nil, fmt.Errorf("option %s without its file", devopts.OptBackingFormat(n))
			}
			break
		}
		format, err := disk.ParseFormat(opts[devopts.OptBackingFormat(n)])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", devopts.BackingFile(n), err)
		}
		p, err := absPath(opts, backingPath(n))
		if err != nil {
			return nil, err
		}
		if p == "" {
			// Without it the image's recorded backing name cannot be
			// checked against what the user declared.
			return nil, fmt.Errorf("the host passed %s without option %s (its absolute path)", devopts.BackingFile(n), backingPath(n))
		}
		o.Backing = append(o.Backing, qcow2.Layer{File: f, Format: format, Path: p})
	}
	if f := files[devopts.FileDataFile]; f != nil {
		p, err := absPath(opts, optDataFilePath)
		if err != nil {
			return nil, err
		}
		if p == "" {
			return nil, fmt.Errorf("the host passed %s without option %s (its absolute path)", devopts.FileDataFile, optDataFilePath)
		}
		o.DataFile = &qcow2.Layer{File: f, Format: disk.Raw, Path: p}
	}

	im, err := qcow2.Open(img, o)
	if err != nil {
		if path != "" && strings.Contains(err.Error(), path) {
			return nil, err // it names the image already
		}
		return nil, fmt.Errorf("image %s: %w", display(path), err)
	}
	info := im.Info()
	align := uint32(info.ClusterSize / blk.SectorSize)
	// As for a raw image (blk-raw): the kernel serializes a regular
	// file's buffered writes on its inode's lock, and allocating writes
	// take the image's lock anyway; one write at a time saves the
	// contention. Reads stay parallel.
	serial := false
	if st, err := img.Stat(); err == nil && st.Mode().IsRegular() {
		serial = true
	}
	rangeSectors := rangeSectors(info.ClusterSize)
	dev, err := blk.New(blk.Config{Disk: im, NumQueues: queues, DiscardAlignment: align, Log: log, OwnsDisk: true,
		SerialWrites: serial, MaxDiscardSectors: rangeSectors, MaxWriteZeroesSectors: rangeSectors})
	if err != nil {
		im.Close()
		return nil, err
	}
	log.Info("serving qcow2 image", "image", logName(path), "virtual_size", im.Size(), "cluster_size", info.ClusterSize,
		"backing_layers", len(o.Backing), "readonly", ro, "queues", queues)
	return dev, nil
}

// maxRangeClusters bounds the clusters one DISCARD or WRITE_ZEROES range
// covers (the device's max_discard_sectors and max_write_zeroes_sectors).
// Such a range costs about a microsecond of metadata work per cluster
// whatever the cluster's size, so with the default range (just under 2
// GiB) and 32 ranges a request, an image of 4 KiB clusters took about 15 s
// for one request and one of 512-byte clusters minutes: past the core's
// wait for a ring to stop (a reset), after which the plugin is killed and
// the request replayed (found in review, helper-134). 65536 clusters a
// range keep a whole request near 2 s at worst; 64 KiB and larger
// clusters keep the default.
const maxRangeClusters = 1 << 16

// rangeSectors is the longest DISCARD or WRITE_ZEROES range, in 512-byte
// sectors, for an image of clusterSize-byte clusters: maxRangeClusters
// clusters, at most blk.DefaultMaxSectors.
func rangeSectors(clusterSize int64) uint32 {
	n := int64(blk.DefaultMaxSectors)
	if clusterSize > 0 && clusterSize <= n*blk.SectorSize/maxRangeClusters {
		n = maxRangeClusters * clusterSize / blk.SectorSize
	}
	return uint32(n)
}

// absPath returns an optional path option, which must be absolute.
func absPath(opts map[string]string, key string) (string, error) {
	p, ok := opts[key]
	if !ok {
		return "", nil
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("option %s=%q: want an absolute path", key, p)
	}
	return filepath.Clean(p), nil
}

// logName is the image's path for a log field, which hclog quotes
// itself where needed.
func logName(p string) string {
	if p == "" {
		return "(fd)"
	}
	return p
}

func display(p string) string {
	if p == "" {
		return "(fd)"
	}
	return strconv.Quote(p)
}

func main() { pluginsdk.Serve(plugin{}) }
