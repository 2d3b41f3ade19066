package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// maxExecs bounds the programs exec'd at once (the host has the same
// limit).
const maxExecs = 16

// execManager runs the programs the host execs into a container
// (EXEC frames), each with its own framed stdio.
type execManager struct {
	in    *initProc
	mu    sync.Mutex
	procs map[uint32]*execProc
}

// execProc is one exec'd program: its stdin waiting to be written (the
// host sends at most the window before acknowledgements) and the credit
// for its output.
type execProc struct {
	m  *execManager
	id uint32

	mu       sync.Mutex
	cond     *sync.Cond
	stdinQ   [][]byte
	queued   int
	stdinEOF bool
	credit   int // output bytes the host will take
	done     bool
	cio      commandIO // set once started
	// Signals that came before the program's exec: until then the
	// process is krun-init's launcher, which SIGQUIT would make print
	// Go's goroutine dump and others kill (the main command's rule).
	held heldSignals
}

// frame handles an exec frame from the host; it never blocks the stdio
// reader.
func (m *execManager) frame(fr stdioframe.Frame) {
	id := fr.ExecID()
	if fr.Type == stdioframe.Exec {
		m.mu.Lock()
		_, dup := m.procs[id]
		full := len(m.procs) >= maxExecs
		p := &execProc{m: m, id: id, credit: stdioframe.ExecWindow}
		p.cond = sync.NewCond(&p.mu)
		if !dup && !full {
			m.procs[id] = p
		}
		m.mu.Unlock()
		switch {
		case dup:
			// The id is a live program's: an answer would end that
			// program's session on the host. The host never reuses
			// an id; only a broken host gets here.
			m.in.log.Errorf("exec %d refused: the id is in use", id)
			return
		case full:
			// The host counts no more than this, unless it gave up
			// on a session whose program still runs here: answer, so
			// that its caller does not wait for good.
			m.in.log.Errorf("exec %d refused: %d programs exec'd at once already", id, maxExecs)
			msg := fmt.Sprintf("krun-init: exec refused: %d exec'd programs already run in this container\n", maxExecs)
			m.in.stdio.writeExec(stdioframe.ExecStderr, id, []byte(msg))
			m.in.stdio.writeExec(stdioframe.ExecExit, id, []byte{byte(initconfig.StatusInitFailed)})
			return
		}
		req := bytes.Clone(fr.ExecData())
		safeGo(m.in.log, "exec", func() { p.run(req) })
		return
	}
	m.mu.Lock()
	p := m.procs[id]
	m.mu.Unlock()
	if p == nil {
		return // ended: late frames are dropped
	}
	switch fr.Type {
	case stdioframe.ExecStdin:
		data := bytes.Clone(fr.ExecData())
		p.mu.Lock()
		if p.queued+len(data) <= stdioframe.ExecWindow {
			p.stdinQ = append(p.stdinQ, data)
			p.queued += len(data)
		} else {
			m.in.log.Errorf("exec %d: the host overran the input window; input dropped", id)
		}
		p.cond.Broadcast()
		p.mu.Unlock()
	case stdioframe.ExecStdinEOF:
		p.mu.Lock()
		p.stdinEOF = true
		p.cond.Broadcast()
		p.mu.Unlock()
	case stdioframe.ExecOutputAck:
		p.mu.Lock()
		p.credit = min(p.credit+int(fr.Ack()), stdioframe.ExecWindow)
		p.cond.Broadcast()
		p.mu.Unlock()
	case stdioframe.ExecWinsize, stdioframe.ExecSignal:
		p.mu.Lock()
		cio := p.cio
		if fr.Type == stdioframe.ExecSignal && p.held.hold(fr.ExecByte()) {
			cio = nil
		}
		p.mu.Unlock()
		if cio == nil {
			return
		}
		if fr.Type == stdioframe.ExecWinsize {
			cio.winsize(fr.ExecWinsize())
		} else {
			cio.signal(int(fr.ExecByte()))
		}
	}
}

