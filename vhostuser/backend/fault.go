package backend

import (
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
)

// ErrPanic is wrapped by the error Protect returns for a recovered panic
// that was not a memory fault.
var ErrPanic = errors.New("panic in ring processing")

// FaultError is a memory fault (SIGBUS or SIGSEGV on guest memory, for
// example a memfd the front-end truncated) turned into an error by Protect.
type FaultError struct {
	Addr uintptr
	Err  error
}

func (e *FaultError) Error() string {
	return fmt.Sprintf("memory fault at %#x (guest memory truncated or unmapped?): %v", e.Addr, e.Err)
}

func (e *FaultError) Unwrap() error { return e.Err }

// Protect runs fn with faults on bad addresses turned into panics
// (debug.SetPanicOnFault) and recovers them as a *FaultError; any other
// panic is recovered as a *PanicError (wrapping ErrPanic), with its stack. The
// setting is per goroutine: every goroutine that touches guest memory needs
// it. The ring engine runs every ring goroutine, every worker, every
// request and every completion this way; devices use Protect for goroutines
// of their own that touch guest memory.
func Protect(fn func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = recovered(p)
		}
	}()
	return fn()
}

// PanicError is a recovered panic that was not a memory fault. Its text
// is one line, the panic's value, as errors go into Health and krun-core's
// log lines; Stack says where it happened, for the plugin's own log.
type PanicError struct {
	Value any
	Stack []byte
}

func (e *PanicError) Error() string {
	v := fmt.Sprint(e.Value)
	if i := strings.IndexAny(v, "\r\n"); i >= 0 {
		v = v[:i] + " ..."
	}
	if len(v) > 256 {
		v = v[:256] + " ..."
	}
	// Valid UTF-8 (the cut may split a character, the value may hold
	// any bytes): the text goes into a proto3 string (Health), which
	// does not marshal otherwise (found in review, helper-106).
	v = strings.ToValidUTF8(v, "?")
	return fmt.Sprintf("%v: %s", ErrPanic, v)
}

func (e *PanicError) Unwrap() error { return ErrPanic }

// recovered turns a recovered panic value into an error.
func recovered(p any) error {
	if f, ok := p.(interface{ Addr() uintptr }); ok {
		perr, _ := p.(error)
		return &FaultError{Addr: f.Addr(), Err: perr}
	}
	return &PanicError{Value: p, Stack: debug.Stack()}
}
