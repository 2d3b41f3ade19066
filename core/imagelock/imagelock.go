// Package imagelock takes the advisory locks QEMU takes on the disk image
// files it opens, so that krun-core, QEMU, qemu-img and
// qemu-storage-daemon see each other's use of an image: two writers of one
// qcow2 image corrupt it, and a reader of a qcow2 image someone writes reads
// metadata that changes under it.
//
// The scheme is QEMU's (block/file-posix.c, permission bits BLK_PERM_* of
// include/block/block-common.h). Each block permission P, bit i, has two
// lock bytes in the file:
//
//   - byte 100+i: "I use P";
//   - byte 200+i: "I do not let anybody else use P".
//
// Every lock is a shared (read) lock on one byte, taken as an open file
// description (OFD) lock: it belongs to the open file, travels with the fd
// into a plugin process, and is released when the last fd of that open file
// is closed. To open an image a process first takes its own locks, then
// asks the kernel (F_OFD_GETLK) whether an exclusive lock could be placed on
// byte 200+i for every P it uses (nobody refuses to share P) and on byte
// 100+i for every P it does not share (nobody uses P). Taking before testing
// means that of two processes racing for one image at least one sees the
// other. Nothing is ever waited for.
//
// The locks are advisory: a program that does not lock (or that QEMU runs
// with locking=off) is not stopped.
package imagelock

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Perm is a QEMU block permission, by bit number (BLK_PERM_*).
type Perm uint

// QEMU's block permissions. Bit 4 was BLK_PERM_GRAPH_MOD until QEMU 6.1
// and is not used here.
const (
	PermConsistentRead Perm = 0 // BLK_PERM_CONSISTENT_READ
	PermWrite          Perm = 1 // BLK_PERM_WRITE
	PermWriteUnchanged Perm = 2 // BLK_PERM_WRITE_UNCHANGED
	PermResize         Perm = 3 // BLK_PERM_RESIZE
	numPerms                = 4
)

// Lock byte offsets (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
const (
	UseBase      = 100 // + Perm: the holder uses the permission
	UnsharedBase = 200 // + Perm: the holder does not share it
)

// String is QEMU's name of the permission (bdrv_perm_names).
func (p Perm) String() string {
	switch p {
	case PermConsistentRead:
		return "consistent read"
	case PermWrite:
		return "write"
	case PermWriteUnchanged:
		return "write unchanged"
	case PermResize:
		return "resize"
	}
	return fmt.Sprintf("permission %d", uint(p))
}

// Mode is how an image is opened.
type Mode int

const (
	// ReadOnly is a read-only open that needs the image not to change
	// under it, as QEMU opens a qcow2 image or a backing file read-only
	// (qemu-img info): it uses consistent read and shares neither write
	// nor resize. Read-only opens coexist; a writer excludes them.
	ReadOnly Mode = iota
	// ReadWrite is a writer, as QEMU opens a qcow2 image read-write
	// (qemu-storage-daemon, a VM, qemu-img check -r): it uses consistent
	// read, write and resize and shares neither write nor resize.
	ReadWrite
	// ForceShare is a read-only open that shares everything, qemu-img's
	// -U/--force-share: it coexists with a writer, and may read
	// inconsistent metadata while one writes.
	ForceShare
)

// String names the mode in refusals ("refusing to open it read-write").
func (m Mode) String() string {
	switch m {
	case ReadOnly:
		return "read-only"
	case ReadWrite:
		return "read-write"
	case ForceShare:
		return "read-only even with force-share"
	}
	return fmt.Sprintf("mode %d", int(m))
}

// perms returns the permissions m uses and those it does not share, as
// bit sets.
func (m Mode) perms() (use, unshared uint, err error) {
	const (
		cr = 1 << PermConsistentRead
		w  = 1 << PermWrite
		rs = 1 << PermResize
	)
	switch m {
	case ReadOnly:
		return cr, w | rs, nil
	case ReadWrite:
		return cr | w | rs, w | rs, nil
	case ForceShare:
		return cr, 0, nil
	}
	return 0, 0, fmt.Errorf("imagelock: unknown mode %d", int(m))
}

// InUseError is a refusal: another open file holds a lock that conflicts
// with the mode asked for.
type InUseError struct {
	What string // "image", "backing file", "data file", "output"
	Path string
	Mode Mode
	// Perm is the permission whose lock conflicts; Unshared says that the
	// holder does not share it (byte 200+Perm) rather than uses it (byte
	// 100+Perm).
	Perm     Perm
	Unshared bool
	// Pid is the holder's process id where the kernel reports it, which it
	// does for classic POSIX locks only (QEMU takes OFD locks, which have
	// no owning process); 0 when unknown.
	Pid int
}

