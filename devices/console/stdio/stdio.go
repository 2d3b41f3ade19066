// Package stdio is the host end of the framed standard I/O of `krun-core
// run -- CMD` (guest/stdioframe): it runs inside krun-plugin-console,
// between the virtio-console port that krun-init talks to and the files
// krun-core handed over (its own stdin, stdout and stderr, and a control
// pipe for window sizes and signals, in the records devopts defines).
//
// Guest to host: STDOUT and STDERR frames are queued and written to the
// files byte for byte by a writer of their own, which acknowledges them
// (OUTPUT_ACK), so a slow reader of the command's output stalls the
// command, not the port; CLOSE_REQ is answered with CLOSE_ACK once every
// earlier STDOUT and STDERR frame is written; EXIT is noted. A frame that breaks the protocol
// is logged once and everything after it is discarded (so the guest never
// blocks on a port nobody drains). Host to guest: stdin becomes STDIN
// frames and, at its end, STDIN_EOF; control records become WINSIZE and
// SIGNAL frames.
package stdio

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// Port is the virtio-console port: a byte stream each way, and whether a
// guest program has it open (devices/console.Device).
type Port interface {
	io.ReadWriter
}

// Config is what the bridge connects.
type Config struct {
	Port           Port
	Stdin          io.Reader // nil: the guest gets STDIN_EOF at once
	Stdout, Stderr io.Writer
	Control        io.Reader // nil: none
	Logger         hclog.Logger
	// HoldStdin: stdin is read only after a START control record (a
	// container's command waits for it; its input must not reach the
	// guest before it runs).
	HoldStdin bool
}

// Bridge moves frames between the port and the files.
type Bridge struct {
	cfg Config
	log hclog.Logger
	w   *stdioframe.Writer

	exit     atomic.Int32 // EXIT status + 1, 0: none yet
	stdoutOK atomic.Bool
	stderrOK atomic.Bool

	execMu sync.Mutex
	execs  map[uint32]*execSession // exec.go

	startOnce sync.Once
	started   chan struct{} // closed on START (HoldStdin)
	portGone  chan struct{} // closed when the port ends

	// The command's stdin goes within the guest's credit (STDIN_ACK):
	// at most StdinWindow bytes unacknowledged, so the guest never has to
	// stop reading the port for input its command does not read (a
	// SIGNAL behind it would wait). inEnded: the port is gone.
	inMu     sync.Mutex
	inCond   *sync.Cond
	inCredit int
	inEnded  bool

	// The command's output, written by writeMain within the credit it
	// gives the guest (OUTPUT_ACK). closeReq: CLOSE_REQ came, and is
	// answered once what came before it is written; outEnded: the port
	// is gone, and writeMain ends once the queue is written; overrun:
	// the guest sent more than the window, and its output is dropped.
	outMu    sync.Mutex
	outCond  *sync.Cond
	mainOut  outQueue
	closeReq bool
	outEnded bool
	overrun  bool
	outDone  chan struct{} // closed when writeMain returns
}

// New returns a bridge; Run starts it.
func New(cfg Config) *Bridge {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	b := &Bridge{cfg: cfg, log: log, w: stdioframe.NewWriter(cfg.Port), started: make(chan struct{}), portGone: make(chan struct{}),
		inCredit: stdioframe.StdinWindow}
	b.inCond = sync.NewCond(&b.inMu)
	b.outCond = sync.NewCond(&b.outMu)
	b.outDone = make(chan struct{})
	b.stdoutOK.Store(true)
	b.stderrOK.Store(true)
	return b
}

// Exit returns the status of the EXIT frame, if one came.
func (b *Bridge) Exit() (int, bool) {
	v := b.exit.Load()
	return int(v) - 1, v != 0
}

// Run serves until the port ends (its Read returns an error) or ctx is
// done. The stdin and control pumps run on their own goroutines; they end
// with their files or the port.
func (b *Bridge) Run(ctx context.Context) error {
	go b.pumpStdin()
	go b.writeMain()
	if b.cfg.Control != nil {
		go b.pumpControl()
	}
	errc := make(chan error, 1)
	go func() {
		err := b.fromGuest()
		close(b.portGone)
		b.endAllExecs()
		b.endStdin()
		// What the command wrote before the port ended is written out
		// before Run returns.
		b.outMu.Lock()
		b.outEnded = true
		b.outCond.Broadcast()
		b.outMu.Unlock()
		<-b.outDone
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return nil
	}
}

