package main

import (
	"io"
	"os"
	"sync"
	"time"
)

// outputPipes gives run's stdout and stderr to the console plugin as files
// where they are not files already (a test's buffer): a pipe each, copied
// into the writer. The copies and krun-core's own lines (its error, the
// console's tail) write the same writer, so every writer that is not a
// file is locked with one mutex (lock), and close ends the copies before
// run returns: a copy still running then wrote into the caller's buffer
// after it was read, and an io.Copy into a bytes.Buffer (its ReadFrom)
// truncated what run itself had written since the copy started (CI run
// of stop 45: an early failure's line lost, its pipes left to the garbage
// collector).
type outputPipes struct {
	mu     sync.Mutex
	ends   []*os.File // the write ends krun-core holds
	copies sync.WaitGroup
}

// lockedWriter serializes the writes of krun-core and of the copies.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// lock returns w as run writes it: a file, or a writer lock returned
// already, as it is; anything else behind the pipes' mutex.
func (p *outputPipes) lock(w io.Writer) io.Writer {
	switch w.(type) {
	case *os.File, lockedWriter:
		return w
	}
	return lockedWriter{mu: &p.mu, w: w}
}

// fileOf returns w as a file the console plugin can inherit: a file as it
// is, anything else a pipe copied into w until close.
func (p *outputPipes) fileOf(w io.Writer) (*os.File, error) {
	if f, ok := w.(*os.File); ok {
		return f, nil
	}
	w = p.lock(w)
	r, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	p.ends = append(p.ends, pw)
	p.copies.Add(1)
	go func() {
		defer p.copies.Done()
		defer r.Close()
		// w is a lockedWriter: no ReadFrom of the writer's own runs
		// outside the lock.
		io.Copy(w, r)
	}()
	return pw, nil
}

// outputDrainLimit bounds close's wait for a copy whose pipe another
// process still holds open (a plugin that outlived the VM).
const outputDrainLimit = 5 * time.Second

// close closes krun-core's write ends and waits, up to outputDrainLimit,
// until the copies have written everything the console plugin wrote.
func (p *outputPipes) close() {
	for _, f := range p.ends {
		f.Close()
	}
	p.ends = nil
	done := make(chan struct{})
	go func() {
		p.copies.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(outputDrainLimit):
	}
}
