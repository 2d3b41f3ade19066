// Package blk is the virtio-blk device model (virtio 1.2, section 5.2) over a
// disk.Disk, served as a vhost-user back-end.
//
// It offers IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, multiqueue
// (each queue served by the back-end's ring engine with a pool of request
// goroutines; the disk is shared and safe for concurrent use)
// and VIRTIO_BLK_F_RO for read-only disks. Every request is untrusted: a
// malformed one fails with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP and a
// counter in Stats, never a panic. Data moves between guest memory and the
// disk without an intermediate copy (preadv/pwritev straight into the
// descriptor buffers when the disk offers vectored I/O), and serving a
// request allocates nothing.
package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// VectorDisk is implemented by disks that can transfer a scattered buffer in
// one call (disk/raw does, with preadv/pwritev). The device uses it when
// present and falls back to one ReadAt/WriteAt per segment.
type VectorDisk interface {
	ReadvAt(bufs [][]byte, off int64) (int, error)
	WritevAt(bufs [][]byte, off int64) (int, error)
}

// Defaults for Config fields left zero.
const (
	// DefaultQueueSize is QEMU's largest ring (VIRTQUEUE_MAX_SIZE), which
	// qemu-storage-daemon accepts and users set (queue-size=1024): a
	// front-end's ring may be any power of two up to it.
	DefaultQueueSize = 1024
	// maxSegChain bounds a request's chain (seg_max + the header and the
	// status) whatever the ring: 256, what seg_max was when rings stopped
	// at 256. Linux builds indirect tables of seg_max+2 entries on any
	// ring, and before 5.17 its virtio_blk preallocated that many
	// scatterlist entries for every request of the queue's depth.
	maxSegChain           = 256
	DefaultMaxSectors     = 1<<22 - 8 // per discard / write-zeroes range: just under 2 GiB, 4 KiB aligned
	DefaultMaxSegments    = 32        // ranges per discard / write-zeroes request
	DefaultDiscardAlign   = 8         // sectors: 4 KiB
	DefaultQueueWorkers   = 8
	maxQueueWorkers       = 256
	MaxQueues             = 64
	maxSegmentsLimit      = 256 // Linux never sends more than 256 discard ranges
	defaultSizeMax        = 1 << 20
	minQueueSizeForSegMax = 4
)

// Config configures a Device.
type Config struct {
	// Disk is the image. The device does not close it.
	Disk disk.Disk
	// NumQueues is the number of request queues (VIRTIO_BLK_F_MQ); 0 means 1.
	NumQueues int
	// QueueSize is the largest queue the device accepts, a power of two up
	// to 32768; 0 means DefaultQueueSize.
	QueueSize int
	// Serial is the GET_ID answer, at most 20 bytes.
	Serial string
	// DiscardAlignment is discard_sector_alignment, in sectors; 0 means
	// DefaultDiscardAlign. qcow2 images should pass their cluster size.
	DiscardAlignment uint32
	// MaxDiscardSectors / MaxWriteZeroesSectors bound one range; 0 means
	// DefaultMaxSectors.
	MaxDiscardSectors, MaxWriteZeroesSectors uint32
	// MaxDiscardSegments / MaxWriteZeroesSegments bound the ranges of one
	// request (at most 256); 0 means DefaultMaxSegments.
	MaxDiscardSegments, MaxWriteZeroesSegments uint32
	// Log receives warnings about disk errors; nil discards them.
	Log hclog.Logger
	// OwnsDisk makes Close close Disk (a plugin hands its disk over).
	OwnsDisk bool
	// QueueWorkers is how many requests of one queue may be on the disk at
	// once; 0 means DefaultQueueWorkers, 1 serves each queue synchronously
	// on its ring goroutine.
	QueueWorkers int
	// SerialWrites makes writes reach the disk one at a time (reads stay
	// parallel): for a regular file, whose buffered writes the kernel
	// serializes on the inode's lock anyway, so that request goroutines
	// writing at once only contend for it (docs/BENCHMARKS.md, "Block
	// writes: where the time goes").
	SerialWrites bool
}

type limits struct {
	segMax, sizeMax                          uint32
	maxDiscardSectors, maxDiscardSeg         uint32
	discardAlign                             uint32
	maxWriteZeroesSectors, maxWriteZeroesSeg uint32
}

// Device is a virtio-blk device. Its request handling is safe for use by one
// goroutine per queue at the same time.
type Device struct {
	disk      disk.Disk
	vec       VectorDisk
	capacity  uint64 // in sectors
	readOnly  bool
	numQueues int
	queueSize int
	id        [IDBytes]byte
	limits    limits
	log       hclog.Logger
	ownsDisk  bool
	qworkers  int
	serialW   bool
	wmu       sync.Mutex // held around a write when serialW

	negotiated atomic.Uint64 // virtio features the driver accepted
	stats      counters

	ioWarn ratelog.Limiter // failed I/O: logged at most every 10 s

	// state is what outlives this plugin process (backend.StateKeeper):
	// whether a sync of the disk failed.
	state atomic.Pointer[backend.DeviceState]
}

