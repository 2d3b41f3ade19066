package devspec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/virtq"
)

// A disk plugin holds its image writable and parses hostile bytes (the
// image, the guest's requests): compromised, it could grow the image until
// the host's file system is full. Its sandbox therefore bounds the size of
// every file it writes (RLIMIT_FSIZE, sandbox.Limits.FileBytes), from facts
// the core has without reading the image: the files' sizes and the user's
// max-size=. The core never parses qcow2.
//
//   - raw: a raw image never grows (nothing in run or serve resizes it), so
//     the bound is its size.
//   - qcow2 with max-size=M: the largest writable file's size plus
//     QCOW2Growth(M), what allocating the whole disk from nothing can add.
//     Starting from the size the file has at each launch keeps a restart
//     working after a killed plugin leaked clusters (at most one
//     allocation pool), however often that happens.
//   - qcow2 without max-size=: the core knows no size at launch; the
//     plugin is launched without a bound, which is lowered once the plugin
//     has opened the image and said its capacity (FileBytesFor), before
//     the guest's first request. The capacity is the plugin's word, so
//     this holds against a plugin the guest compromises, not against a
//     hostile image that compromises it while it opens: declare max-size=
//     for images you do not trust (docs/SECURITY.md).
//
// No bound is below MinFileBytes: the plugin's vhost-user inflight region
// is a memfd, which RLIMIT_FSIZE bounds as well.

// MinFileBytes is the least RLIMIT_FSIZE a disk plugin gets: the largest
// inflight region a vhost-user back-end of this module makes (a memfd of
// vhostuser.MaxQueues queues of virtq.MaxSize descriptors).
var MinFileBytes = uint64(vhostuser.MaxQueues)*vhostuser.Inflight{QueueSize: virtq.MaxSize}.QueueBytes() +
	vhostuser.InflightStateBytes

// qcow2GrowthSlack covers what does not scale with the virtual size: the
// header, the L1 and refcount tables and their first clusters at up to
// 2 MiB each, the allocation pool (32 MiB at most) and the rounding of the
// disk to whole clusters.
const qcow2GrowthSlack = 64 << 20

// QCOW2Growth is the most a qcow2 image's files grow when every cluster of
// a disk of virtual size v is allocated from nothing: the data, and the
// metadata, which is largest with 512-byte clusters, extended L2 entries
// (16 bytes per cluster: v/32) and 64-bit refcounts (8 bytes per cluster
// of data and metadata: about v/62), under v/16 in all. The bound allows
// twice that, v/8, plus qcow2GrowthSlack; it saturates at MaxUint64.
func QCOW2Growth(v uint64) uint64 {
	return satAdd(satAdd(v, v/8), qcow2GrowthSlack)
}

func satAdd(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// fileBound is how the RLIMIT_FSIZE of a disk's plugin is worked out.
type fileBound struct {
	// files are the writable files handed to the plugin (duplicates the
	// device keeps until Close, so that a restart can look at them).
	files []*os.File
	// growth is what the largest of them may grow by.
	growth uint64
	// untilCapacity: a qcow2 image without max-size=; the bound waits for
	// the plugin's capacity (FileBytesFor).
	untilCapacity bool
}

// Limits returns l, a plugin's sandbox limits, with the device's own set:
// the RLIMIT_FSIZE of its writable files (FileBytes) and its RLIMIT_NOFILE
// where it names one (OpenFiles). Launchers call it before every launch,
// a restart's too.
func (o *Opened) Limits(l sandbox.Limits) (sandbox.Limits, error) {
	fb, err := o.FileBytes()
	if err != nil {
		return l, err
	}
	l.FileBytes = fb
	if o.OpenFiles != 0 {
		l.OpenFiles = o.OpenFiles
	}
	return l, nil
}

// FileBytes is the RLIMIT_FSIZE to launch the device's plugin with
// (sandbox.Limits.FileBytes), from the sizes the device's writable files
// have now; 0 means none: the device is no disk, or a writable qcow2 image
// without max-size= (see FileBytesFor).
func (o *Opened) FileBytes() (uint64, error) {
	if o.bound == nil || o.bound.untilCapacity {
		return 0, nil
	}
	return o.bound.limit(o.bound.growth)
}

// FileBytesFor is the RLIMIT_FSIZE to lower a running plugin's to once it
// has opened a qcow2 image without max-size= and said the disk's capacity
// in bytes (from its virtio-blk config): the largest writable file's size
// plus QCOW2Growth(capacity). The capacity is the plugin's claim: the
// result only ever lowers a limit (the plugin was launched without one).
// 0 when the device's bound did not wait for it (FileBytes has it).
func (o *Opened) FileBytesFor(capacity uint64) (uint64, error) {
	if o.bound == nil || !o.bound.untilCapacity {
		return 0, nil
	}
	return o.bound.limit(QCOW2Growth(capacity))
}

// limit is the largest file's size now, plus growth, at least MinFileBytes.
func (b *fileBound) limit(growth uint64) (uint64, error) {
	var largest uint64
	for _, f := range b.files {
		n, err := fileSize(f)
		if err != nil {
			return 0, err
		}
		largest = max(largest, n)
	}
	return max(satAdd(largest, growth), MinFileBytes), nil
}

// fileSize is the size of a regular file or block device.
func fileSize(f *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return uint64(max(st.Size, 0)), nil
	}
	// A block device cannot grow (fstat says 0 bytes): its size as the
	// bound refuses none of its blocks, whether or not the kernel applies
	// RLIMIT_FSIZE to it. Every read and write of the plugin's is
	// positioned, so the shared offset that SEEK_END moves is nobody's.
	n, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_END)
	if err != nil {
		return 0, fmt.Errorf("size of block device %s: %w", f.Name(), err)
	}
	return uint64(n), nil
}

// LimitFileBytes lowers the RLIMIT_FSIZE of the device's running plugin,
// process pid, to FileBytesFor the capacity its virtio-blk config space
// states (its first 8 bytes: 512-byte sectors, little-endian; a config
// too short to hold them states 0), and logs the limit. Call it once the
// plugin has been configured, before it serves a request; it does nothing
// unless the device's bound waits for the capacity (FileBytes had none).
// The limit is only ever lowered. A kernel that refuses the change (EPERM:
// a root krun-core without its capabilities, plugins outside a user
// namespace of their own) leaves the plugin without one, with a warning;
// any other failure is returned.
func (o *Opened) LimitFileBytes(pid int, config []byte, log hclog.Logger) error {
	if o.bound == nil || !o.bound.untilCapacity {
		return nil
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var capacity uint64
	if len(config) >= 8 {
		capacity = math.MaxUint64
		if sectors := binary.LittleEndian.Uint64(config); sectors <= math.MaxUint64/512 {
			capacity = sectors * 512
		}
	}
	b, err := o.FileBytesFor(capacity)
	if err != nil {
		return err
	}
	var old unix.Rlimit
	err = unix.Prlimit(pid, unix.RLIMIT_FSIZE, nil, &old)
	if err == nil {
		b = min(b, old.Max)
		err = unix.Prlimit(pid, unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: b, Max: b}, nil)
	}
	switch {
	case errors.Is(err, unix.EPERM):
		log.Warn("cannot bound the size of the qcow2 plugin's files; declare max-size= to bound them from its launch",
			"pid", pid, "error", err)
		return nil
	case err != nil:
		return fmt.Errorf("lower the file size limit (RLIMIT_FSIZE) of plugin pid %d to %d: %w", pid, b, err)
	}
	log.Debug("file size limit of the qcow2 plugin, from the capacity it reports", "pid", pid, "capacity", capacity, "file_bytes", b)
	return nil
}
