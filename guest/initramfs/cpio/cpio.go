// Package cpio writes and reads "newc" (SVR4 without CRC) cpio archives,
// the format the Linux kernel unpacks as an initramfs.
package cpio

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
)

// File type bits of a cpio mode (the same as Linux's S_IF*).
const (
	TypeMask = 0o170000
	Dir      = 0o040000
	Reg      = 0o100000
	Symlink  = 0o120000
	Char     = 0o020000
	Block    = 0o060000
)

const newcMagic = "070701"

// HeaderLen is the length of a newc header: the magic plus 13 fields of
// eight hex digits.
const HeaderLen = 6 + 13*8

// Entry is one member of a newc archive.
type Entry struct {
	Name      string // path without a leading slash
	Mode      uint32 // type bits | permissions
	UID, GID  uint32
	Mtime     uint32
	RdevMajor uint32
	RdevMinor uint32
	Data      []byte // file content or symlink target
	// Src, when set for a regular file, names a host file streamed as the
	// content instead of Data.
	Src string
}

// Writer writes a "newc" (SVR4 without CRC) cpio archive, the format the
// Linux kernel unpacks as an initramfs.
type Writer struct {
	w      *bufio.Writer
	off    int64
	ino    uint32
	closed bool
}

// NewWriter returns a Writer on w (buffered; Close flushes).
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: bufio.NewWriterSize(w, 1<<16), ino: 1}
}

func (c *Writer) pad() error {
	if n := (4 - c.off%4) % 4; n > 0 {
		k, err := c.w.Write(make([]byte, n))
		c.off += int64(k)
		return err
	}
	return nil
}

func (c *Writer) write(p []byte) error {
	n, err := c.w.Write(p)
	c.off += int64(n)
	return err
}

func (c *Writer) header(name string, e *Entry, size int64, nlink uint32, ino uint32) error {
	if size < 0 || size > 0xffffffff {
		return fmt.Errorf("file of %d bytes exceeds the newc limit of 4 GiB", size)
	}
	if len(name)+1 > 0xffffffff || strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("cpio: bad member name %q", name)
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic, ino, e.Mode, e.UID, e.GID, nlink, e.Mtime, uint32(size),
		0, 0, e.RdevMajor, e.RdevMinor, uint32(len(name)+1), 0)
	if err := c.write([]byte(hdr)); err != nil {
		return err
	}
	if err := c.write(append([]byte(name), 0)); err != nil {
		return err
	}
	return c.pad()
}

// Add appends one entry. Directories must be added before their contents:
// the kernel does not create missing parents.
func (c *Writer) Add(e *Entry) error {
	if c.closed {
		return fmt.Errorf("cpio: write after close")
	}
	name := strings.TrimPrefix(e.Name, "/")
	if name == "" {
		name = "."
	}
	switch e.Mode & TypeMask {
	case Dir, Char, Block:
		if len(e.Data) != 0 {
			return fmt.Errorf("cpio %s: only regular files and symlinks carry data", name)
		}
	case Reg, Symlink:
	default:
		return fmt.Errorf("cpio %s: unsupported file type %#o", name, e.Mode&TypeMask)
	}
	nlink := uint32(1)
	if e.Mode&TypeMask == Dir {
		nlink = 2
	}
	size := int64(len(e.Data))
	var src *os.File
	if e.Src != "" {
		if e.Mode&TypeMask != Reg || len(e.Data) != 0 {
			return fmt.Errorf("cpio %s: Src is only for regular files without Data", name)
		}
		f, err := os.Open(e.Src)
		if err != nil {
			return fmt.Errorf("cpio %s: %w", name, err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return fmt.Errorf("cpio %s: %w", name, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("cpio %s: source %s is not a regular file", name, e.Src)
		}
		src, size = f, st.Size()
	}
	c.ino++
	if err := c.header(name, e, size, nlink, c.ino); err != nil {
		return fmt.Errorf("cpio %s: %w", name, err)
	}
	if src != nil {
		n, err := io.Copy(c.w, io.LimitReader(src, size))
		c.off += n
		if err == nil && n != size {
			err = fmt.Errorf("source %s shrank from %d to %d bytes while archiving", e.Src, size, n)
		}
		if err != nil {
			return fmt.Errorf("cpio %s: %w", name, err)
		}
	} else if err := c.write(e.Data); err != nil {
		return fmt.Errorf("cpio %s: %w", name, err)
	}
	return c.pad()
}

// Close writes the trailer and flushes. It does not close the underlying
// writer.
func (c *Writer) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	if err := c.header("TRAILER!!!", &Entry{}, 0, 1, 0); err != nil {
		return fmt.Errorf("cpio trailer: %w", err)
	}
	return c.w.Flush()
}

// Read parses a newc archive (used by tests to check the writer and by
// callers inspecting a built initramfs). It stops at the trailer. It is
// meant for archives this package wrote: every member is held in memory
// (at most 1 GiB each).
func Read(r io.Reader) ([]Entry, error) {
	br := bufio.NewReader(r)
	var off int64
	skip := func(n int64) error {
		k, err := io.CopyN(io.Discard, br, n)
		off += k
		return err
	}
	align := func() error { return skip((4 - off%4) % 4) }
	var out []Entry
	for {
		hdr := make([]byte, HeaderLen)
		if _, err := io.ReadFull(br, hdr); err != nil {
			return out, fmt.Errorf("cpio header at %d: %w", off, err)
		}
		off += HeaderLen
		if string(hdr[:6]) != newcMagic {
			return out, fmt.Errorf("cpio header at %d: bad magic %q", off-HeaderLen, hdr[:6])
		}
		var f [13]uint32
		for i := range f {
			var v uint32
			if _, err := fmt.Sscanf(string(hdr[6+8*i:14+8*i]), "%08x", &v); err != nil {
				return out, fmt.Errorf("cpio header at %d: field %d: %w", off-HeaderLen, i, err)
			}
			f[i] = v
		}
		namesize, filesize := f[11], f[6]
		if namesize == 0 || namesize > 4096 {
			return out, fmt.Errorf("cpio header at %d: bad name size %d", off-HeaderLen, namesize)
		}
		name := make([]byte, namesize)
		if _, err := io.ReadFull(br, name); err != nil {
			return out, fmt.Errorf("cpio name: %w", err)
		}
		off += int64(namesize)
		if err := align(); err != nil {
			return out, fmt.Errorf("cpio padding: %w", err)
		}
		n := strings.TrimRight(string(name), "\x00")
		if n == "TRAILER!!!" {
			return out, nil
		}
		const maxFile = 1 << 30
		if filesize > maxFile {
			return out, fmt.Errorf("cpio %s: file size %d too large", n, filesize)
		}
		data := make([]byte, filesize)
		if _, err := io.ReadFull(br, data); err != nil {
			return out, fmt.Errorf("cpio %s data: %w", n, err)
		}
		off += int64(filesize)
		if err := align(); err != nil {
			return out, fmt.Errorf("cpio padding: %w", err)
		}
		out = append(out, Entry{Name: n, Mode: f[1], UID: f[2], GID: f[3], Mtime: f[5],
			RdevMajor: f[9], RdevMinor: f[10], Data: data})
	}
}