// StateSyncFailed is the device state flag that says a sync of the disk
// failed, in this plugin process or in one before it that served the same
// front-end: every FLUSH fails from then on (disk.ErrSyncFailed), also
// after the plugin is restarted, for as long as the front-end keeps its
// inflight region.
const StateSyncFailed = 1 << 0

// errEarlierSyncFailed is the latched failure a restarted plugin learns
// from the device state.
var errEarlierSyncFailed = errors.New("a sync failed in an earlier plugin process serving this device")

// UseState takes the state the front-end keeps for the device across
// plugin processes (backend.StateKeeper): a sync failure recorded there
// latches the disk, and one of this process is recorded there.
func (d *Device) UseState(s *backend.DeviceState) {
	d.state.Store(s)
	d.syncState()
}

// syncState makes the disk's sync latch and the device state agree (both
// failed once either did). It runs when the state is handed over, when a
// ring starts (a device reset zeroed the state; the disk remembers) and
// after a failed request, before it completes: a plugin killed once the
// guest saw the failure leaves it recorded.
func (d *Device) syncState() {
	s := d.state.Load()
	sl, ok := d.disk.(disk.SyncLatched)
	if s == nil || !ok {
		return
	}
	if s.Flags()&StateSyncFailed != 0 && sl.SyncFailed() == nil {
		sl.FailSync(errEarlierSyncFailed)
		d.log.Warn("a sync of the disk failed in an earlier plugin process serving this device; every flush fails from now on")
	}
	if sl.SyncFailed() != nil {
		s.Set(StateSyncFailed)
	}
}

// New builds a device for cfg.Disk.
func New(cfg Config) (*Device, error) {
	if cfg.Disk == nil {
		return nil, errors.New("blk: no disk")
	}
	size := cfg.Disk.Size()
	if size < 0 {
		return nil, fmt.Errorf("blk: disk reports negative size %d", size)
	}
	d := &Device{
		disk:      cfg.Disk,
		capacity:  uint64(size) >> sectorShift, // a partial last sector is not served
		readOnly:  cfg.Disk.ReadOnly(),
		numQueues: cfg.NumQueues,
		queueSize: cfg.QueueSize,
		log:       cfg.Log,
		ownsDisk:  cfg.OwnsDisk,
		qworkers:  cfg.QueueWorkers,
		serialW:   cfg.SerialWrites,
	}
	if v, ok := cfg.Disk.(VectorDisk); ok {
		d.vec = v
	}
	if d.numQueues == 0 {
		d.numQueues = 1
	}
	if d.numQueues < 1 || d.numQueues > MaxQueues {
		return nil, fmt.Errorf("blk: %d queues, want 1..%d", cfg.NumQueues, MaxQueues)
	}
	if d.qworkers == 0 {
		d.qworkers = DefaultQueueWorkers
	}
	if d.qworkers < 1 || d.qworkers > maxQueueWorkers {
		return nil, fmt.Errorf("blk: %d workers per queue, want 1..%d", cfg.QueueWorkers, maxQueueWorkers)
	}
	if d.queueSize == 0 {
		d.queueSize = DefaultQueueSize
	}
	if d.queueSize < minQueueSizeForSegMax || d.queueSize > 32768 || d.queueSize&(d.queueSize-1) != 0 {
		return nil, fmt.Errorf("blk: queue size %d, want a power of two in %d..32768", cfg.QueueSize, minQueueSizeForSegMax)
	}
	if len(cfg.Serial) > IDBytes {
		return nil, fmt.Errorf("blk: serial %q longer than %d bytes", cfg.Serial, IDBytes)
	}
	copy(d.id[:], cfg.Serial)
	if d.log == nil {
		d.log = hclog.NewNullLogger()
	}

	orDefault := func(v, def uint32) uint32 {
		if v == 0 {
			return def
		}
		return v
	}
	d.limits = limits{
		// A request is header + data segments + status; the driver must
		// leave room for the other two descriptors. The back-end takes
		// chains this long on smaller rings (Info's MaxChain).
		segMax:                uint32(min(d.queueSize, maxSegChain) - 2),
		sizeMax:               defaultSizeMax,
		maxDiscardSectors:     orDefault(cfg.MaxDiscardSectors, DefaultMaxSectors),
		maxDiscardSeg:         orDefault(cfg.MaxDiscardSegments, DefaultMaxSegments),
		discardAlign:          orDefault(cfg.DiscardAlignment, DefaultDiscardAlign),
		maxWriteZeroesSectors: orDefault(cfg.MaxWriteZeroesSectors, DefaultMaxSectors),
		maxWriteZeroesSeg:     orDefault(cfg.MaxWriteZeroesSegments, DefaultMaxSegments),
	}
	if d.limits.maxDiscardSeg > maxSegmentsLimit || d.limits.maxWriteZeroesSeg > maxSegmentsLimit {
		return nil, fmt.Errorf("blk: discard/write-zeroes segment limit above %d", maxSegmentsLimit)
	}
	if tail := size % SectorSize; tail != 0 {
		// QEMU rounds such a disk up and reads the tail as zeros; here
		// the guest sees whole sectors only (docs/IMAGES.md).
		d.log.Warn("disk size is not a multiple of 512 bytes: its last partial sector is not served",
			"size", size, "served", size-tail, "unserved", tail)
	}
	return d, nil
}