func (e *InUseError) Error() string {
	lock := e.Perm.String() + " lock"
	if e.Unshared {
		lock = "lock that does not share " + e.Perm.String()
	}
	if e.Pid > 0 {
		lock += fmt.Sprintf(", held by pid %d", e.Pid)
	}
	return fmt.Sprintf("%s %s is in use by another process (%s): refusing to open it %s", e.What, e.Path, lock, e.Mode)
}

// Lock takes mode's locks on f's open file description and checks that no
// other open file holds a conflicting one. what and path name the file in
// errors. On a conflict it returns an *InUseError and holds nothing; on
// success the locks last until every fd of the open file is closed (or
// Unlock). f must be open for reading and not yet locked by this package.
func Lock(f *os.File, what, path string, mode Mode) error {
	use, unshared, err := mode.perms()
	if err != nil {
		return err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("lock %s %s: %w", what, path, err)
	}
	var lerr error
	cerr := rc.Control(func(fd uintptr) { lerr = lockFD(int(fd), what, path, mode, use, unshared) })
	if cerr != nil {
		return fmt.Errorf("lock %s %s: %w", what, path, cerr)
	}
	return lerr
}

func lockFD(fd int, what, path string, mode Mode, use, unshared uint) (err error) {
	defer func() {
		if err != nil {
			_ = unlockFD(fd)
		}
	}()
	inUse := func(p Perm, unshared bool, pid int32) error {
		e := &InUseError{What: what, Path: path, Mode: mode, Perm: p, Unshared: unshared}
		if pid > 0 {
			e.Pid = int(pid)
		}
		return e
	}
	// Take ours first.
	for _, set := range []struct {
		base int64
		bits uint
	}{{UseBase, use}, {UnsharedBase, unshared}} {
		for p := Perm(0); p < numPerms; p++ {
			if set.bits&(1<<p) == 0 {
				continue
			}
			lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: set.base + int64(p), Len: 1}
			if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk); err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
					// An exclusive lock on the byte: a holder that
					// locks differently from QEMU; say what we can.
					holder, _ := test(fd, set.base+int64(p))
					return inUse(p, set.base == UnsharedBase, holder)
				}
				return fmt.Errorf("lock %s %s: byte %d: %w", what, path, set.base+int64(p), err)
			}
		}
	}
	// Then test for holders that conflict: somebody using what we do not
	// share, then somebody not sharing what we use.
	for p := Perm(0); p < numPerms; p++ {
		if unshared&(1<<p) == 0 {
			continue
		}
		if pid, err := test(fd, UseBase+int64(p)); err != nil {
			return fmt.Errorf("lock %s %s: test byte %d: %w", what, path, UseBase+int64(p), err)
		} else if pid != 0 {
			return inUse(p, false, pid)
		}
	}
	for p := Perm(0); p < numPerms; p++ {
		if use&(1<<p) == 0 {
			continue
		}
		if pid, err := test(fd, UnsharedBase+int64(p)); err != nil {
			return fmt.Errorf("lock %s %s: test byte %d: %w", what, path, UnsharedBase+int64(p), err)
		} else if pid != 0 {
			return inUse(p, true, pid)
		}
	}
	return nil
}

// test asks whether an exclusive lock could be placed on byte off. It
// returns 0 if so; otherwise the holder's pid as the kernel reports it
// (-1 for an OFD lock).
func test(fd int, off int64) (int32, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
		return 0, err
	}
	if lk.Type == unix.F_UNLCK {
		return 0, nil
	}
	if lk.Pid == 0 {
		return -1, nil
	}
	return lk.Pid, nil
}

// Unlock releases every lock this package takes on f's open file
// description.
func Unlock(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) { uerr = unlockFD(int(fd)) }); err != nil {
		return err
	}
	return uerr
}

func unlockFD(fd int) error {
	var errs []error
	for _, base := range []int64{UseBase, UnsharedBase} {
		lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: base, Len: numPerms}
		if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk); err != nil {
			errs = append(errs, fmt.Errorf("unlock bytes %d-%d: %w", base, base+numPerms-1, err))
		}
	}
	return errors.Join(errs...)
}
