package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/ratelog"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/virtq"
)

// Server serves one Device to one front-end at a time. Its counters
// persist across connections.
type Server struct {
	dev      Device
	info     DeviceInfo
	log      hclog.Logger
	features uint64 // offered virtio features
	protocol uint64 // offered protocol features
	stats    []counters

	// HandshakeTimeout bounds, on a listening socket, how long an accepted
	// front-end may take to claim the back-end with SET_OWNER, and
	// MessageTimeout how long it may take to finish a message it started,
	// so that one that connects and sends nothing, or half a message, or
	// asks and never reads the replies (the handshake deadline covers
	// writes), does not keep the others waiting forever. Zero means
	// DefaultHandshakeTimeout and DefaultMessageTimeout; set them before
	// Serve.
	HandshakeTimeout, MessageTimeout time.Duration

	// RingFailed, when set (before Serve), is called from the ring's
	// goroutine when a ring fails on its own (a panic in the device's
	// Handle, a broken ring), not when it is stopped: the ring then
	// serves nothing until the front-end restarts it, and whoever runs
	// the server may want to say so (pluginsdk reports the plugin
	// failed, so that krun-core restarts it); it is called before the
	// ring's error eventfd is signalled, so a front-end woken by that
	// finds the report made. It is also called, from
	// the session's goroutine and with ErrWorkerStuck, for a ring being
	// stopped whose worker has not returned within StuckWorkerTimeout.
	RingFailed func(queue int, err error)

	// StuckWorkerTimeout bounds how long a ring being stopped (the
	// front-end left, reset the device or stopped the ring) waits for a
	// request its device never completes before RingFailed is called
	// with ErrWorkerStuck: the wait goes on, and the session with it,
	// so a listening back-end takes no next front-end until whoever
	// runs the server replaces the process (pluginsdk reports the plugin
	// failed; krun-core restarts it). Zero means
	// DefaultStuckWorkerTimeout; set it before Serve.
	StuckWorkerTimeout time.Duration

	serving sync.Mutex

	// refused spaces the warnings about refused requests, one limiter per
	// request code (unknown codes share slot 0), so that a front-end that
	// repeats a refused request (a guest writing a read-only config field,
	// one SET_CONFIG per MMIO write) cannot flood the log, and a flood of
	// one kind does not hide the first refusal of another. It lives in the
	// Server, not the session: a reconnecting front-end does not reset it.
	refused [vhostuser.GetStatus + 1]ratelog.Limiter
	// The same for what a guest causes on its rings, at will by resetting
	// the device and doing it again: a ring's first malformed request, a
	// ring that failed, a ring stopped with an error.
	malformedLog, ringFailedLog, ringStopLog ratelog.Limiter
	// backendReqLog spaces the warnings about config changes a front-end
	// that does not read its back-end request channel could not take.
	backendReqLog ratelog.Limiter

	// testHook, set by tests only, runs at points of the inflight
	// tracking sequence ("added": a used element was added and linked,
	// "published": the used index was published, not yet cleared).
	testHook func(point string)
}

// DefaultStuckWorkerTimeout is Server.StuckWorkerTimeout's default: long
// enough for a slow but healthy flush on loaded storage.
const DefaultStuckWorkerTimeout = 60 * time.Second

// ErrWorkerStuck is what RingFailed gets for a ring whose worker did not
// stop within StuckWorkerTimeout.
var ErrWorkerStuck = errors.New("the queue's worker does not stop (a request that never completes, or a notification the front-end does not take)")

// Defaults for Server.HandshakeTimeout and Server.MessageTimeout.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMessageTimeout   = 10 * time.Second
)

// NewServer checks the device's DeviceInfo and prepares a Server.
func NewServer(dev Device, log hclog.Logger) (*Server, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	info := dev.Info()
	if info.Type == 0 {
		return nil, errors.New("device: type 0 is no device (virtio device IDs start at 1)")
	}
	if extra := info.Features & transportFeatures &^ FrameworkFeatures; extra != 0 {
		return nil, fmt.Errorf("device: features %#x are transport features (bits 24 to 41) the back-end framework does not implement", extra)
	}
	if info.NumQueues < 1 || info.NumQueues > vhostuser.MaxQueues {
		return nil, fmt.Errorf("device: %d queues, want 1..%d", info.NumQueues, vhostuser.MaxQueues)
	}
	if info.MaxQueueSize == 0 {
		info.MaxQueueSize = DefaultMaxQueueSize
	}
	if info.MaxQueueSize < 1 || info.MaxQueueSize > virtq.MaxSize || info.MaxQueueSize&(info.MaxQueueSize-1) != 0 {
		return nil, fmt.Errorf("device: max queue size %d is not a power of two in 1..%d", info.MaxQueueSize, virtq.MaxSize)
	}
	if info.MaxChain == 0 {
		info.MaxChain = info.MaxQueueSize
	}
	if info.MaxChain < 1 || info.MaxChain > virtq.MaxSize {
		return nil, fmt.Errorf("device: chains of at most %d buffers, want 1..%d", info.MaxChain, virtq.MaxSize)
	}
	if extra := info.ProtocolFeatures &^ DeviceProtocolFeatures; extra != 0 {
		return nil, fmt.Errorf("device: protocol features %#x are not implemented by the back-end framework", extra)
	}
	if info.Features&vhostuser.FeatureRingPacked != 0 {
		return nil, errors.New("device: packed rings are not implemented")
	}
	return &Server{
		dev:      dev,
		info:     info,
		log:      log,
		features: info.Features | FrameworkFeatures,
		protocol: FrameworkProtocolFeatures | info.ProtocolFeatures | backendReqFeature(dev),
		stats:    make([]counters, info.NumQueues),
	}, nil
}

