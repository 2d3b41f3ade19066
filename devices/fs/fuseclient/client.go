// Package fuseclient is a FUSE client for tests and benchmarks: it builds
// the requests a Linux virtiofs driver would send (and malformed ones on
// request) and decodes the replies. The transport is pluggable: in-process
// against a Server, or over a virtqueue driven by testguest.
package fuseclient

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// Transport carries one request to a FUSE server. req is the device-
// readable part (it may be split into several buffers); replyCap is the
// size of the device-writable part (0 for requests without a reply). It
// returns the bytes the server wrote.
type Transport interface {
	RoundTrip(req [][]byte, replyCap int) ([]byte, error)
}

// Client issues FUSE requests over a Transport. Safe for concurrent use if
// the transport is.
type Client struct {
	T        Transport
	UID, GID uint32 // the caller's credentials put in every request
	unique   atomic.Uint64
}

// New returns a client on t calling as root.
func New(t Transport) *Client { return &Client{T: t} }

// ErrBadReply is wrapped by errors about a reply that does not parse.
var ErrBadReply = errors.New("bad FUSE reply")

// DefaultReplyCap is the reply buffer size for requests whose reply is a
// fixed struct.
const DefaultReplyCap = 4096

// Raw sends a request with the given header fields and argument buffers
// (used as the device-readable descriptors as they are) and returns the
// reply payload. A negative errno in the reply comes back as a
// syscall.Errno error. Len is filled in unless hdr.Len is non-zero.
func (c *Client) Raw(hdr fuse.InHeader, args [][]byte, replyCap int) ([]byte, error) {
	if hdr.Unique == 0 {
		hdr.Unique = c.unique.Add(2)
	}
	if hdr.UID == 0 && hdr.GID == 0 {
		hdr.UID, hdr.GID = c.UID, c.GID
	}
	total := fuse.InHeaderSize
	for _, a := range args {
		total += len(a)
	}
	if hdr.Len == 0 {
		hdr.Len = uint32(total)
	}
	h := make([]byte, fuse.InHeaderSize)
	hdr.Encode(h)
	req := append([][]byte{h}, args...)
	out, err := c.T.RoundTrip(req, replyCap)
	if err != nil {
		return nil, err
	}
	if replyCap == 0 {
		return nil, nil
	}
	oh, err := fuse.DecodeOutHeader(out)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadReply, err)
	}
	if oh.Unique != hdr.Unique {
		return nil, fmt.Errorf("%w: unique %d, want %d", ErrBadReply, oh.Unique, hdr.Unique)
	}
	if int(oh.Len) != len(out) {
		return nil, fmt.Errorf("%w: header says %d bytes, %d written", ErrBadReply, oh.Len, len(out))
	}
	if oh.Error > 0 {
		return nil, fmt.Errorf("%w: positive error %d", ErrBadReply, oh.Error)
	}
	if oh.Error < 0 {
		if len(out) != fuse.OutHeaderSize {
			return nil, fmt.Errorf("%w: error reply with %d bytes of payload", ErrBadReply, len(out)-fuse.OutHeaderSize)
		}
		return nil, syscall.Errno(-oh.Error)
	}
	return out[fuse.OutHeaderSize:], nil
}

// Call sends op for node with the arguments concatenated in one buffer.
func (c *Client) Call(op fuse.Opcode, node uint64, replyCap int, args ...[]byte) ([]byte, error) {
	var buf []byte
	for _, a := range args {
		buf = append(buf, a...)
	}
	var as [][]byte
	if len(buf) > 0 {
		as = [][]byte{buf}
	}
	return c.Raw(fuse.InHeader{Opcode: op, NodeID: node}, as, replyCap)
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func u32s(v ...uint32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		fuse.PutU32(b, 4*i, x)
	}
	return b
}

func u64s(v ...uint64) []byte {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		fuse.PutU64(b, 8*i, x)
	}
	return b
}

func fixed(b []byte, n int, what string) error {
	if len(b) != n {
		return fmt.Errorf("%w: %s reply of %d bytes, want %d", ErrBadReply, what, len(b), n)
	}
	return nil
}

// Init negotiates the protocol the way Linux 6.1 does (7.37 with the
// flags virtiofs sets) and returns the server's answer.
func (c *Client) Init(flags uint64) (fuse.InitOut, error) {
	in := make([]byte, fuse.InitInSize)
	fuse.PutU32(in, 0, fuse.KernelVersion)
	fuse.PutU32(in, 4, 37)
	fuse.PutU32(in, 8, 128<<10)
	fuse.PutU32(in, 12, uint32(flags)|fuse.InitExt)
	fuse.PutU32(in, 16, uint32(flags>>32))
	out, err := c.Call(fuse.OpInit, 0, DefaultReplyCap, in)
	if err != nil {
		return fuse.InitOut{}, err
	}
	return fuse.DecodeInitOut(out)
}

