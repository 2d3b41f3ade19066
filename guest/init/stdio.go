package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
	"golang.org/x/sys/unix"
)

// sink receives what the host sends for the command.
type sink interface {
	stdin(p []byte) error // may block (flow control)
	stdinEOF()
	winsize(rows, cols uint16)
	signal(sig int)
}

// stdio is the framed standard I/O on the virtio-console port.
type stdio struct {
	log *logger
	f   *os.File
	w   *stdioframe.Writer

	startOnce sync.Once
	started   chan struct{} // closed when the sink is set or stdio closes
	sink      sink          // read only after started is closed

	ack     chan struct{} // closed on CLOSE_ACK
	ackOnce sync.Once
	// readDone is closed when readLoop ends (the port failed, or the
	// host broke the protocol): no CLOSE_ACK can come after it. nil in
	// tests that do not need it.
	readDone chan struct{}

	// Containers: START and the exec frames are handled whether or not
	// the command runs yet.
	startReq     chan struct{} // closed on START
	startReqOnce sync.Once
	execHandler  func(stdioframe.Frame) // set before the root is set up
	// A window size that came before the command started.
	pendingWinsize *[2]uint16
	// The signals that came before the command was exec'd, for
	// runCommand to send once it is (keptSignals). Between setSink and
	// the exec the process is krun-init's launcher, which a signal would
	// kill (or make print Go's goroutine dump). Under mu.
	held heldSignals

	// killAll sends a signal to every process but init (SIGNAL_ALL);
	// nil: kill(-1, sig).
	killAll func(sig int) error

	// The command's input: readLoop queues STDIN frames here and
	// stdinLoop writes them to the sink, acknowledging each (STDIN_ACK),
	// so that readLoop never waits on a command that does not read its
	// input; the host sends at most StdinWindow bytes unacknowledged.
	inOnce    sync.Once
	inMu      sync.Mutex
	inCond    *sync.Cond
	inQ       [][]byte
	inQueued  int
	inEOF     bool // STDIN_EOF came: after the queue, the sink's EOF
	inClosed  bool // the port is no longer read: nothing more comes
	inOverrun bool // logged once

	mu       sync.Mutex
	writeErr error // the first write failure; later output is dropped

	// The command's output goes within the host's credit: at most
	// OutputWindow bytes of STDOUT and STDERR the host has not
	// acknowledged (OUTPUT_ACK), so a slow reader on the host stalls the
	// command, as a pipe would, and not the port. outEnded: readLoop
	// ended, no acknowledgement can come. Under mu.
	outOnce    sync.Once
	outCond    *sync.Cond
	outUnacked int
	outEnded   bool
}

// findPort returns the /dev node of the virtio-console port called name,
// from /sys/class/virtio-ports/<dev>/name.
func findPort(name string) (string, error) {
	dirs, err := filepath.Glob("/sys/class/virtio-ports/*")
	if err != nil {
		return "", err
	}
	sort.Strings(dirs)
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err != nil {
			continue
		}
		if strings.TrimRight(string(b), "\n\x00") == name {
			return "/dev/" + filepath.Base(d), nil
		}
	}
	return "", os.ErrNotExist
}

// openStdio waits up to timeout for the port to appear (its name arrives
// from the host after the driver is loaded) and opens it.
func openStdio(log *logger, name string, timeout time.Duration) (*stdio, error) {
	deadline := time.Now().Add(timeout)
	var dev string
	for {
		var err error
		if dev, err = findPort(name); err == nil {
			if _, err = os.Stat(dev); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no virtio-console port named %q after %v (is the console device attached?)", name, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open stdio port %s: %w", dev, err)
	}
	s := &stdio{log: log, f: f, w: stdioframe.NewWriter(f), started: make(chan struct{}), ack: make(chan struct{}),
		startReq: make(chan struct{}), readDone: make(chan struct{})}
	safeGo(log, "stdio reader", s.readLoop)
	return s, nil
}

// portReader reads the port, riding over end-of-file: the port reads as
// EOF while no host end is connected.
type portReader struct{ f *os.File }