// Features is the set of virtio-blk feature bits the device offers
// (transport bits such as VIRTIO_F_VERSION_1 are the back-end framework's).
func (d *Device) Features() uint64 {
	f := uint64(1)<<FeatureSizeMax | 1<<FeatureSegMax | 1<<FeatureBlkSize |
		1<<FeatureFlush | 1<<FeatureMQ
	if d.readOnly {
		f |= 1 << FeatureRO
	} else {
		f |= 1<<FeatureDiscard | 1<<FeatureWriteZeroes
	}
	return f
}

// Capacity is the disk size in 512-byte sectors.
func (d *Device) Capacity() uint64 { return d.capacity }

// NumQueues is the number of request queues.
func (d *Device) NumQueues() int { return d.numQueues }

// config fills the whole config space.
func (d *Device) config() [ConfigSize]byte {
	var c [ConfigSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[cfgCapacity:], d.capacity)
	le.PutUint32(c[cfgSizeMax:], d.limits.sizeMax)
	le.PutUint32(c[cfgSegMax:], d.limits.segMax)
	le.PutUint32(c[cfgBlkSize:], SectorSize)
	le.PutUint16(c[cfgNumQueues:], uint16(d.numQueues))
	if !d.readOnly {
		le.PutUint32(c[cfgMaxDiscardSect:], d.limits.maxDiscardSectors)
		le.PutUint32(c[cfgMaxDiscardSeg:], d.limits.maxDiscardSeg)
		le.PutUint32(c[cfgDiscardAlign:], d.limits.discardAlign)
		le.PutUint32(c[cfgMaxWriteZeroSect:], d.limits.maxWriteZeroesSectors)
		le.PutUint32(c[cfgMaxWriteZeroSeg:], d.limits.maxWriteZeroesSeg)
		c[cfgWriteZeroUnmap] = 1
	}
	return c
}

// ReadConfig copies config space bytes [offset, offset+len(p)) into p. Bytes
// past the fields this device defines read as zero (a front-end built
// against newer headers asks for the secure-erase and zoned fields too).
func (d *Device) ReadConfig(offset uint32, p []byte) error {
	if uint64(offset)+uint64(len(p)) > maxConfigRead {
		return fmt.Errorf("blk: config read [%d,+%d) beyond %d bytes", offset, len(p), maxConfigRead)
	}
	c := d.config()
	clear(p)
	if offset < ConfigSize {
		copy(p, c[offset:])
	}
	return nil
}

// WriteConfig refuses every write: the only writable field, writeback, needs
// VIRTIO_BLK_F_CONFIG_WCE, which the device does not offer.
func (d *Device) WriteConfig(offset uint32, p []byte) error {
	return fmt.Errorf("blk: config space is read-only (write of %d bytes at %d)", len(p), offset)
}

// SetFeatures records the features the driver accepted. Without
// VIRTIO_BLK_F_FLUSH every write is flushed before it completes.
func (d *Device) SetFeatures(negotiated uint64) error {
	d.negotiated.Store(negotiated)
	return nil
}

// Reset forgets the negotiated features.
func (d *Device) Reset() { d.negotiated.Store(0) }

// Handler serves the requests of one queue; get one per queue goroutine.
type Handler struct{ w *worker }

// NewHandler returns a request handler with its own scratch space.
func (d *Device) NewHandler() Handler { return Handler{d.newWorker()} }

// Handle serves one request given as the chain's device-readable and
// device-writable buffers, writes its status byte and returns the used
// length. The error, if any, says why the request was malformed (it has
// already been completed with an error status and counted). It is what a
// queue worker calls for each popped chain; tests and fuzzers call it with
// hand-made segments.
func (h Handler) Handle(readable, writable [][]byte) (uint32, error) {
	return h.w.handle(readable, writable)
}

// ioError counts a failed disk I/O (io_errors) and logs it, spaced out
// (ratelog): a guest that keeps writing to a full or failing disk must not
// flood the host's log.
func (d *Device) ioError(op string, off int64, n uint64, err error) {
	d.stats.ioErrors.Add(1)
	d.ioWarn.Warn(d.log, "disk "+op+" failed", "offset", off, "length", n, "error", err)
	d.syncState()
}

// Counters returns the device's counters by name (for a plugin's Stats RPC).
func (d *Device) Counters() map[string]uint64 { return d.Stats().Map() }

// ConfigSize is the size of the config space fields the device defines.
func (d *Device) ConfigSize() int { return ConfigSize }

// Flush makes everything written so far durable (a plugin's Shutdown).
func (d *Device) Flush() error { return d.disk.Flush() }

// Close closes the disk if the device owns it (Config.OwnsDisk). Queues must
// have stopped.
func (d *Device) Close() error {
	if !d.ownsDisk {
		return nil
	}
	return d.disk.Close()
}