// LinuxInitFlags are the INIT flags a Linux 6.1 virtiofs mount offers.
const LinuxInitFlags = fuse.InitAsyncRead | fuse.InitPosixLocks | fuse.InitAtomicOTrunc |
	fuse.InitExportSupport | fuse.InitBigWrites | fuse.InitDontMask | fuse.InitFlockLocks |
	fuse.InitAutoInvalData | fuse.InitDoReaddirplus | fuse.InitReaddirplusAuto |
	fuse.InitAsyncDIO | fuse.InitWritebackCache | fuse.InitParallelDirops |
	fuse.InitHandleKillpriv | fuse.InitPosixACL | fuse.InitAbortError | fuse.InitMaxPages |
	fuse.InitCacheSymlinks | fuse.InitExplicitInvalData | fuse.InitMapAlignment |
	fuse.InitSubmounts | fuse.InitHandleKillprivV2 | fuse.InitSetxattrExt | fuse.InitExt

func (c *Client) entry(op fuse.Opcode, node uint64, args ...[]byte) (fuse.EntryOut, error) {
	out, err := c.Call(op, node, DefaultReplyCap, args...)
	if err != nil {
		return fuse.EntryOut{}, err
	}
	if err := fixed(out, fuse.EntryOutSize, op.String()); err != nil {
		return fuse.EntryOut{}, err
	}
	return fuse.DecodeEntryOut(out)
}

// Lookup looks name up in parent. A negative entry (node id 0) is returned
// as ENOENT.
func (c *Client) Lookup(parent uint64, name string) (fuse.EntryOut, error) {
	e, err := c.entry(fuse.OpLookup, parent, cstr(name))
	if err == nil && e.NodeID == 0 {
		return e, syscall.ENOENT
	}
	return e, err
}

// Forget drops n references to node (no reply).
func (c *Client) Forget(node, n uint64) error {
	_, err := c.Call(fuse.OpForget, node, 0, u64s(n))
	return err
}

// BatchForget sends one BATCH_FORGET for the (node, count) pairs.
func (c *Client) BatchForget(pairs ...[2]uint64) error {
	args := u32s(uint32(len(pairs)), 0)
	for _, p := range pairs {
		args = append(args, u64s(p[0], p[1])...)
	}
	_, err := c.Call(fuse.OpBatchForget, 0, 0, args)
	return err
}

// Getattr returns node's attributes.
func (c *Client) Getattr(node uint64) (fuse.Attr, error) {
	out, err := c.Call(fuse.OpGetattr, node, DefaultReplyCap, u32s(0, 0), u64s(0))
	if err != nil {
		return fuse.Attr{}, err
	}
	if err := fixed(out, fuse.AttrOutSize, "GETATTR"); err != nil {
		return fuse.Attr{}, err
	}
	return fuse.DecodeAttr(out[16:])
}

// Setattr applies in to node and returns the new attributes.
func (c *Client) Setattr(node uint64, in fuse.SetattrIn) (fuse.Attr, error) {
	b := make([]byte, fuse.SetattrInSize)
	in.Encode(b)
	out, err := c.Call(fuse.OpSetattr, node, DefaultReplyCap, b)
	if err != nil {
		return fuse.Attr{}, err
	}
	if err := fixed(out, fuse.AttrOutSize, "SETATTR"); err != nil {
		return fuse.Attr{}, err
	}
	return fuse.DecodeAttr(out[16:])
}

// Mkdir creates directory name in parent.
func (c *Client) Mkdir(parent uint64, name string, mode uint32) (fuse.EntryOut, error) {
	return c.entry(fuse.OpMkdir, parent, u32s(mode, 0), cstr(name))
}

// Mknod creates a special file.
func (c *Client) Mknod(parent uint64, name string, mode, rdev uint32) (fuse.EntryOut, error) {
	return c.entry(fuse.OpMknod, parent, u32s(mode, rdev, 0, 0), cstr(name))
}

// Symlink creates name in parent pointing at target.
func (c *Client) Symlink(parent uint64, name, target string) (fuse.EntryOut, error) {
	return c.entry(fuse.OpSymlink, parent, cstr(name), cstr(target))
}

// Link makes name in parent a hard link to node.
func (c *Client) Link(node, parent uint64, name string) (fuse.EntryOut, error) {
	return c.entry(fuse.OpLink, parent, u64s(node), cstr(name))
}

