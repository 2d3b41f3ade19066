package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/virtq"
)

// DeviceTypeEntropy is the virtio device ID of an entropy source.
const DeviceTypeEntropy = 4

// maxRequest caps the bytes served per request, so that one huge guest
// buffer cannot keep the ring busy.
const maxRequest = 64 << 10

// entropy is a virtio-rng device: one request queue of device-writable
// buffers, no config space, no feature bits (virtio 1.2, section 5.4).
type entropy struct {
	src io.Reader // where the bytes come from
	log hclog.Logger

	requests, bytes, empty atomic.Uint64
}

func newEntropy(src io.Reader, log hclog.Logger) *entropy { return &entropy{src: src, log: log} }

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func (d *entropy) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: DeviceTypeEntropy, NumQueues: 1, MaxQueueSize: 256}
}

// ConfigSize: the entropy device has no config space.
func (d *entropy) ConfigSize() int { return 0 }

func (d *entropy) ReadConfig(offset uint32, p []byte) error {
	if len(p) == 0 {
		return nil
	}
	return fmt.Errorf("entropy device has no config space (read of %d bytes at %d)", len(p), offset)
}

func (d *entropy) WriteConfig(offset uint32, p []byte) error {
	return fmt.Errorf("entropy device has no config space (write of %d bytes at %d)", len(p), offset)
}

func (d *entropy) SetFeatures(uint64) error { return nil }

func (d *entropy) Reset() {}

// errNoWritable marks a request without a device-writable buffer.
var errNoWritable = errors.New("entropy request has no device-writable buffer")

// Queue serves the one queue: each request is filled on the ring's
// goroutine, in order. A read that blocks (fill=file from /dev/hwrng on a
// host short of entropy, a serial line) stalls the ring until it returns:
// fine for an entropy device, whose driver waits for the bytes anyway; a
// device whose requests must not wait for each other gives the ring
// Workers (backend.QueueConfig) or completes requests from a goroutine of
// its own, touching guest memory there only inside backend.Protect.
func (d *entropy) Queue(_ context.Context, idx int) (backend.QueueConfig, error) {
	if idx != 0 {
		return backend.QueueConfig{}, fmt.Errorf("entropy device has one queue, not %d", idx+1)
	}
	return backend.QueueConfig{Handler: d}, nil
}

// Handle serves one request.
func (d *entropy) Handle(req *backend.Request) {
	written, err := d.handle(req.Chain())
	if err != nil {
		req.Malformed(err)
	}
	req.Complete(written)
}

// handle fills the chain's writable buffers, up to maxRequest bytes.
func (d *entropy) handle(c *virtq.Chain) (uint32, error) {
	d.requests.Add(1)
	if c.WritableLen() == 0 {
		d.empty.Add(1)
		return 0, errNoWritable
	}
	var buf [4096]byte
	for c.RemainingWrite() > 0 && c.Written() < maxRequest {
		p := buf[:min(uint64(len(buf)), c.RemainingWrite(), uint64(maxRequest-c.Written()))]
		n, err := d.src.Read(p)
		if n > 0 {
			if _, err := c.Write(p[:n]); err != nil {
				return c.Written(), err
			}
		}
		if err == io.EOF || n == 0 && err == nil {
			break // a file's end: the guest gets what there was
		}
		if err != nil {
			return c.Written(), fmt.Errorf("entropy source: %w", err)
		}
	}
	written := c.Written()
	d.bytes.Add(uint64(written))
	return written, nil
}

// Counters are reported by the Stats RPC.
func (d *entropy) Counters() map[string]uint64 {
	return map[string]uint64{
		"requests": d.requests.Load(), "bytes": d.bytes.Load(), "err_no_writable": d.empty.Load(),
	}
}
