package fs

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// Virtio-fs device constants (virtio 1.2, 5.11).
const (
	DeviceID   = 26 // VIRTIO_ID_FS
	TagSize    = 36 // virtio_fs_config.tag
	ConfigSize = TagSize + 4

	// HiprioQueue is the index of the high-priority queue (FORGET,
	// BATCH_FORGET and INTERRUPT); request queues follow it.
	HiprioQueue = 0

	DefaultQueueSize = 1024
	DefaultWorkers   = 8
	MaxRequestQueues = 16
)

var _ Chain = (*virtq.Chain)(nil)
var _ backend.Device = (*Device)(nil)

// Config configures a Device.
type Config struct {
	ServerConfig
	// Tag is the name the guest mounts (mount -t virtiofs TAG /mnt), 1 to
	// 36 bytes.
	Tag string
	// NumRequestQueues is how many request queues follow the hiprio queue;
	// 0 means 1 (Linux uses one).
	NumRequestQueues int
	// QueueSize is the largest queue accepted; 0 means DefaultQueueSize.
	// It also bounds max_write: (QueueSize-4) pages at most.
	QueueSize int
	// Workers is how many requests of one request queue are served at the
	// same time; 0 means DefaultWorkers, 1 serves them in order.
	Workers int
}

// Device is a virtio-fs device: a Server behind a vhost-user back-end.
type Device struct {
	srv       *Server
	tag       [TagSize]byte
	numReq    int
	queueSize int
	workers   int
	features  atomic.Uint64
}

// New checks cfg and creates the device.
func New(cfg Config) (*Device, error) {
	if len(cfg.Tag) == 0 || len(cfg.Tag) > TagSize {
		return nil, fmt.Errorf("virtio-fs: tag %q must be 1 to %d bytes", cfg.Tag, TagSize)
	}
	n := cfg.NumRequestQueues
	if n == 0 {
		n = 1
	}
	if n < 1 || n > MaxRequestQueues {
		return nil, fmt.Errorf("virtio-fs: %d request queues, want 1..%d", n, MaxRequestQueues)
	}
	qs := cfg.QueueSize
	if qs == 0 {
		qs = DefaultQueueSize
	}
	if qs < 2 || qs > virtq.MaxSize || qs&(qs-1) != 0 {
		return nil, fmt.Errorf("virtio-fs: queue size %d is not a power of two in 2..%d", qs, virtq.MaxSize)
	}
	w := cfg.Workers
	if w == 0 {
		w = DefaultWorkers
	}
	if w < 1 || w > 256 {
		return nil, fmt.Errorf("virtio-fs: %d workers, want 1..256", w)
	}
	// A request's chain holds its pages and up to fuseHeaderDescs headers,
	// and the back-end takes chains of at most qs buffers: max_write (and
	// so max_pages in the INIT reply) leaves room for them, for a guest
	// that sizes its requests by max_pages alone (Linux also clamps
	// max_pages to its ring).
	sc := cfg.ServerConfig
	if sc.MaxWrite == 0 {
		sc.MaxWrite = DefaultMaxWrite
	}
	sc.MaxWrite = min(sc.MaxWrite, uint32(max(qs-fuseHeaderDescs, 1))*4096)
	srv, err := NewServer(sc)
	if err != nil {
		return nil, err
	}
	d := &Device{srv: srv, numReq: n, queueSize: qs, workers: w}
	copy(d.tag[:], cfg.Tag)
	return d, nil
}

// Server returns the FUSE server behind the device.
func (d *Device) Server() *Server { return d.srv }

// Info describes the device to the vhost-user framework. No device feature
// is offered: VIRTIO_FS_F_NOTIFICATION is not implemented and there is no
// DAX window.
func (d *Device) Info() backend.DeviceInfo {
	return backend.DeviceInfo{
		Type:             DeviceID,
		NumQueues:        1 + d.numReq,
		MaxQueueSize:     d.queueSize,
		ProtocolFeatures: vhostuser.ProtocolConfig | vhostuser.ProtocolMQ,
	}
}

// fuseHeaderDescs is how many descriptors of a FUSE request's chain are not
// data pages (the request and reply headers and their arguments), as
// Linux's virtio_fs counts them (FUSE_HEADER_OVERHEAD).
const fuseHeaderDescs = 4

// ConfigSize is the size of the config space.
func (d *Device) ConfigSize() int { return ConfigSize }

func (d *Device) config() [ConfigSize]byte {
	var c [ConfigSize]byte
	copy(c[:], d.tag[:])
	binary.LittleEndian.PutUint32(c[TagSize:], uint32(d.numReq))
	return c
}

// ReadConfig copies config space bytes at offset into p; bytes beyond the
// fields read as zero.
func (d *Device) ReadConfig(offset uint32, p []byte) error {
	if uint64(offset)+uint64(len(p)) > 256 {
		return fmt.Errorf("virtio-fs: config read [%d,+%d) beyond 256 bytes", offset, len(p))
	}
	c := d.config()
	clear(p)
	if offset < ConfigSize {
		copy(p, c[offset:])
	}
	return nil
}

// WriteConfig refuses writes: the config space is read-only.
func (d *Device) WriteConfig(offset uint32, p []byte) error {
	return fmt.Errorf("virtio-fs: config space is read-only (write of %d bytes at %d)", len(p), offset)
}

// SetFeatures records the driver's features.
func (d *Device) SetFeatures(negotiated uint64) error {
	d.features.Store(negotiated)
	return nil
}

// Reset drops every node and handle: the guest starts over with INIT.
func (d *Device) Reset() {
	d.features.Store(0)
	d.srv.Reset()
}

// Close releases the server's file descriptors.
func (d *Device) Close() error { return d.srv.Close() }

// Counters reports the server's counters (plugin Stats RPC).
func (d *Device) Counters() map[string]uint64 {
	s := d.srv.Stats()
	nodes, handles := d.srv.counts()
	fds, evicted := d.srv.t.fdStats()
	return map[string]uint64{
		"fs.requests":        s.Requests.Load(),
		"fs.errors":          s.Errors.Load(),
		"fs.malformed":       s.Malformed.Load(),
		"fs.unsupported":     s.Unsupported.Load(),
		"fs.read_bytes":      s.ReadBytes.Load(),
		"fs.write_bytes":     s.WriteBytes.Load(),
		"fs.nodes":           uint64(nodes),
		"fs.handles":         uint64(handles),
		"fs.node_fds":        uint64(fds),
		"fs.fd_closes":       evicted,
		"fs.handle_refusals": s.HandleRefusals.Load(),
	}
}

// Queue serves the hiprio queue in order and each request queue with up to
// Workers requests at a time, through the back-end's ring engine (a lone
// request on an idle queue is served on the ring's goroutine, without a
// hand-off); completions may be out of order, which the virtio-fs driver
// allows.
func (d *Device) Queue(_ context.Context, idx int) (backend.QueueConfig, error) {
	if idx < 0 || idx > d.numReq {
		return backend.QueueConfig{}, fmt.Errorf("virtio-fs: queue %d of %d", idx, 1+d.numReq)
	}
	workers := d.workers
	if idx == HiprioQueue || workers == 1 {
		workers = 0
	}
	return backend.QueueConfig{Handler: queueHandler{d.srv}, Workers: workers}, nil
}

// queueHandler hands each request to the FUSE server.
type queueHandler struct{ srv *Server }

func (h queueHandler) Handle(req *backend.Request) {
	req.Complete(h.srv.Handle(req.Chain()))
}