// Readlink returns a symlink's target.
func (c *Client) Readlink(node uint64) (string, error) {
	out, err := c.Call(fuse.OpReadlink, node, DefaultReplyCap+64)
	return string(out), err
}

// Unlink removes a non-directory.
func (c *Client) Unlink(parent uint64, name string) error {
	_, err := c.Call(fuse.OpUnlink, parent, DefaultReplyCap, cstr(name))
	return err
}

// Rmdir removes a directory.
func (c *Client) Rmdir(parent uint64, name string) error {
	_, err := c.Call(fuse.OpRmdir, parent, DefaultReplyCap, cstr(name))
	return err
}

// Rename renames (RENAME2 when flags != 0).
func (c *Client) Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) error {
	var err error
	if flags == 0 {
		_, err = c.Call(fuse.OpRename, parent, DefaultReplyCap, u64s(newParent), cstr(name), cstr(newName))
	} else {
		_, err = c.Call(fuse.OpRename2, parent, DefaultReplyCap, u64s(newParent), u32s(flags, 0), cstr(name), cstr(newName))
	}
	return err
}

func openOut(out []byte, err error, what string) (uint64, error) {
	if err != nil {
		return 0, err
	}
	if err := fixed(out, fuse.OpenOutSize, what); err != nil {
		return 0, err
	}
	fh, _ := fuse.U64(out, 0)
	return fh, nil
}

// Open opens node with open(2) flags and returns the handle.
func (c *Client) Open(node uint64, flags uint32) (uint64, error) {
	return c.OpenWith(node, flags, 0)
}

// OpenWith is Open with fuse_open_in.open_flags (fuse.OpenKillSuidgid).
func (c *Client) OpenWith(node uint64, flags, openFlags uint32) (uint64, error) {
	out, err := c.Call(fuse.OpOpen, node, DefaultReplyCap, u32s(flags, openFlags))
	return openOut(out, err, "OPEN")
}

// Opendir opens a directory.
func (c *Client) Opendir(node uint64) (uint64, error) {
	out, err := c.Call(fuse.OpOpendir, node, DefaultReplyCap, u32s(0, 0))
	return openOut(out, err, "OPENDIR")
}

// Create creates and opens name in parent.
func (c *Client) Create(parent uint64, name string, flags, mode uint32) (fuse.EntryOut, uint64, error) {
	return c.CreateWith(parent, name, flags, mode, 0)
}

// CreateWith is Create with fuse_create_in.open_flags (fuse.OpenKillSuidgid).
func (c *Client) CreateWith(parent uint64, name string, flags, mode, openFlags uint32) (fuse.EntryOut, uint64, error) {
	out, err := c.Call(fuse.OpCreate, parent, DefaultReplyCap, u32s(flags, mode, 0, openFlags), cstr(name))
	if err != nil {
		return fuse.EntryOut{}, 0, err
	}
	if err := fixed(out, fuse.EntryOutSize+fuse.OpenOutSize, "CREATE"); err != nil {
		return fuse.EntryOut{}, 0, err
	}
	e, _ := fuse.DecodeEntryOut(out)
	fh, _ := fuse.U64(out, fuse.EntryOutSize)
	return e, fh, nil
}

func rwIn(fh, off uint64, size, flags uint32) []byte {
	b := make([]byte, fuse.ReadInSize)
	r := fuse.ReadIn{Fh: fh, Offset: off, Size: size, Flags: flags}
	r.Encode(b)
	return b
}

// Read reads up to size bytes at off.
func (c *Client) Read(node, fh, off uint64, size uint32) ([]byte, error) {
	return c.Call(fuse.OpRead, node, fuse.OutHeaderSize+int(size), rwIn(fh, off, size, 0))
}

// Write writes data at off and returns the count the server reports.
func (c *Client) Write(node, fh, off uint64, data []byte) (uint32, error) {
	return c.WriteWith(node, fh, off, data, 0)
}

// WriteWith is Write with fuse_write_in.write_flags (fuse.WriteKillSuidgid).
func (c *Client) WriteWith(node, fh, off uint64, data []byte, writeFlags uint32) (uint32, error) {
	out, err := c.Raw(fuse.InHeader{Opcode: fuse.OpWrite, NodeID: node}, [][]byte{rwIn(fh, off, uint32(len(data)), writeFlags), data}, DefaultReplyCap)
	if err != nil {
		return 0, err
	}
	if err := fixed(out, fuse.WriteOutSize, "WRITE"); err != nil {
		return 0, err
	}
	n, _ := fuse.U32(out, 0)
	return n, nil
}