// fromGuest reads guest frames until the port ends.
func (b *Bridge) fromGuest() error {
	r := stdioframe.NewReader(b.cfg.Port, stdioframe.GuestToHost)
	for {
		f, err := r.Next()
		if err != nil {
			if errors.Is(err, stdioframe.ErrProtocol) {
				b.log.Error("the guest broke the stdio protocol; discarding the rest of its output", "error", err)
				_, err = io.Copy(io.Discard, b.cfg.Port)
				return err
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("read the stdio port: %w", err)
		}
		switch f.Type {
		case stdioframe.Stdout, stdioframe.Stderr:
			b.queueMain(f.Payload, f.Type == stdioframe.Stderr)
		case stdioframe.StdinAck:
			b.inMu.Lock()
			b.inCredit = min(b.inCredit+int(f.StdinAcked()), stdioframe.StdinWindow)
			b.inCond.Broadcast()
			b.inMu.Unlock()
		case stdioframe.Exit:
			b.exit.Store(int32(f.Status()) + 1)
			b.log.Debug("the guest program exited", "status", f.Status())
		case stdioframe.ExecStdout, stdioframe.ExecStderr, stdioframe.ExecExit, stdioframe.ExecStdinAck:
			b.fromGuestExec(f)
		case stdioframe.CloseReq:
			// Answered by writeMain once the output before it is written.
			b.outMu.Lock()
			b.closeReq = true
			b.outCond.Broadcast()
			b.outMu.Unlock()
		}
	}
}

// queueMain queues the command's output for writeMain. The guest sends at
// most OutputWindow bytes that writeMain has not acknowledged; one that
// sends more breaks the protocol, and the rest of its output is dropped
// (the port is still read: an exec, CLOSE_REQ and EXIT go on).
func (b *Bridge) queueMain(p []byte, stderr bool) {
	if len(p) == 0 {
		return
	}
	b.outMu.Lock()
	defer b.outMu.Unlock()
	if b.overrun {
		return
	}
	if b.mainOut.queued+len(p) > stdioframe.OutputWindow {
		b.overrun = true
		b.log.Error("the guest overran the output window of the stdio protocol; dropping the rest of the command's output")
		return
	}
	b.mainOut.queueOutput(p, stderr)
	b.outCond.Broadcast()
}

// writeMain writes the command's output to the files, acknowledging each
// run (OUTPUT_ACK, also for output dropped after a write error, so the
// guest never waits on a reader that went away), and answers CLOSE_REQ
// once everything before it is written. It ends when the port is gone and
// the queue is written.
func (b *Bridge) writeMain() {
	defer close(b.outDone)
	for {
		b.outMu.Lock()
		for len(b.mainOut.runs) == 0 && !b.closeReq && !b.outEnded {
			b.outCond.Wait()
		}
		if len(b.mainOut.runs) == 0 {
			closeReq, ended := b.closeReq, b.outEnded
			b.closeReq = false
			b.outMu.Unlock()
			if !closeReq {
				return // the port is gone and everything is written
			}
			if ended {
				// The port ended while its output drained: there is
				// no one to answer, and nothing went wrong.
				continue
			}
			// Every earlier frame is written: the guest may power off
			// now.
			if err := b.w.WriteFrame(stdioframe.CloseAck, nil); err != nil {
				// The port failed or ended before the bridge saw
				// its end: as for OUTPUT_ACK, nothing to report.
				b.log.Debug("answer CLOSE_REQ", "error", err)
			}
			continue
		}
		data, stderr := b.mainOut.nextRun()
		b.outMu.Unlock()
		if stderr {
			b.write(b.cfg.Stderr, &b.stderrOK, "stderr", data)
		} else {
			b.write(b.cfg.Stdout, &b.stdoutOK, "stdout", data)
		}
		b.outMu.Lock()
		b.mainOut.queued -= len(data)
		ended := b.outEnded
		b.outMu.Unlock()
		if !ended {
			if err := b.w.WriteOutputAck(uint32(len(data))); err != nil {
				b.log.Debug("acknowledge output", "error", err)
			}
		}
	}
}

// write writes guest output to one of the files. After a write error
// (the reader went away) the stream's further output is dropped, so the
// guest is never blocked by it. A broken pipe (`krun-core run -- yes |
// head -1`) is also told to the command as a pipe tells its writer, with
// SIGPIPE: dropping alone left a command that writes for ever running,
// and run with it. The signal goes on a goroutine of its own (once a
// stream), so that a guest that reads nothing cannot stall its output
// behind it.
func (b *Bridge) write(w io.Writer, ok *atomic.Bool, name string, p []byte) {
	if w == nil || !ok.Load() {
		return
	}
	if _, err := w.Write(p); err != nil {
		ok.Store(false)
		b.log.Warn("writing the guest program's output failed; dropping the rest of it", "stream", name, "error", err)
		if errors.Is(err, unix.EPIPE) {
			go func() {
				if err := b.w.WriteSignal(uint8(unix.SIGPIPE)); err != nil {
					b.log.Debug("SIGPIPE for a broken stream", "stream", name, "error", err)
				}
			}()
		}
	}
}

// endStdin ends the stdin pump's wait for credit: the port is gone.
func (b *Bridge) endStdin() {
	b.inMu.Lock()
	b.inEnded = true
	b.inCond.Broadcast()
	b.inMu.Unlock()
}

// sendStdin sends p as STDIN frames within the guest's credit, waiting for
// acknowledgements as needed; false once the port is gone.
func (b *Bridge) sendStdin(p []byte) bool {
	for len(p) > 0 {
		b.inMu.Lock()
		for b.inCredit == 0 && !b.inEnded {
			b.inCond.Wait()
		}
		n, ended := min(b.inCredit, len(p)), b.inEnded
		b.inCredit -= n
		b.inMu.Unlock()
		if ended {
			return false
		}
		if err := b.w.WriteData(stdioframe.Stdin, p[:n]); err != nil {
			return false
		}
		p = p[n:]
	}
	return true
}

// pumpStdin turns stdin into STDIN frames, within the guest's credit,
// then STDIN_EOF.
func (b *Bridge) pumpStdin() {
	if b.cfg.HoldStdin {
		select {
		case <-b.started:
		case <-b.portGone: // no START will come
			return
		}
	}
	if b.cfg.Stdin != nil {
		buf := make([]byte, 32<<10)
		for {
			n, err := b.cfg.Stdin.Read(buf)
			if n > 0 {
				if !b.sendStdin(buf[:n]) {
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					b.log.Debug("stdin ended", "error", err)
				}
				break
			}
		}
	}
	b.w.WriteFrame(stdioframe.StdinEOF, nil)
}

// maxRecord is the largest control record.
const maxRecord = devopts.ControlLen + devopts.MaxExecRequest

// pumpControl turns control records into frames. On a SOCK_SEQPACKET
// socket (what the core uses) each message is one record and may carry
// files; on a plain stream each record is ControlLen bytes.
func (b *Bridge) pumpControl() {
	next := b.streamRecords()
	if f, ok := b.cfg.Control.(*os.File); ok {
		if t, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_TYPE); err == nil && t == unix.SOCK_SEQPACKET {
			next = packetRecords(f)
		}
	}
	var once sync.Once
	for {
		rec, files, err := next()
		if err != nil {
			return
		}
		if len(rec) < devopts.ControlLen {
			closeAll(files)
			continue
		}
		if rec[0] != devopts.ControlExec && len(files) > 0 {
			closeAll(files)
			files = nil
		}
		switch rec[0] {
		case devopts.ControlWinsize:
			err = b.w.WriteWinsize(binary.LittleEndian.Uint16(rec[2:]), binary.LittleEndian.Uint16(rec[4:]))
		case devopts.ControlSignal:
			err = b.w.WriteSignal(rec[2])
		case devopts.ControlSignalAll:
			err = b.w.WriteSignalAll(rec[2])
		case devopts.ControlStart:
			err = b.w.WriteFrame(stdioframe.Start, nil)
			b.startOnce.Do(func() { close(b.started) })
		case devopts.ControlExec:
			b.controlExec(rec, files)
		case devopts.ControlExecSignal:
			if id := binary.LittleEndian.Uint32(rec[4:]); b.lookupExec(id) != nil && rec[1] >= 1 && rec[1] <= stdioframe.MaxSignal {
				err = b.w.WriteExec(stdioframe.ExecSignal, id, []byte{rec[1]})
			}
		case devopts.ControlExecWinsize:
			if len(rec) == devopts.ControlLen+4 {
				if id := binary.LittleEndian.Uint32(rec[8:]); b.lookupExec(id) != nil {
					err = b.w.WriteExec(stdioframe.ExecWinsize, id, rec[2:6])
				}
			}
		default:
			once.Do(func() { b.log.Warn("unknown control record from the core", "type", rec[0]) })
		}
		if err != nil {
			b.log.Warn("control record", "error", err)
		}
	}
}