func (r portReader) Read(p []byte) (int, error) {
	for {
		n, err := r.f.Read(p)
		if n > 0 || (err != nil && err != io.EOF) {
			return n, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readLoop dispatches frames from the host until the port fails or the
// host breaks the protocol (then it stops reading, as the design says).
func (s *stdio) readLoop() {
	if s.readDone != nil {
		defer close(s.readDone)
	}
	safeGo(s.log, "stdin writer", s.stdinLoop)
	defer s.closeStdin()
	defer s.endOutput()
	r := stdioframe.NewReader(portReader{s.f}, stdioframe.HostToGuest)
	for {
		fr, err := r.Next()
		if err != nil {
			if errors.Is(err, stdioframe.ErrProtocol) {
				s.log.Errorf("stdio port: %v; no longer reading it", err)
			} else {
				s.log.Errorf("stdio port: read: %v", err)
			}
			return
		}
		if fr.Type == stdioframe.CloseAck {
			s.ackOnce.Do(func() { close(s.ack) })
			continue
		}
		if fr.Type == stdioframe.OutputAck {
			s.mu.Lock()
			s.outUnacked = max(s.outUnacked-int(fr.StdinAcked()), 0)
			s.out().Broadcast()
			s.mu.Unlock()
			continue
		}
		if fr.Type == stdioframe.Stdin || fr.Type == stdioframe.StdinEOF {
			// Queued whether or not the command runs yet (the host
			// holds a container's input until START).
			s.queueStdin(fr)
			continue
		}
		if fr.Type == stdioframe.Start {
			s.startReqOnce.Do(func() { close(s.startReq) })
			continue
		}
		if fr.Type.IsExec() {
			s.mu.Lock()
			h := s.execHandler
			s.mu.Unlock()
			if h != nil {
				h(fr)
			}
			continue
		}
		select {
		case <-s.started:
		default:
			// Before the command: a window size and a signal are
			// kept for it (krun-core forwards a SIGTERM that comes
			// while the guest boots: dropping it would let the
			// command run as if it had never come); a SIGNAL_ALL
			// goes to the processes there are (exec'd ones) and is
			// kept for the command too (krun-oci sends one only
			// after START, and the command may not have started
			// yet: `start` then `kill --all ID KILL` was lost).
			// Input was queued above (queueStdin) and goes to the
			// command once it has a sink.
			switch fr.Type {
			case stdioframe.Winsize, stdioframe.Signal, stdioframe.SignalAll:
				s.mu.Lock()
				select {
				case <-s.started: // setSink ran meanwhile: deliver it
					s.mu.Unlock()
				default:
					if fr.Type == stdioframe.Winsize {
						rows, cols := fr.Winsize()
						s.pendingWinsize = &[2]uint16{rows, cols}
					} else {
						s.held.hold(fr.Signal())
					}
					s.mu.Unlock()
					if fr.Type == stdioframe.SignalAll {
						s.signalAll(int(fr.Signal()))
					}
					continue
				}
			}
		}
		<-s.started
		if fr.Type == stdioframe.SignalAll {
			s.signalAll(int(fr.Signal()))
			continue
		}
		k := s.sink
		if k == nil {
			continue
		}
		switch fr.Type {
		case stdioframe.Winsize:
			k.winsize(fr.Winsize())
		case stdioframe.Signal:
			if !s.keepUntilExec(fr.Signal()) {
				k.signal(int(fr.Signal()))
			}
		}
	}
}

// in returns the condition stdinLoop waits on.
func (s *stdio) in() *sync.Cond {
	s.inOnce.Do(func() { s.inCond = sync.NewCond(&s.inMu) })
	return s.inCond
}

// queueStdin queues a STDIN frame's data (a copy: the reader reuses its
// buffer) or STDIN_EOF for stdinLoop. Data beyond the window (a host that
// ignores the acknowledgements) or after STDIN_EOF is dropped.
func (s *stdio) queueStdin(fr stdioframe.Frame) {
	c := s.in()
	s.inMu.Lock()
	defer s.inMu.Unlock()
	defer c.Broadcast()
	if fr.Type == stdioframe.StdinEOF {
		s.inEOF = true
		return
	}
	if s.inEOF || s.inQueued+len(fr.Payload) > stdioframe.StdinWindow {
		if !s.inOverrun {
			s.inOverrun = true
			s.log.Errorf("stdio port: the host sent input past its window or its end; input dropped")
		}
		return
	}
	if len(fr.Payload) == 0 {
		return
	}
	// A small piece joins the one queued before it (stdinLoop takes a
	// piece off the queue before it writes it, so a queued one is not in
	// use): the host sends what each read of its stdin returned, and a
	// window of one-byte frames cost a slice (some 32 bytes of heap), a
	// write and a STDIN_ACK a byte.
	if n := len(s.inQ); n > 0 && len(s.inQ[n-1])+len(fr.Payload) <= stdioframe.MaxPayload {
		s.inQ[n-1] = append(s.inQ[n-1], fr.Payload...)
	} else {
		s.inQ = append(s.inQ, append(make([]byte, 0, min(stdioframe.MaxPayload, max(len(fr.Payload), 4<<10))), fr.Payload...))
	}
	s.inQueued += len(fr.Payload)
}

// closeStdin tells stdinLoop that nothing more comes (readLoop ended): it
// writes out what is queued and ends, without an end of input.
func (s *stdio) closeStdin() {
	c := s.in()
	s.inMu.Lock()
	s.inClosed = true
	c.Broadcast()
	s.inMu.Unlock()
}

// stdinLoop writes the queued input to the sink once the command has one
// (setSink), acknowledging each piece once written (or dropped, without a
// sink), then the end of input.
func (s *stdio) stdinLoop() {
	<-s.started
	c := s.in()
	for {
		s.inMu.Lock()
		for len(s.inQ) == 0 && !s.inEOF && !s.inClosed {
			c.Wait()
		}
		if len(s.inQ) == 0 {
			eof := s.inEOF
			s.inMu.Unlock()
			if k := s.sink; eof && k != nil {
				k.stdinEOF()
			}
			return
		}
		p := s.inQ[0]
		s.inQ[0] = nil
		s.inQ = s.inQ[1:]
		s.inMu.Unlock()
		if k := s.sink; k != nil {
			if err := k.stdin(p); err != nil {
				s.log.Printf("stdin: %v", err)
			}
		}
		s.inMu.Lock()
		s.inQueued -= len(p)
		s.inMu.Unlock()
		// As any frame: nothing once the port cannot be written.
		s.write(stdioframe.StdinAck, binary.LittleEndian.AppendUint32(nil, uint32(len(p))))
	}
}

// signalAll sends sig to every process of the guest but krun-init: the
// command, exec'd programs and whatever they started (runc's kill --all
// signals a container's whole cgroup).
func (s *stdio) signalAll(sig int) {
	kill := s.killAll
	if kill == nil {
		kill = func(sig int) error { return unix.Kill(-1, unix.Signal(sig)) }
	}
	// ESRCH: no process but init is left.
	if err := kill(sig); err != nil && err != unix.ESRCH {
		s.log.Printf("signal %d to every process: %v", sig, err)
	}
}

// setSink starts delivering host frames to k.
func (s *stdio) setSink(k sink) {
	s.startOnce.Do(func() {
		// Under mu, as readLoop's check for a size to keep: a size
		// either is kept and applied here, or goes to k directly.
		s.mu.Lock()
		defer s.mu.Unlock()
		if ws := s.pendingWinsize; k != nil && ws != nil {
			k.winsize(ws[0], ws[1])
		}
		s.sink = k
		close(s.started)
	})
}

// keepUntilExec keeps sig for the command when it has not been exec'd yet
// (the launcher runs) and says whether it did.
func (s *stdio) keepUntilExec(sig uint8) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held.hold(sig)
}

// keptSignals is called once the command is exec'd: it returns the
// signals that came for it before (heldSignals.release), and from then on
// SIGNAL goes to the command at once.
func (s *stdio) keptSignals() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held.release()
}

// heldSignals keeps the signals that come for a program before its exec
// (the main command's, an exec'd program's): until then the process is
// krun-init's launcher. Its owner's lock guards it.
type heldSignals struct {
	mask  uint64 // bit N-1 for signal N
	execd bool   // released: signals go to the program at once
}

// hold keeps sig (1-64: the frame reader checks) unless the program was
// exec'd, and says whether it did.
func (h *heldSignals) hold(sig uint8) bool {
	if h.execd {
		return false
	}
	h.mask |= 1 << (sig - 1)
	return true
}

// release marks the program exec'd and returns the signals held for it,
// each once, lowest first (as the kernel delivers pending standard
// signals).
func (h *heldSignals) release() []int {
	m := h.mask
	h.mask, h.execd = 0, true
	var out []int
	for n := 1; n <= stdioframe.MaxSignal; n++ {
		if m&(1<<(n-1)) != 0 {
			out = append(out, n)
		}
	}
	return out
}

// startRequested is closed when the host sends START.
func (s *stdio) startRequested() <-chan struct{} { return s.startReq }

// setExecHandler routes the exec frames to h.
func (s *stdio) setExecHandler(h func(stdioframe.Frame)) {
	s.mu.Lock()
	s.execHandler = h
	s.mu.Unlock()
}

// writeExec sends an exec frame (nothing after a write failure).
func (s *stdio) writeExec(t stdioframe.Type, id uint32, p []byte) error {
	s.mu.Lock()
	failed := s.writeErr
	s.mu.Unlock()
	if failed != nil {
		return failed
	}
	return s.w.WriteExec(t, id, p)
}

func (s *stdio) write(t stdioframe.Type, p []byte) {
	s.mu.Lock()
	failed := s.writeErr != nil
	s.mu.Unlock()
	if failed {
		return
	}
	var err error
	if t == stdioframe.Stdout || t == stdioframe.Stderr {
		err = s.w.WriteData(t, p)
	} else {
		err = s.w.WriteFrame(t, p)
	}
	if err != nil {
		s.mu.Lock()
		if s.writeErr == nil {
			s.writeErr = err
			s.log.Errorf("stdio port: %v; dropping further output", err)
			s.out().Broadcast()
		}
		s.mu.Unlock()
	}
}

func (s *stdio) writeStdout(p []byte) { s.writeOutput(stdioframe.Stdout, p) }
func (s *stdio) writeStderr(p []byte) { s.writeOutput(stdioframe.Stderr, p) }

// out returns the condition writeOutput waits on (s.mu).
func (s *stdio) out() *sync.Cond {
	s.outOnce.Do(func() { s.outCond = sync.NewCond(&s.mu) })
	return s.outCond
}

// writeOutput sends the command's output within the host's credit,
// waiting for OUTPUT_ACK when it is spent. Once the port is no longer
// read, or a write failed, output is dropped.
func (s *stdio) writeOutput(t stdioframe.Type, p []byte) {
	for len(p) > 0 {
		s.mu.Lock()
		for s.outUnacked >= stdioframe.OutputWindow && !s.outEnded && s.writeErr == nil {
			s.out().Wait()
		}
		if s.outEnded || s.writeErr != nil {
			s.mu.Unlock()
			return
		}
		n := min(len(p), stdioframe.OutputWindow-s.outUnacked)
		s.outUnacked += n
		s.mu.Unlock()
		s.write(t, p[:n])
		p = p[n:]
	}
}

// endOutput ends writeOutput's waits: readLoop ended.
func (s *stdio) endOutput() {
	s.mu.Lock()
	s.outEnded = true
	s.out().Broadcast()
	s.mu.Unlock()
}

// close sends EXIT and CLOSE_REQ and waits for CLOSE_ACK, i.e. until the
// host has written out everything before it, for as long as the port
// works: it returns early when the port stops being read (readLoop ended:
// no CLOSE_ACK can come).
func (s *stdio) close(status uint8) {
	s.setSink(nil)
	s.write(stdioframe.Exit, []byte{status})
	s.write(stdioframe.CloseReq, nil)
	s.mu.Lock()
	failed := s.writeErr != nil
	s.mu.Unlock()
	if failed {
		return
	}
	select {
	case <-s.ack:
	case <-s.readDone: // nil (tests): never
		s.log.Errorf("stdio port: no longer read; no CLOSE_ACK will come")
	}
}

// safeGo runs fn on a goroutine; a panic there is logged instead of taking
// PID 1 (and with it the kernel) down.
func safeGo(log *logger, what string, fn func()) {
	go func() {
		defer func() {
			if r := recover(); r != nil {
				log.Errorf("%s: internal error: %v", what, r)
			}
		}()
		fn()
	}()
}