// Release closes a file handle (Releasedir: dir true).
func (c *Client) Release(node, fh uint64, dir bool) error {
	op := fuse.OpRelease
	if dir {
		op = fuse.OpReleasedir
	}
	_, err := c.Call(op, node, DefaultReplyCap, u64s(fh), u32s(0, 0), u64s(0))
	return err
}

// Flush sends FLUSH for a handle.
func (c *Client) Flush(node, fh uint64) error {
	_, err := c.Call(fuse.OpFlush, node, DefaultReplyCap, u64s(fh), u32s(0, 0), u64s(0))
	return err
}

// Fsync syncs a handle (dir: FSYNCDIR).
func (c *Client) Fsync(node, fh uint64, datasync, dir bool) error {
	op := fuse.OpFsync
	if dir {
		op = fuse.OpFsyncdir
	}
	var f uint32
	if datasync {
		f = fuse.FsyncFdatasync
	}
	_, err := c.Call(op, node, DefaultReplyCap, u64s(fh), u32s(f, 0))
	return err
}

// Readdir returns one READDIR reply's entries.
func (c *Client) Readdir(node, fh, off uint64, size uint32) ([]fuse.Dirent, error) {
	out, err := c.Call(fuse.OpReaddir, node, fuse.OutHeaderSize+int(size), rwIn(fh, off, size, 0))
	if err != nil {
		return nil, err
	}
	return fuse.DecodeDirents(out)
}

// Readdirplus returns one READDIRPLUS reply's entries.
func (c *Client) Readdirplus(node, fh, off uint64, size uint32) ([]fuse.DirentPlus, error) {
	out, err := c.Call(fuse.OpReaddirplus, node, fuse.OutHeaderSize+int(size), rwIn(fh, off, size, 0))
	if err != nil {
		return nil, err
	}
	return fuse.DecodeDirentplus(out)
}

// Statfs returns the file system statistics.
func (c *Client) Statfs(node uint64) (fuse.Kstatfs, error) {
	out, err := c.Call(fuse.OpStatfs, node, DefaultReplyCap)
	if err != nil {
		return fuse.Kstatfs{}, err
	}
	if err := fixed(out, fuse.StatfsOutSize, "STATFS"); err != nil {
		return fuse.Kstatfs{}, err
	}
	return fuse.DecodeKstatfs(out)
}

// Setxattr sets an extended attribute.
func (c *Client) Setxattr(node uint64, name string, value []byte, flags uint32) error {
	_, err := c.Call(fuse.OpSetxattr, node, DefaultReplyCap, u32s(uint32(len(value)), flags), cstr(name), value)
	return err
}

// Getxattr reads an extended attribute (size 0: ask for its length, which
// is returned as a 4-byte little-endian value).
func (c *Client) Getxattr(node uint64, name string, size uint32) ([]byte, error) {
	return c.Call(fuse.OpGetxattr, node, fuse.OutHeaderSize+max(int(size), 8), u32s(size, 0), cstr(name))
}

// Listxattr lists extended attribute names.
func (c *Client) Listxattr(node uint64, size uint32) ([]byte, error) {
	return c.Call(fuse.OpListxattr, node, fuse.OutHeaderSize+max(int(size), 8), u32s(size, 0))
}

// Removexattr removes an extended attribute.
func (c *Client) Removexattr(node uint64, name string) error {
	_, err := c.Call(fuse.OpRemovexattr, node, DefaultReplyCap, cstr(name))
	return err
}

// Access checks access to node.
func (c *Client) Access(node uint64, mask uint32) error {
	_, err := c.Call(fuse.OpAccess, node, DefaultReplyCap, u32s(mask, 0))
	return err
}

// Fallocate allocates or punches a range.
func (c *Client) Fallocate(node, fh, off, length uint64, mode uint32) error {
	_, err := c.Call(fuse.OpFallocate, node, DefaultReplyCap, u64s(fh, off, length), u32s(mode, 0))
	return err
}

// Lseek seeks (SEEK_DATA/SEEK_HOLE) and returns the offset.
func (c *Client) Lseek(node, fh, off uint64, whence uint32) (uint64, error) {
	out, err := c.Call(fuse.OpLseek, node, DefaultReplyCap, u64s(fh, off), u32s(whence, 0))
	if err != nil {
		return 0, err
	}
	if err := fixed(out, fuse.LseekOutSize, "LSEEK"); err != nil {
		return 0, err
	}
	v, _ := fuse.U64(out, 0)
	return v, nil
}

// Destroy ends the session.
func (c *Client) Destroy() error {
	_, err := c.Call(fuse.OpDestroy, 0, DefaultReplyCap)
	return err
}
