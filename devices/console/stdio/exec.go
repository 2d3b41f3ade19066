package stdio

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// MaxExecs bounds the exec'd programs served at once.
const MaxExecs = 16

// Status bytes the bridge writes for an exec that never ran.
const (
	execStatusRefused = 125
)

// execSession is one exec'd program's host end: its stdio files, the
// guest's output waiting to be written (at most ExecWindow bytes: the
// guest sends no more before acknowledgements), and the credit for
// sending its stdin.
type execSession struct {
	b      *Bridge
	id     uint32
	stdin  *os.File
	stdout *os.File
	stderr *os.File
	status *os.File

	mu       sync.Mutex
	cond     *sync.Cond
	outQueue     // the guest's output waiting for the writer (under mu)
	exit     int // -1 until EXEC_EXIT
	credit   int // stdin bytes the guest will take
	finished bool
	aborted  bool
	closeOne sync.Once
}

// outQueue is guest output waiting for its writer: the bytes of both
// streams in the order they came (out), and the runs of one stream they
// form (runs: a length of at most runMax, runStderr for stderr). Two bytes
// a run, not a chunk a frame: a guest alternating one-byte frames of the
// two streams made each byte of the window a chunk of its own, 40 bytes of
// heap a byte (found in review). queued counts the bytes not yet written
// out (a run taken by the writer stays counted until it is).
type outQueue struct {
	out    []byte
	runs   []uint16
	queued int
}

const (
	runStderr = 1 << 15
	runMax    = runStderr - 1
)

// queueOutput appends data of one stream to the output: it extends the
// last run when it is of the same stream.
func (s *outQueue) queueOutput(data []byte, stderr bool) {
	var bit uint16
	if stderr {
		bit = runStderr
	}
	s.out = append(s.out, data...)
	s.queued += len(data)
	for len(data) > 0 {
		if n := len(s.runs); n > 0 && s.runs[n-1]&runStderr == bit && s.runs[n-1]&runMax < runMax {
			k := min(runMax-int(s.runs[n-1]&runMax), len(data))
			s.runs[n-1] += uint16(k)
			data = data[k:]
			continue
		}
		k := min(runMax, len(data))
		s.runs = append(s.runs, uint16(k)|bit)
		data = data[k:]
	}
}

// nextRun takes the first run off the output (runs not empty). The bytes
// stay valid after the lock is released: appends write past them.
func (s *outQueue) nextRun() (data []byte, stderr bool) {
	r := s.runs[0]
	n := int(r & runMax)
	data, s.out, s.runs = s.out[:n:n], s.out[n:], s.runs[1:]
	if len(s.runs) == 0 {
		s.out, s.runs = nil, nil
	}
	return data, r&runStderr != 0
}

// startExec registers an exec request from the core and forwards it to
// the guest.
func (b *Bridge) startExec(id uint32, req []byte, files []*os.File) {
	s := &execSession{b: b, id: id, stdin: files[0], stdout: files[1], stderr: files[2], status: files[3],
		exit: -1, credit: stdioframe.ExecWindow}
	s.cond = sync.NewCond(&s.mu)
	b.execMu.Lock()
	if b.execs == nil {
		b.execs = map[uint32]*execSession{}
	}
	_, dup := b.execs[id]
	full := len(b.execs) >= MaxExecs
	if !dup && !full {
		b.execs[id] = s
	}
	b.execMu.Unlock()
	switch {
	case dup:
		s.refuse("krun: exec id in use")
		return
	case full:
		s.refuse("krun: too many programs exec'd at once in this container")
		return
	}
	if err := b.w.WriteExec(stdioframe.Exec, id, req); err != nil {
		b.removeExec(id)
		s.refuse("krun: exec: " + err.Error())
		return
	}
	go s.writeOutput()
	go s.pumpStdin()
}

// refuse ends a session that never reached the guest.
func (s *execSession) refuse(msg string) {
	s.stderr.Write([]byte(msg + "\n"))
	s.status.Write([]byte{execStatusRefused})
	s.closeFiles()
}

func (s *execSession) closeFiles() {
	s.closeOne.Do(func() {
		for _, f := range []*os.File{s.stdin, s.stdout, s.stderr, s.status} {
			f.Close()
		}
	})
}

// abort ends a session at once, without a status: its output is
// dropped and its files are closed (a blocked write to a pipe or socket
// fails; a read blocked in the kernel on a blocking fd goes on until it
// returns, and what it read is dropped).
func (s *execSession) abort() {
	s.mu.Lock()
	s.finished, s.aborted = true, true
	s.out, s.runs, s.queued = nil, nil, 0
	s.cond.Broadcast()
	s.mu.Unlock()
	s.b.removeExec(s.id)
	s.closeFiles()
}

func (b *Bridge) lookupExec(id uint32) *execSession {
	b.execMu.Lock()
	defer b.execMu.Unlock()
	return b.execs[id]
}

func (b *Bridge) removeExec(id uint32) {
	b.execMu.Lock()
	delete(b.execs, id)
	b.execMu.Unlock()
}

