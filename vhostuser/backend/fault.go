package backend

import (
	"errors"
	"fmt"
	"runtime/debug"
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
// panic is recovered as an error wrapping ErrPanic, with its stack. The
// back-end runs every ring worker and every request under Protect; devices
// use it for their own goroutines that touch guest memory.
func Protect(fn func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		if f, ok := p.(interface{ Addr() uintptr }); ok {
			perr, _ := p.(error)
			err = &FaultError{Addr: f.Addr(), Err: perr}
			return
		}
		err = fmt.Errorf("%w: %v\n%s", ErrPanic, p, debug.Stack())
	}()
	return fn()
}
