package qcow2

import (
	"errors"
	"fmt"
	"os"
)

// undoLog records what a multi-step change overwrites in an image file,
// so that a change that fails part-way can put the file back as it was:
// Resize keeps one over the header switch and the refcount repair that
// follows it.
type undoLog struct {
	size  int64 // the file's size when the log began
	saved []undoRecord
}

type undoRecord struct {
	off int64
	old []byte
}

func newUndoLog(f *os.File) (*undoLog, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	return &undoLog{size: st.Size()}, nil
}

// writeAt writes p at off in f, first saving the bytes it replaces
// (those before the log's original end of file; the rest the truncation
// of restore removes). A nil log only writes.
func (u *undoLog) writeAt(f *os.File, p []byte, off int64) error {
	if u != nil && off < u.size {
		old := make([]byte, min(int64(len(p)), u.size-off))
		if _, err := readFullAt(f, old, off); err != nil {
			return fmt.Errorf("save the bytes at %d before overwriting them: %w", off, err)
		}
		u.saved = append(u.saved, undoRecord{off, old})
	}
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

// restore puts back what the log saved, newest first, makes that durable,
// and only then cuts the file to its original size (a crash in between
// must not find the new structures cut off while the header still names
// them), durable too.
func (u *undoLog) restore(f *os.File) error {
	var errs []error
	for i := len(u.saved) - 1; i >= 0; i-- {
		r := u.saved[i]
		if _, err := f.WriteAt(r.old, r.off); err != nil {
			errs = append(errs, fmt.Errorf("restore the bytes at %d: %w", r.off, err))
		}
	}
	if err := fdatasync(f); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		// The old bytes are not all back: the file keeps what the new
		// header may still name.
		return errors.Join(errs...)
	}
	if err := f.Truncate(u.size); err != nil {
		errs = append(errs, fmt.Errorf("truncate to %d bytes: %w", u.size, err))
	}
	if err := fdatasync(f); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