// fromGuestExec handles an exec frame from the guest. A frame for an
// unknown id (the session ended) is dropped; one that overruns the
// window ends its session, the others go on.
func (b *Bridge) fromGuestExec(f stdioframe.Frame) {
	s := b.lookupExec(f.ExecID())
	if s == nil {
		return
	}
	switch f.Type {
	case stdioframe.ExecStdout, stdioframe.ExecStderr:
		data := f.ExecData()
		if len(data) == 0 {
			// Nothing to write; queued, it would cost memory that the
			// window (bytes) does not count (found in review).
			return
		}
		stderr := f.Type == stdioframe.ExecStderr
		s.mu.Lock()
		if s.queued+len(data) > stdioframe.ExecWindow {
			s.mu.Unlock()
			b.log.Warn("the guest overran an exec's output window; ending that exec", "exec", s.id)
			s.abort()
			return
		}
		s.queueOutput(data, stderr)
		s.cond.Broadcast()
		s.mu.Unlock()
	case stdioframe.ExecExit:
		s.end(int(f.ExecByte()))
	case stdioframe.ExecStdinAck:
		s.mu.Lock()
		s.credit = min(s.credit+int(f.Ack()), stdioframe.ExecWindow)
		s.cond.Broadcast()
		s.mu.Unlock()
	}
}

// end records the exit status (-1: none) and lets the writer finish.
func (s *execSession) end(status int) {
	s.mu.Lock()
	if s.exit < 0 {
		s.exit = status
	}
	s.finished = true
	s.cond.Broadcast()
	s.mu.Unlock()
}

// writeOutput writes the guest's output to the files, acknowledging each
// chunk, and at the end writes the status and closes everything.
func (s *execSession) writeOutput() {
	outOK, errOK := true, true
	for {
		s.mu.Lock()
		for len(s.runs) == 0 && !s.finished {
			s.cond.Wait()
		}
		if s.aborted {
			s.mu.Unlock()
			return
		}
		if len(s.runs) == 0 {
			exit := s.exit
			s.mu.Unlock()
			s.b.removeExec(s.id)
			if exit >= 0 {
				s.status.Write([]byte{byte(exit)})
			}
			// Wakes the stdin pump if it waits for credit, and its
			// read of stdin.
			s.closeFiles()
			return
		}
		data, stderr := s.nextRun()
		s.mu.Unlock()
		w, ok := s.stdout, &outOK
		if stderr {
			w, ok = s.stderr, &errOK
		}
		if *ok {
			if _, err := w.Write(data); err != nil {
				*ok = false // the reader went away: drop the rest of this stream
				if errors.Is(err, unix.EPIPE) {
					// And tell the program, as a pipe tells its writer
					// (`krun-oci exec c yes | head -1` ran for ever).
					if err := s.b.w.WriteExec(stdioframe.ExecSignal, s.id, []byte{byte(unix.SIGPIPE)}); err != nil {
						s.abort()
						return
					}
				}
			}
		}
		s.mu.Lock()
		aborted := s.aborted
		if !aborted {
			s.queued -= len(data)
		}
		s.mu.Unlock()
		if aborted {
			return
		}
		if err := s.b.w.WriteExecAck(stdioframe.ExecOutputAck, s.id, uint32(len(data))); err != nil {
			s.abort()
			return
		}
	}
}

// pumpStdin sends the exec's stdin within the guest's credit.
func (s *execSession) pumpStdin() {
	buf := make([]byte, stdioframe.MaxExecData)
	for {
		s.mu.Lock()
		for s.credit == 0 && !s.finished {
			s.cond.Wait()
		}
		n, done := min(s.credit, len(buf)), s.finished
		s.mu.Unlock()
		if done {
			return
		}
		k, err := s.stdin.Read(buf[:n])
		if k > 0 {
			s.mu.Lock()
			s.credit -= k
			done = s.finished
			s.mu.Unlock()
			if done {
				// Read after the exec ended (a blocking read a close
				// does not interrupt): nothing more goes to the guest.
				return
			}
			if werr := s.b.w.WriteExec(stdioframe.ExecStdin, s.id, buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, unix.EIO) {
				s.b.w.WriteExec(stdioframe.ExecStdinEOF, s.id, nil)
			}
			return
		}
	}
}

// endAllExecs ends every session (the port is gone): their callers see
// the status pipe close without a status.
func (b *Bridge) endAllExecs() {
	b.execMu.Lock()
	sessions := make([]*execSession, 0, len(b.execs))
	for _, s := range b.execs {
		sessions = append(sessions, s)
	}
	b.execMu.Unlock()
	for _, s := range sessions {
		s.abort()
	}
}

// controlExec handles an exec control record from the core.
func (b *Bridge) controlExec(rec []byte, files []*os.File) {
	if len(rec) < devopts.ControlLen || len(files) != devopts.ExecFiles {
		b.log.Warn("malformed exec record from the core", "len", len(rec), "files", len(files))
		closeAll(files)
		return
	}
	b.startExec(binary.LittleEndian.Uint32(rec[4:]), rec[devopts.ControlLen:], files)
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