// streamRecords reads fixed-size records from a byte stream.
func (b *Bridge) streamRecords() func() ([]byte, []*os.File, error) {
	var rec [devopts.ControlLen]byte
	return func() ([]byte, []*os.File, error) {
		_, err := io.ReadFull(b.cfg.Control, rec[:])
		return rec[:], nil, err
	}
}

// packetRecords reads one record, with its files, per message.
func packetRecords(f *os.File) func() ([]byte, []*os.File, error) {
	buf := make([]byte, maxRecord+1)
	oob := make([]byte, unix.CmsgSpace(devopts.ExecFiles*4))
	rc, err := f.SyscallConn()
	if err != nil {
		return func() ([]byte, []*os.File, error) { return nil, nil, err }
	}
	return func() ([]byte, []*os.File, error) {
		var n, oobn, flags int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			return nil, nil, err
		}
		if n == 0 && oobn == 0 {
			return nil, nil, io.EOF
		}
		var files []*os.File
		if msgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for _, m := range msgs {
				fds, _ := unix.ParseUnixRights(&m)
				for _, fd := range fds {
					files = append(files, os.NewFile(uintptr(fd), "exec"))
				}
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || len(files) > devopts.ExecFiles {
			closeAll(files)
			return []byte{}, nil, nil // dropped: the caller skips short records
		}
		return buf[:n], files, nil
	}
}
