// Package stdio is the host end of the framed standard I/O of `krun-core
// run -- CMD` (guest/stdioframe): it runs inside krun-plugin-console,
// between the virtio-console port that krun-init talks to and the files
// krun-core handed over (its own stdin, stdout and stderr, and a control
// pipe for window sizes and signals, in the records devopts defines).
//
// Guest to host: STDOUT and STDERR frames are written to the files as they
// come, byte for byte; CLOSE_REQ is answered with CLOSE_ACK once every
// earlier frame is written; EXIT is noted. A frame that breaks the protocol
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
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"

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
}

// Bridge moves frames between the port and the files.
type Bridge struct {
	cfg Config
	log hclog.Logger
	w   *stdioframe.Writer

	exit     atomic.Int32 // EXIT status + 1, 0: none yet
	stdoutOK atomic.Bool
	stderrOK atomic.Bool
}

// New returns a bridge; Run starts it.
func New(cfg Config) *Bridge {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	b := &Bridge{cfg: cfg, log: log, w: stdioframe.NewWriter(cfg.Port)}
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
	if b.cfg.Control != nil {
		go b.pumpControl()
	}
	errc := make(chan error, 1)
	go func() { errc <- b.fromGuest() }()
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
		case stdioframe.Stdout:
			b.write(b.cfg.Stdout, &b.stdoutOK, "stdout", f.Payload)
		case stdioframe.Stderr:
			b.write(b.cfg.Stderr, &b.stderrOK, "stderr", f.Payload)
		case stdioframe.Exit:
			b.exit.Store(int32(f.Status()) + 1)
			b.log.Debug("the guest program exited", "status", f.Status())
		case stdioframe.CloseReq:
			// Every earlier frame is written (writes are synchronous):
			// the guest may power off now.
			if err := b.w.WriteFrame(stdioframe.CloseAck, nil); err != nil {
				b.log.Warn("answer CLOSE_REQ", "error", err)
			}
		}
	}
}

// write writes guest output to one of the files. After a write error
// (the reader went away) the stream's further output is dropped, so the
// guest is never blocked by it.
func (b *Bridge) write(w io.Writer, ok *atomic.Bool, name string, p []byte) {
	if w == nil || !ok.Load() {
		return
	}
	if _, err := w.Write(p); err != nil {
		ok.Store(false)
		b.log.Warn("writing the guest program's output failed; dropping the rest of it", "stream", name, "error", err)
	}
}

// pumpStdin turns stdin into STDIN frames, then STDIN_EOF.
func (b *Bridge) pumpStdin() {
	if b.cfg.Stdin != nil {
		buf := make([]byte, 32<<10)
		for {
			n, err := b.cfg.Stdin.Read(buf)
			if n > 0 {
				if werr := b.w.WriteData(stdioframe.Stdin, buf[:n]); werr != nil {
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

// pumpControl turns control records into frames.
func (b *Bridge) pumpControl() {
	var rec [devopts.ControlLen]byte
	var once sync.Once
	for {
		if _, err := io.ReadFull(b.cfg.Control, rec[:]); err != nil {
			return
		}
		var err error
		switch rec[0] {
		case devopts.ControlWinsize:
			err = b.w.WriteWinsize(binary.LittleEndian.Uint16(rec[2:]), binary.LittleEndian.Uint16(rec[4:]))
		case devopts.ControlSignal:
			err = b.w.WriteSignal(rec[2])
		default:
			once.Do(func() { b.log.Warn("unknown control record from the core", "type", rec[0]) })
		}
		if err != nil {
			b.log.Warn("control record", "error", err)
		}
	}
}
