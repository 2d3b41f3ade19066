package mmio

import (
	"encoding/binary"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The kick, call and error eventfds are handed to the plugin with
// SCM_RIGHTS: it holds the same open file description as the core, so
// it can clear O_NONBLOCK on it (its seccomp profile allows F_SETFL
// without O_DIRECT and O_ASYNC), read its counter, or write it up to
// its maximum. The core reads and writes those eventfds on vCPU threads
// with the device's lock held: none of that may make it wait for the
// plugin (from review).

// clearNonblock does what a compromised plugin can do to its copy of f.
func clearNonblock(t *testing.T, f *os.File) {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), false) }); err != nil || serr != nil {
		t.Fatalf("clear O_NONBLOCK: %v %v", err, serr)
	}
}

// eventfdWrite writes v to f's counter with a raw write (as the plugin
// would), without Go's poller.
func eventfdWrite(t *testing.T, f *os.File, v uint64) {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	var serr error
	rc.Control(func(fd uintptr) { _, serr = unix.Write(int(fd), b[:]) })
	if serr != nil {
		t.Fatalf("write %#x to the eventfd: %v", v, serr)
	}
}

// eventfdRead reads f's counter with a raw non-blocking read (as the
// plugin would): 0 when it was zero.
func eventfdRead(f *os.File) uint64 {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var b [8]byte
	var n int
	rc.Control(func(fd uintptr) { n, _ = unix.Preadv2(int(fd), [][]byte{b[:]}, -1, unix.RWF_NOWAIT) })
	if n != 8 {
		return 0
	}
	return binary.LittleEndian.Uint64(b[:])
}

// within runs f and reports whether it returned within d; unblock runs
// after a timeout, to let the stuck f end before the test does.
func within(t *testing.T, d time.Duration, f func(), unblock func()) bool {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		unblock()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Log("still stuck after the unblock")
		}
		return false
	}
}

// TestResetWithBlockingKickFD: a plugin that cleared O_NONBLOCK on its
// kick eventfd (and consumed its kicks, as it does) made the device's
// reset drain it with a read that blocks: the vCPU hung for good, with
// the device's lock, and so did the VM's exit (Close takes the lock).
func TestResetWithBlockingKickFD(t *testing.T) {
	for _, which := range []string{"kick", "call"} {
		t.Run(which, func(t *testing.T) {
			r := newRig(t, nil)
			st := r.negotiate(featureVersion1)
			r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
			r.wr(RegStatus, st|StatusDriverOK)
			q := r.b.queues[0]
			f := q.Kick
			if which == "call" {
				f = q.Call
			}
			clearNonblock(t, f)
			if !within(t, 2*time.Second, func() { r.wr(RegStatus, 0) }, func() { eventfdWrite(t, f, 1) }) {
				t.Fatalf("the guest's reset hung on the %s eventfd whose O_NONBLOCK the plugin cleared", which)
			}
		})
	}
}

// TestErrorWatcherWithBlockingErrFD: a plugin that cleared O_NONBLOCK on
// a ring's error eventfd, signalled it and read the signal back before
// the core's watcher did, had the watcher block in its read with the
// device's lock held: every vCPU access to the device hung until the
// plugin chose to signal again.
func TestErrorWatcherWithBlockingErrFD(t *testing.T) {
	errs := make(chan int, 8)
	r := newRig(t, func(c *Config) { c.OnQueueError = func(q int) { errs <- q } })
	st := r.negotiate(featureVersion1)
	r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
	r.wr(RegStatus, st|StatusDriverOK)
	ef := r.b.queues[0].Err
	clearNonblock(t, ef)

	// The plugin signals and takes its signal back while the watcher,
	// woken, waits for the device's lock (here held by the test so that
	// the plugin wins the race every time).
	r.d.mu.Lock()
	eventfdWrite(t, ef, 1)
	time.Sleep(100 * time.Millisecond)
	if v := eventfdRead(ef); v != 1 {
		r.d.mu.Unlock()
		t.Fatalf("read back %d", v)
	}
	r.d.mu.Unlock()
	time.Sleep(100 * time.Millisecond) // the watcher runs

	unblock := func() { // so that the test ends on the old code too
		rc, _ := ef.SyscallConn()
		rc.Control(func(fd uintptr) { unix.SetNonblock(int(fd), true) })
		eventfdWrite(t, ef, 1)
	}
	if !within(t, 2*time.Second, func() { r.rd(RegStatus) }, unblock) {
		t.Fatal("a register read hung: the error eventfd's watcher blocks in its read holding the device's lock")
	}
}

// TestManualNotifyWithSaturatedKick: a plugin that wrote its kick
// eventfd's counter up to its maximum (and never reads it) made the
// core's kick by hand (a QueueNotify that reached the core: a queue
// ready before DRIVER_OK, a value the ioeventfd does not match) wait in
// Go's poller for room in the counter, holding the device's lock, for
// good; with O_NONBLOCK cleared as well, in the kernel.
func TestManualNotifyWithSaturatedKick(t *testing.T) {
	for _, blocking := range []bool{false, true} {
		name := "nonblocking"
		if blocking {
			name = "O_NONBLOCK cleared"
		}
		t.Run(name, func(t *testing.T) {
			r := newRig(t, nil)
			st := r.negotiate(featureVersion1)
			r.setupQueue(0, 64, 0x1000, 0x2000, 0x3000)
			r.wr(RegStatus, st|StatusDriverOK)
			kick := r.b.queues[0].Kick
			if blocking {
				clearNonblock(t, kick)
			}
			eventfdWrite(t, kick, 0xfffffffffffffffe)
			notify := func() { r.wr(RegQueueNotify, 1<<16) } // queue 0, a value the ioeventfd does not match
			if !within(t, 2*time.Second, notify, func() { eventfdRead(kick) }) {
				t.Fatal("a QueueNotify that reached the core hung on the saturated kick eventfd")
			}
			if !within(t, 2*time.Second, func() { r.rd(RegStatus) }, func() { eventfdRead(kick) }) {
				t.Fatal("the device's lock stays held")
			}
		})
	}
}

// TestSignalNeverHoldsTheCaller: a signal's write that the other holder
// of the eventfd holds in the kernel (O_NONBLOCK cleared and the counter
// filled between signalEventFD's poll and its write: a window of
// microseconds no test can hit on purpose, so the write is made to block
// here) returns to the caller after signalWait, and closing the eventfd
// does not wait for the held write.
func TestSignalNeverHoldsTheCaller(t *testing.T) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(efd), "eventfd")
	release := make(chan struct{})
	held := func(fd int) error { <-release; return writeOne(fd) }
	start := time.Now()
	if err := signalWith(f, held, 50*time.Millisecond); err != errSignalHeld {
		t.Fatalf("signalWith = %v, want errSignalHeld", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the caller waited %v for a held write", d)
	}
	if !within(t, 2*time.Second, func() { f.Close() }, func() { close(release) }) {
		t.Fatal("closing the eventfd waited for the held write")
	}
	close(release)
}
