package imgtool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/imagelock"
)

// openImage opens an existing image (or declared backing/data file) for the
// plugin: read-only unless mode is imagelock.ReadWrite, never blocking on a
// FIFO (O_NONBLOCK while opening, cleared after the type check), only a
// regular file or a block device, and locked as QEMU locks an image it
// opens in that mode.
func openImage(what, path string, mode imagelock.Mode) (*os.File, error) {
	flags := unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY
	if mode == imagelock.ReadWrite {
		flags |= unix.O_RDWR
	} else {
		flags |= unix.O_RDONLY
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		if errors.Is(err, unix.EISDIR) {
			return nil, fmt.Errorf("%s %s is not a regular file or block device", what, path)
		}
		return nil, fmt.Errorf("%s: %w", what, &os.PathError{Op: "open", Path: path, Err: err})
	}
	if err := checkType(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s %s %w", what, path, err)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", what, &os.PathError{Op: "fcntl", Path: path, Err: err})
	}
	f := os.NewFile(uintptr(fd), path)
	if err := imagelock.Lock(f, what, path, mode); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func checkType(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFBLK:
		return nil
	}
	return errors.New("is not a regular file or block device")
}

// output is a file the host created for the plugin to write.
type output struct {
	path string
	f    *os.File
	dev  uint64
	ino  uint64
}

// createOutput creates path, which must not exist: img never overwrites.
func createOutput(path string) (*output, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC|unix.O_NOCTTY, 0o644)
	if err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("output %s exists; img never overwrites a file (remove it first)", path)
		}
		return nil, fmt.Errorf("output: %w", &os.PathError{Op: "create", Path: path, Err: err})
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("output: %w", &os.PathError{Op: "stat", Path: path, Err: err})
	}
	o := &output{path: path, f: os.NewFile(uintptr(fd), path), dev: st.Dev, ino: st.Ino}
	// Nobody else can have it open yet; the lock keeps a serve or QEMU
	// off the file while it is being written.
	if err := imagelock.Lock(o.f, "output", path, imagelock.ReadWrite); err != nil {
		o.remove()
		return nil, err
	}
	return o, nil
}

// remove deletes the output after a failure, if path still names the file
// this process created.
func (o *output) remove() {
	var st unix.Stat_t
	if err := unix.Lstat(o.path, &st); err == nil && st.Dev == o.dev && st.Ino == o.ino {
		_ = os.Remove(o.path)
	}
	o.f.Close()
}

// absPath returns the absolute, cleaned form of p (lexically: no symlink is
// resolved), as disk/qcow2 compares it with the names images record.
func absPath(p string) (string, error) {
	a, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return a, nil
}