// transportFeatures are the feature bits reserved for the queue and
// feature negotiation mechanisms (virtio 1.2, 6: bits 24 to 41), which the
// framework, not a device, implements.
const transportFeatures = uint64(1)<<42 - 1<<24

// refusedLimiter is the limiter for warnings about refused requests of
// code req.
func (s *Server) refusedLimiter(req vhostuser.Request) *ratelog.Limiter {
	if int(req) >= len(s.refused) {
		req = 0
	}
	return &s.refused[req]
}

// Features returns the virtio features offered in GET_FEATURES.
func (s *Server) Features() uint64 { return s.features }

// ProtocolFeatures returns the protocol features offered in
// GET_PROTOCOL_FEATURES.
func (s *Server) ProtocolFeatures() uint64 { return s.protocol }

// Stats returns a snapshot of every ring's counters. It is safe to call
// at any time from any goroutine.
func (s *Server) Stats() []QueueStats {
	out := make([]QueueStats, len(s.stats))
	for i := range s.stats {
		out[i] = s.stats[i].snapshot(i)
	}
	return out
}

// Serve serves dev on conn (see Server.Serve).
func Serve(ctx context.Context, conn *os.File, dev Device, log hclog.Logger) error {
	s, err := NewServer(dev, log)
	if err != nil {
		return err
	}
	return s.Serve(ctx, conn)
}

// Serve runs the back-end on f, a unix stream socket. A listening socket is
// accepted in a loop, one front-end at a time, so a front-end can reconnect;
// Serve then returns when ctx is cancelled (nil) or accepting fails. A
// connected socket is served until the front-end disconnects (nil), ctx is
// cancelled (nil) or the front-end violates the protocol (the error). After
// each connection the rings are stopped and the device reset; the Device
// itself is kept. f stays owned by the caller.
func (s *Server) Serve(ctx context.Context, f *os.File) error {
	if !s.serving.TryLock() {
		return errors.New("vhost-user back-end is already serving")
	}
	defer s.serving.Unlock()

	listening, err := isListening(f)
	if err != nil {
		return err
	}
	if !listening {
		conn, err := vhostuser.NewConn(f)
		if err != nil {
			return err
		}
		return s.serveConn(ctx, conn, false)
	}

	l, err := net.FileListener(f)
	if err != nil {
		return fmt.Errorf("vhost-user listening socket: %w", err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return fmt.Errorf("vhost-user listening socket: %T is not a unix socket", l)
	}
	defer ul.Close()
	stop := context.AfterFunc(ctx, func() { ul.Close() })
	defer stop()
	for {
		uc, err := ul.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ECONNABORTED) {
				s.log.Warn("accept vhost-user front-end", "error", err)
				continue
			}
			return fmt.Errorf("accept vhost-user front-end: %w", err)
		}
		s.log.Info("vhost-user front-end connected")
		if err := s.serveConn(ctx, vhostuser.NewUnixConn(uc), true); err != nil {
			s.log.Warn("vhost-user front-end dropped", "error", err)
		} else {
			s.log.Info("vhost-user front-end disconnected")
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

func isListening(f *os.File) (bool, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("vhost-user socket: %w", err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		v, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	}); err != nil {
		return false, fmt.Errorf("vhost-user socket: %w", err)
	}
	if serr != nil {
		return false, fmt.Errorf("vhost-user socket: getsockopt SO_ACCEPTCONN: %w", serr)
	}
	return v != 0, nil
}

// serveConn runs one session until the connection ends. A front-end
// accepted on a listening socket (accepted) must complete the handshake
// (SET_OWNER) within HandshakeTimeout and each message within
// MessageTimeout: others wait behind it.
func (s *Server) serveConn(ctx context.Context, conn *vhostuser.Conn, accepted bool) error {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	sess := newSession(ctx, s, conn)
	defer sess.close()
	handshake := accepted
	if handshake {
		// Both directions: a front-end that sends requests with replies
		// and never reads them must not hold the back-end in Send.
		deadline := time.Now().Add(orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout))
		conn.SetReadDeadline(deadline)
		conn.SetWriteDeadline(deadline)
	}
	for {
		m, err := conn.Recv()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) {
				return nil
			}
			if handshake && errors.Is(err, os.ErrDeadlineExceeded) {
				err = s.handshakeExpired(err)
			}
			s.log.Error("vhost-user receive failed, closing the connection", "error", err)
			return err
		}
		if err := sess.handle(m); err != nil {
			if handshake && errors.Is(err, os.ErrDeadlineExceeded) {
				err = s.handshakeExpired(err)
			}
			s.log.Error("closing the vhost-user connection", "error", err)
			return err
		}
		if handshake && sess.owner {
			handshake = false
			conn.SetReadDeadline(time.Time{})
			conn.SetWriteDeadline(time.Time{})
			conn.SetMessageTimeout(orDefault(s.MessageTimeout, DefaultMessageTimeout))
		}
	}
}

// handshakeExpired explains a deadline hit before SET_OWNER.
func (s *Server) handshakeExpired(err error) error {
	return fmt.Errorf("front-end did not claim the back-end (SET_OWNER) within %v: %w", orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout), err)
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// backendReqFeature is ProtocolBackendReq for a device that reports config
// changes.
func backendReqFeature(dev Device) uint64 {
	if _, ok := dev.(ConfigChanger); ok {
		return vhostuser.ProtocolBackendReq
	}
	return 0
}