// output returns the writer of one of the program's streams: frames
// within the host's credit.
func (p *execProc) output(t stdioframe.Type) func([]byte) {
	return func(b []byte) {
		for len(b) > 0 {
			p.mu.Lock()
			for p.credit == 0 && !p.done {
				p.cond.Wait()
			}
			if p.done {
				p.mu.Unlock()
				return
			}
			n := min(len(b), p.credit, stdioframe.MaxExecData)
			p.credit -= n
			p.mu.Unlock()
			if err := p.m.in.stdio.writeExec(t, p.id, b[:n]); err != nil {
				return
			}
			b = b[n:]
		}
	}
}

// feedStdin writes queued input to the program and acknowledges it.
func (p *execProc) feedStdin(cio commandIO) {
	for {
		p.mu.Lock()
		for len(p.stdinQ) == 0 && !p.stdinEOF && !p.done {
			p.cond.Wait()
		}
		if p.done {
			p.mu.Unlock()
			return
		}
		if len(p.stdinQ) == 0 {
			p.mu.Unlock()
			cio.stdinEOF()
			return
		}
		b := p.stdinQ[0]
		p.stdinQ = p.stdinQ[1:]
		p.queued -= len(b)
		p.mu.Unlock()
		if err := cio.stdin(b); err != nil {
			p.m.in.log.Printf("exec %d: stdin: %v", p.id, err)
		}
		p.m.in.stdio.writeExec(stdioframe.ExecStdinAck, p.id, ackBytes(len(b)))
	}
}

func ackBytes(n int) []byte {
	return []byte{byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24)}
}

// run starts the program, waits for it and reports its status.
func (p *execProc) run(req []byte) {
	in := p.m.in
	status := p.start(req)
	p.mu.Lock()
	p.done = true
	p.cond.Broadcast()
	p.mu.Unlock()
	p.m.mu.Lock()
	delete(p.m.procs, p.id)
	p.m.mu.Unlock()
	in.stdio.writeExec(stdioframe.ExecExit, p.id, []byte{byte(status)})
}

func (p *execProc) start(req []byte) int {
	in := p.m.in
	fail := func(code int, format string, a ...any) int {
		p.output(stdioframe.ExecStderr)([]byte("krun-init: " + fmt.Sprintf(format, a...) + "\n"))
		return code
	}
	dec := json.NewDecoder(bytes.NewReader(req))
	dec.DisallowUnknownFields()
	var gp container.Process
	if err := dec.Decode(&gp); err != nil {
		return fail(initconfig.StatusInitFailed, "exec request: %v", err)
	}
	if err := gp.Validate(); err != nil {
		return fail(initconfig.StatusInitFailed, "%v", err)
	}
	var cio commandIO
	var err error
	if gp.Terminal {
		var ws *initconfig.Winsize
		if gp.Rows > 0 && gp.Cols > 0 {
			ws = &initconfig.Winsize{Rows: gp.Rows, Cols: gp.Cols}
		}
		cio, err = newPtyIO(in, ws, p.output(stdioframe.ExecStdout))
	} else {
		cio, err = newPipeIO(in, p.output(stdioframe.ExecStdout), p.output(stdioframe.ExecStderr))
	}
	if err != nil {
		return fail(initconfig.StatusInitFailed, "%v", err)
	}
	extras := gp.Extras
	spec := &launchSpec{Args: gp.Args, Env: gp.Env, Rlimits: gp.Rlimits, UID: gp.UID, GID: gp.GID,
		Groups: gp.AdditionalGIDs, Root: in.rootDir, Cwd: gp.Cwd, Extras: &extras}
	res, err := in.launch(spec, cio, gp.Terminal, func() {
		p.mu.Lock()
		p.cio = cio
		p.mu.Unlock()
		safeGo(in.log, "exec stdin", func() { p.feedStdin(cio) })
	})
	if err != nil {
		return fail(initconfig.StatusInitFailed, "%v", err)
	}
	if len(res.launchMsg) > 0 {
		p.output(stdioframe.ExecStderr)([]byte("krun-init: " + string(res.launchMsg[1:]) + "\n"))
	} else {
		for _, sig := range p.execStarted() {
			cio.signal(sig)
		}
	}
	ws := <-res.exited
	cio.finish()
	return res.status(ws)
}

// execStarted is called once the program is exec'd: it returns the signals
// that came for it before (heldSignals.release), and from then on
// EXEC_SIGNAL goes to the program at once.
func (p *execProc) execStarted() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.held.release()
}
