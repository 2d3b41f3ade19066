// Package fuse holds the FUSE wire protocol as Linux's virtiofs driver speaks
// it (include/uapi/linux/fuse.h, protocol 7.x): opcodes, flags and the fixed
// layout of every message the virtio-fs server reads or writes.
//
// All multi-byte fields are little-endian. Decoders take a byte slice that
// came from the guest and never trust it: a short slice is an error, never a
// panic, and extra trailing bytes are ignored (newer kernels grow structs).
package fuse

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol version this package implements.
const (
	KernelVersion      = 7
	KernelMinorVersion = 36
)

// RootID is the node id of the file system's root.
const RootID = 1

// Opcode is a FUSE request type.
type Opcode uint32

// Opcodes.
const (
	OpLookup        Opcode = 1
	OpForget        Opcode = 2 // no reply
	OpGetattr       Opcode = 3
	OpSetattr       Opcode = 4
	OpReadlink      Opcode = 5
	OpSymlink       Opcode = 6
	OpMknod         Opcode = 8
	OpMkdir         Opcode = 9
	OpUnlink        Opcode = 10
	OpRmdir         Opcode = 11
	OpRename        Opcode = 12
	OpLink          Opcode = 13
	OpOpen          Opcode = 14
	OpRead          Opcode = 15
	OpWrite         Opcode = 16
	OpStatfs        Opcode = 17
	OpRelease       Opcode = 18
	OpFsync         Opcode = 20
	OpSetxattr      Opcode = 21
	OpGetxattr      Opcode = 22
	OpListxattr     Opcode = 23
	OpRemovexattr   Opcode = 24
	OpFlush         Opcode = 25
	OpInit          Opcode = 26
	OpOpendir       Opcode = 27
	OpReaddir       Opcode = 28
	OpReleasedir    Opcode = 29
	OpFsyncdir      Opcode = 30
	OpGetlk         Opcode = 31
	OpSetlk         Opcode = 32
	OpSetlkw        Opcode = 33
	OpAccess        Opcode = 34
	OpCreate        Opcode = 35
	OpInterrupt     Opcode = 36
	OpBmap          Opcode = 37
	OpDestroy       Opcode = 38
	OpIoctl         Opcode = 39
	OpPoll          Opcode = 40
	OpNotifyReply   Opcode = 41
	OpBatchForget   Opcode = 42 // no reply
	OpFallocate     Opcode = 43
	OpReaddirplus   Opcode = 44
	OpRename2       Opcode = 45
	OpLseek         Opcode = 46
	OpCopyFileRange Opcode = 47
	OpSetupMapping  Opcode = 48
	OpRemoveMapping Opcode = 49
	OpSyncfs        Opcode = 50
	OpTmpfile       Opcode = 51
)

var opNames = map[Opcode]string{
	OpLookup: "LOOKUP", OpForget: "FORGET", OpGetattr: "GETATTR", OpSetattr: "SETATTR",
	OpReadlink: "READLINK", OpSymlink: "SYMLINK", OpMknod: "MKNOD", OpMkdir: "MKDIR",
	OpUnlink: "UNLINK", OpRmdir: "RMDIR", OpRename: "RENAME", OpLink: "LINK", OpOpen: "OPEN",
	OpRead: "READ", OpWrite: "WRITE", OpStatfs: "STATFS", OpRelease: "RELEASE", OpFsync: "FSYNC",
	OpSetxattr: "SETXATTR", OpGetxattr: "GETXATTR", OpListxattr: "LISTXATTR",
	OpRemovexattr: "REMOVEXATTR", OpFlush: "FLUSH", OpInit: "INIT", OpOpendir: "OPENDIR",
	OpReaddir: "READDIR", OpReleasedir: "RELEASEDIR", OpFsyncdir: "FSYNCDIR", OpGetlk: "GETLK",
	OpSetlk: "SETLK", OpSetlkw: "SETLKW", OpAccess: "ACCESS", OpCreate: "CREATE",
	OpInterrupt: "INTERRUPT", OpBmap: "BMAP", OpDestroy: "DESTROY", OpIoctl: "IOCTL",
	OpPoll: "POLL", OpNotifyReply: "NOTIFY_REPLY", OpBatchForget: "BATCH_FORGET",
	OpFallocate: "FALLOCATE", OpReaddirplus: "READDIRPLUS", OpRename2: "RENAME2",
	OpLseek: "LSEEK", OpCopyFileRange: "COPY_FILE_RANGE", OpSetupMapping: "SETUPMAPPING",
	OpRemoveMapping: "REMOVEMAPPING", OpSyncfs: "SYNCFS", OpTmpfile: "TMPFILE",
}

func (o Opcode) String() string {
	if s, ok := opNames[o]; ok {
		return s
	}
	return fmt.Sprintf("OP(%d)", uint32(o))
}

// INIT flags (fuse_init_in.flags / fuse_init_out.flags; bits 32-63 travel
// in flags2 when InitExt is set).
const (
	InitAsyncRead         = 1 << 0
	InitPosixLocks        = 1 << 1
	InitFileOps           = 1 << 2
	InitAtomicOTrunc      = 1 << 3
	InitExportSupport     = 1 << 4
	InitBigWrites         = 1 << 5
	InitDontMask          = 1 << 6
	InitSpliceWrite       = 1 << 7
	InitSpliceMove        = 1 << 8
	InitSpliceRead        = 1 << 9
	InitFlockLocks        = 1 << 10
	InitHasIoctlDir       = 1 << 11
	InitAutoInvalData     = 1 << 12
	InitDoReaddirplus     = 1 << 13
	InitReaddirplusAuto   = 1 << 14
	InitAsyncDIO          = 1 << 15
	InitWritebackCache    = 1 << 16
	InitNoOpenSupport     = 1 << 17
	InitParallelDirops    = 1 << 18
	InitHandleKillpriv    = 1 << 19
	InitPosixACL          = 1 << 20
	InitAbortError        = 1 << 21
	InitMaxPages          = 1 << 22
	InitCacheSymlinks     = 1 << 23
	InitNoOpendirSupport  = 1 << 24
	InitExplicitInvalData = 1 << 25
	InitMapAlignment      = 1 << 26
	InitSubmounts         = 1 << 27
	InitHandleKillprivV2  = 1 << 28
	InitSetxattrExt       = 1 << 29
	InitExt               = 1 << 30
)

// SETATTR valid bits.
const (
	FattrMode        = 1 << 0
	FattrUID         = 1 << 1
	FattrGID         = 1 << 2
	FattrSize        = 1 << 3
	FattrAtime       = 1 << 4
	FattrMtime       = 1 << 5
	FattrFh          = 1 << 6
	FattrAtimeNow    = 1 << 7
	FattrMtimeNow    = 1 << 8
	FattrLockOwner   = 1 << 9
	FattrCtime       = 1 << 10
	FattrKillSuidgid = 1 << 11
)

// open_out flags.
const (
	FopenDirectIO   = 1 << 0
	FopenKeepCache  = 1 << 1
	FopenNonseekabl = 1 << 2
	FopenCacheDir   = 1 << 3
)

// Other flags.
const (
	GetattrFh        = 1 << 0 // fuse_getattr_in.getattr_flags: fh is valid
	FsyncFdatasync   = 1 << 0 // fuse_fsync_in.fsync_flags
	WriteCache       = 1 << 0 // fuse_write_in.write_flags: delayed write from the page cache (the handle is guessed)
	WriteKillSuidgid = 1 << 2 // fuse_write_in.write_flags: clear suid/sgid (7.33, HANDLE_KILLPRIV_V2)
	OpenKillSuidgid  = 1 << 0 // fuse_open_in/fuse_create_in.open_flags: clear suid/sgid on O_TRUNC (7.33)
)

// Fixed struct sizes.
const (
	InHeaderSize       = 40
	OutHeaderSize      = 16
	AttrSize           = 88
	EntryOutSize       = 40 + AttrSize // 128
	AttrOutSize        = 16 + AttrSize // 104
	InitInMinSize      = 16            // major, minor, max_readahead, flags
	InitInSize         = 64
	InitOutSize        = 64
	InitOutCompat22    = 24 // reply size for kernels older than 7.23
	ForgetInSize       = 8
	ForgetOneSize      = 16
	BatchForgetInSize  = 8
	GetattrInSize      = 16
	SetattrInSize      = 88
	MknodInSize        = 16
	MkdirInSize        = 8
	RenameInSize       = 8
	Rename2InSize      = 16
	LinkInSize         = 8
	OpenInSize         = 8
	CreateInSize       = 16
	OpenOutSize        = 16
	ReleaseInSize      = 24
	FlushInSize        = 24
	ReadInSize         = 40
	WriteInSize        = 40
	WriteInCompatSize  = 24
	WriteOutSize       = 8
	StatfsOutSize      = 80
	FsyncInSize        = 16
	SetxattrInSize     = 8 // without FUSE_SETXATTR_EXT
	SetxattrInExtSize  = 16
	GetxattrInSize     = 8
	GetxattrOutSize    = 8
	AccessInSize       = 8
	FallocateInSize    = 32
	LseekInSize        = 24
	LseekOutSize       = 8
	InterruptInSize    = 8
	DirentHeaderSize   = 24                      // FUSE_NAME_OFFSET
	DirentplusHeadSize = EntryOutSize + 24       // FUSE_NAME_OFFSET_DIRENTPLUS (152)
	MaxNameLen         = 255                     // longest name component
	MaxXattrSize       = 65536                   // XATTR_SIZE_MAX
	MaxXattrListSize   = 65536                   // XATTR_LIST_MAX
	MaxXattrNameLen    = 255                     // XATTR_NAME_MAX
	MaxSymlinkLen      = 4096                    // PATH_MAX, target of a symlink
	MaxInPayload       = 16 + 256 + MaxXattrSize // largest non-WRITE request payload (SETXATTR)
)

// ErrShort is wrapped by every decoding error about a message that is too
// short for what its opcode needs.
var ErrShort = errors.New("fuse message too short")

// ErrNoNUL is returned when a name argument is not NUL-terminated.
var ErrNoNUL = errors.New("fuse name not NUL-terminated")

var le = binary.LittleEndian

func short(what string, need, have int) error {
	return fmt.Errorf("%w: %s needs %d bytes, got %d", ErrShort, what, need, have)
}

// InHeader is fuse_in_header.
type InHeader struct {
	Len         uint32
	Opcode      Opcode
	Unique      uint64
	NodeID      uint64
	UID, GID    uint32
	PID         uint32
	TotalExtLen uint16 // extensions after the arguments, in 8-byte units (7.38)
}

// DecodeInHeader decodes the first InHeaderSize bytes of b.
func DecodeInHeader(b []byte) (InHeader, error) {
	if len(b) < InHeaderSize {
		return InHeader{}, short("in header", InHeaderSize, len(b))
	}
	return InHeader{
		Len:         le.Uint32(b[0:]),
		Opcode:      Opcode(le.Uint32(b[4:])),
		Unique:      le.Uint64(b[8:]),
		NodeID:      le.Uint64(b[16:]),
		UID:         le.Uint32(b[24:]),
		GID:         le.Uint32(b[28:]),
		PID:         le.Uint32(b[32:]),
		TotalExtLen: le.Uint16(b[36:]),
	}, nil
}

// Encode writes h into b (at least InHeaderSize bytes). Used by test drivers.
func (h *InHeader) Encode(b []byte) {
	le.PutUint32(b[0:], h.Len)
	le.PutUint32(b[4:], uint32(h.Opcode))
	le.PutUint64(b[8:], h.Unique)
	le.PutUint64(b[16:], h.NodeID)
	le.PutUint32(b[24:], h.UID)
	le.PutUint32(b[28:], h.GID)
	le.PutUint32(b[32:], h.PID)
	le.PutUint16(b[36:], h.TotalExtLen)
	le.PutUint16(b[38:], 0)
}

// OutHeader is fuse_out_header.
type OutHeader struct {
	Len    uint32
	Error  int32 // 0 or a negative errno
	Unique uint64
}

// Encode writes h into b (at least OutHeaderSize bytes).
func (h *OutHeader) Encode(b []byte) {
	le.PutUint32(b[0:], h.Len)
	le.PutUint32(b[4:], uint32(h.Error))
	le.PutUint64(b[8:], h.Unique)
}

// DecodeOutHeader decodes a reply header (test drivers).
func DecodeOutHeader(b []byte) (OutHeader, error) {
	if len(b) < OutHeaderSize {
		return OutHeader{}, short("out header", OutHeaderSize, len(b))
	}
	return OutHeader{Len: le.Uint32(b[0:]), Error: int32(le.Uint32(b[4:])), Unique: le.Uint64(b[8:])}, nil
}

// Attr is fuse_attr.
type Attr struct {
	Ino, Size, Blocks                 uint64
	Atime, Mtime, Ctime               uint64
	Atimensec, Mtimensec, Ctimensec   uint32
	Mode, Nlink, UID, GID, Rdev, Blks uint32
	Flags                             uint32
}

// Encode writes a into b (at least AttrSize bytes).
func (a *Attr) Encode(b []byte) {
	le.PutUint64(b[0:], a.Ino)
	le.PutUint64(b[8:], a.Size)
	le.PutUint64(b[16:], a.Blocks)
	le.PutUint64(b[24:], a.Atime)
	le.PutUint64(b[32:], a.Mtime)
	le.PutUint64(b[40:], a.Ctime)
	le.PutUint32(b[48:], a.Atimensec)
	le.PutUint32(b[52:], a.Mtimensec)
	le.PutUint32(b[56:], a.Ctimensec)
	le.PutUint32(b[60:], a.Mode)
	le.PutUint32(b[64:], a.Nlink)
	le.PutUint32(b[68:], a.UID)
	le.PutUint32(b[72:], a.GID)
	le.PutUint32(b[76:], a.Rdev)
	le.PutUint32(b[80:], a.Blks)
	le.PutUint32(b[84:], a.Flags)
}

// DecodeAttr decodes fuse_attr (test drivers).
func DecodeAttr(b []byte) (Attr, error) {
	if len(b) < AttrSize {
		return Attr{}, short("attr", AttrSize, len(b))
	}
	return Attr{
		Ino: le.Uint64(b[0:]), Size: le.Uint64(b[8:]), Blocks: le.Uint64(b[16:]),
		Atime: le.Uint64(b[24:]), Mtime: le.Uint64(b[32:]), Ctime: le.Uint64(b[40:]),
		Atimensec: le.Uint32(b[48:]), Mtimensec: le.Uint32(b[52:]), Ctimensec: le.Uint32(b[56:]),
		Mode: le.Uint32(b[60:]), Nlink: le.Uint32(b[64:]), UID: le.Uint32(b[68:]),
		GID: le.Uint32(b[72:]), Rdev: le.Uint32(b[76:]), Blks: le.Uint32(b[80:]), Flags: le.Uint32(b[84:]),
	}, nil
}

// EntryOut is fuse_entry_out.
type EntryOut struct {
	NodeID, Generation        uint64
	EntryValid, AttrValid     uint64
	EntryValidNs, AttrValidNs uint32
	Attr                      Attr
}

// Encode writes e into b (at least EntryOutSize bytes).
func (e *EntryOut) Encode(b []byte) {
	le.PutUint64(b[0:], e.NodeID)
	le.PutUint64(b[8:], e.Generation)
	le.PutUint64(b[16:], e.EntryValid)
	le.PutUint64(b[24:], e.AttrValid)
	le.PutUint32(b[32:], e.EntryValidNs)
	le.PutUint32(b[36:], e.AttrValidNs)
	e.Attr.Encode(b[40:])
}

// DecodeEntryOut decodes fuse_entry_out (test drivers).
func DecodeEntryOut(b []byte) (EntryOut, error) {
	if len(b) < EntryOutSize {
		return EntryOut{}, short("entry out", EntryOutSize, len(b))
	}
	a, _ := DecodeAttr(b[40:])
	return EntryOut{
		NodeID: le.Uint64(b[0:]), Generation: le.Uint64(b[8:]),
		EntryValid: le.Uint64(b[16:]), AttrValid: le.Uint64(b[24:]),
		EntryValidNs: le.Uint32(b[32:]), AttrValidNs: le.Uint32(b[36:]), Attr: a,
	}, nil
}

// AttrOut is fuse_attr_out.
type AttrOut struct {
	AttrValid   uint64
	AttrValidNs uint32
	Attr        Attr
}

// Encode writes a into b (at least AttrOutSize bytes).
func (a *AttrOut) Encode(b []byte) {
	le.PutUint64(b[0:], a.AttrValid)
	le.PutUint32(b[8:], a.AttrValidNs)
	le.PutUint32(b[12:], 0)
	a.Attr.Encode(b[16:])
}

// InitIn is fuse_init_in. Kernels before 7.36 send only the first 16 bytes.
type InitIn struct {
	Major, Minor, MaxReadahead uint32
	Flags                      uint64 // flags | flags2<<32 (flags2 only with InitExt)
}

// DecodeInitIn decodes fuse_init_in.
func DecodeInitIn(b []byte) (InitIn, error) {
	if len(b) < InitInMinSize {
		return InitIn{}, short("init in", InitInMinSize, len(b))
	}
	in := InitIn{Major: le.Uint32(b[0:]), Minor: le.Uint32(b[4:]), MaxReadahead: le.Uint32(b[8:]), Flags: uint64(le.Uint32(b[12:]))}
	if in.Flags&InitExt != 0 && len(b) >= 20 {
		in.Flags |= uint64(le.Uint32(b[16:])) << 32
	}
	return in, nil
}

// InitOut is fuse_init_out.
type InitOut struct {
	Major, Minor, MaxReadahead uint32
	Flags                      uint64 // flags | flags2<<32
	MaxBackground              uint16
	CongestionThreshold        uint16
	MaxWrite                   uint32
	TimeGran                   uint32
	MaxPages                   uint16
	MapAlignment               uint16
}

// Encode writes o into b (at least InitOutSize bytes).
func (o *InitOut) Encode(b []byte) {
	clear(b[:InitOutSize])
	le.PutUint32(b[0:], o.Major)
	le.PutUint32(b[4:], o.Minor)
	le.PutUint32(b[8:], o.MaxReadahead)
	le.PutUint32(b[12:], uint32(o.Flags))
	le.PutUint16(b[16:], o.MaxBackground)
	le.PutUint16(b[18:], o.CongestionThreshold)
	le.PutUint32(b[20:], o.MaxWrite)
	le.PutUint32(b[24:], o.TimeGran)
	le.PutUint16(b[28:], o.MaxPages)
	le.PutUint16(b[30:], o.MapAlignment)
	le.PutUint32(b[32:], uint32(o.Flags>>32))
}

// DecodeInitOut decodes fuse_init_out (test drivers).
func DecodeInitOut(b []byte) (InitOut, error) {
	if len(b) < InitOutCompat22 {
		return InitOut{}, short("init out", InitOutCompat22, len(b))
	}
	o := InitOut{
		Major: le.Uint32(b[0:]), Minor: le.Uint32(b[4:]), MaxReadahead: le.Uint32(b[8:]),
		Flags: uint64(le.Uint32(b[12:])), MaxBackground: le.Uint16(b[16:]),
		CongestionThreshold: le.Uint16(b[18:]), MaxWrite: le.Uint32(b[20:]),
	}
	if len(b) >= InitOutSize {
		o.TimeGran = le.Uint32(b[24:])
		o.MaxPages = le.Uint16(b[28:])
		o.MapAlignment = le.Uint16(b[30:])
		o.Flags |= uint64(le.Uint32(b[32:])) << 32
	}
	return o, nil
}

// SetattrIn is fuse_setattr_in.
type SetattrIn struct {
	Valid                           uint32
	Fh, Size, LockOwner             uint64
	Atime, Mtime, Ctime             uint64
	Atimensec, Mtimensec, Ctimensec uint32
	Mode, UID, GID                  uint32
}

// DecodeSetattrIn decodes fuse_setattr_in.
func DecodeSetattrIn(b []byte) (SetattrIn, error) {
	if len(b) < SetattrInSize {
		return SetattrIn{}, short("setattr in", SetattrInSize, len(b))
	}
	return SetattrIn{
		Valid: le.Uint32(b[0:]), Fh: le.Uint64(b[8:]), Size: le.Uint64(b[16:]),
		LockOwner: le.Uint64(b[24:]), Atime: le.Uint64(b[32:]), Mtime: le.Uint64(b[40:]),
		Ctime: le.Uint64(b[48:]), Atimensec: le.Uint32(b[56:]), Mtimensec: le.Uint32(b[60:]),
		Ctimensec: le.Uint32(b[64:]), Mode: le.Uint32(b[68:]), UID: le.Uint32(b[76:]), GID: le.Uint32(b[80:]),
	}, nil
}

// Encode writes s into b (at least SetattrInSize bytes). Used by test drivers.
func (s *SetattrIn) Encode(b []byte) {
	clear(b[:SetattrInSize])
	le.PutUint32(b[0:], s.Valid)
	le.PutUint64(b[8:], s.Fh)
	le.PutUint64(b[16:], s.Size)
	le.PutUint64(b[24:], s.LockOwner)
	le.PutUint64(b[32:], s.Atime)
	le.PutUint64(b[40:], s.Mtime)
	le.PutUint64(b[48:], s.Ctime)
	le.PutUint32(b[56:], s.Atimensec)
	le.PutUint32(b[60:], s.Mtimensec)
	le.PutUint32(b[64:], s.Ctimensec)
	le.PutUint32(b[68:], s.Mode)
	le.PutUint32(b[76:], s.UID)
	le.PutUint32(b[80:], s.GID)
}

// ReadIn is fuse_read_in (also the layout of the first fields of
// fuse_write_in).
type ReadIn struct {
	Fh        uint64
	Offset    uint64
	Size      uint32
	Flags     uint32 // read_flags / write_flags
	LockOwner uint64
	OpenFlags uint32
}

// DecodeReadIn decodes fuse_read_in.
func DecodeReadIn(b []byte) (ReadIn, error) {
	if len(b) < ReadInSize {
		return ReadIn{}, short("read in", ReadInSize, len(b))
	}
	return decodeRW(b), nil
}

// DecodeWriteIn decodes fuse_write_in; kernels before 7.9 sent 24 bytes.
func DecodeWriteIn(b []byte) (ReadIn, error) {
	if len(b) < WriteInCompatSize {
		return ReadIn{}, short("write in", WriteInCompatSize, len(b))
	}
	if len(b) < WriteInSize {
		return ReadIn{Fh: le.Uint64(b[0:]), Offset: le.Uint64(b[8:]), Size: le.Uint32(b[16:]), Flags: le.Uint32(b[20:])}, nil
	}
	return decodeRW(b), nil
}

func decodeRW(b []byte) ReadIn {
	return ReadIn{
		Fh: le.Uint64(b[0:]), Offset: le.Uint64(b[8:]), Size: le.Uint32(b[16:]),
		Flags: le.Uint32(b[20:]), LockOwner: le.Uint64(b[24:]), OpenFlags: le.Uint32(b[32:]),
	}
}

// Encode writes r into b (at least ReadInSize bytes); fuse_write_in has the
// same layout. Used by test drivers.
func (r *ReadIn) Encode(b []byte) {
	clear(b[:ReadInSize])
	le.PutUint64(b[0:], r.Fh)
	le.PutUint64(b[8:], r.Offset)
	le.PutUint32(b[16:], r.Size)
	le.PutUint32(b[20:], r.Flags)
	le.PutUint64(b[24:], r.LockOwner)
	le.PutUint32(b[32:], r.OpenFlags)
}

// Kstatfs is fuse_kstatfs.
type Kstatfs struct {
	Blocks, Bfree, Bavail, Files, Ffree uint64
	Bsize, Namelen, Frsize              uint32
}

// Encode writes k into b (at least StatfsOutSize bytes).
func (k *Kstatfs) Encode(b []byte) {
	clear(b[:StatfsOutSize])
	le.PutUint64(b[0:], k.Blocks)
	le.PutUint64(b[8:], k.Bfree)
	le.PutUint64(b[16:], k.Bavail)
	le.PutUint64(b[24:], k.Files)
	le.PutUint64(b[32:], k.Ffree)
	le.PutUint32(b[40:], k.Bsize)
	le.PutUint32(b[44:], k.Namelen)
	le.PutUint32(b[48:], k.Frsize)
}

// DecodeKstatfs decodes fuse_kstatfs (test drivers).
func DecodeKstatfs(b []byte) (Kstatfs, error) {
	if len(b) < StatfsOutSize {
		return Kstatfs{}, short("statfs out", StatfsOutSize, len(b))
	}
	return Kstatfs{
		Blocks: le.Uint64(b[0:]), Bfree: le.Uint64(b[8:]), Bavail: le.Uint64(b[16:]),
		Files: le.Uint64(b[24:]), Ffree: le.Uint64(b[32:]), Bsize: le.Uint32(b[40:]),
		Namelen: le.Uint32(b[44:]), Frsize: le.Uint32(b[48:]),
	}, nil
}

// Dirent is one fuse_dirent header.
type Dirent struct {
	Ino, Off uint64
	Type     uint32
	Name     string // in decoded form; Encode takes the name separately
}

// DirentSize is the aligned size of a fuse_dirent record with a name of n
// bytes.
func DirentSize(n int) int { return align8(DirentHeaderSize + n) }

// DirentplusSize is the aligned size of a fuse_direntplus record with a name
// of n bytes.
func DirentplusSize(n int) int { return align8(DirentplusHeadSize + n) }

func align8(n int) int { return (n + 7) &^ 7 }

// PutDirent writes a fuse_dirent for name into b, which must hold
// DirentSize(len(name)) bytes, padding with zeroes. It returns the record
// size.
func PutDirent(b []byte, ino, off uint64, typ uint32, name []byte) int {
	n := DirentSize(len(name))
	le.PutUint64(b[0:], ino)
	le.PutUint64(b[8:], off)
	le.PutUint32(b[16:], uint32(len(name)))
	le.PutUint32(b[20:], typ)
	k := copy(b[DirentHeaderSize:], name)
	clear(b[DirentHeaderSize+k : n])
	return n
}

// DecodeDirents parses a READDIR reply payload (test drivers).
func DecodeDirents(b []byte) ([]Dirent, error) {
	var out []Dirent
	for len(b) > 0 {
		if len(b) < DirentHeaderSize {
			return out, short("dirent", DirentHeaderSize, len(b))
		}
		nl := int(le.Uint32(b[16:]))
		size := DirentSize(nl)
		if nl > MaxNameLen || size > len(b) {
			return out, fmt.Errorf("%w: dirent name of %d bytes in %d", ErrShort, nl, len(b))
		}
		out = append(out, Dirent{Ino: le.Uint64(b[0:]), Off: le.Uint64(b[8:]), Type: le.Uint32(b[20:]), Name: string(b[DirentHeaderSize : DirentHeaderSize+nl])})
		b = b[size:]
	}
	return out, nil
}

// DirentPlus is one decoded fuse_direntplus (test drivers).
type DirentPlus struct {
	Entry EntryOut
	Dirent
}

// DecodeDirentplus parses a READDIRPLUS reply payload (test drivers).
func DecodeDirentplus(b []byte) ([]DirentPlus, error) {
	var out []DirentPlus
	for len(b) > 0 {
		if len(b) < DirentplusHeadSize {
			return out, short("direntplus", DirentplusHeadSize, len(b))
		}
		e, _ := DecodeEntryOut(b)
		d := b[EntryOutSize:]
		nl := int(le.Uint32(d[16:]))
		size := DirentplusSize(nl)
		if nl > MaxNameLen || size > len(b) {
			return out, fmt.Errorf("%w: direntplus name of %d bytes in %d", ErrShort, nl, len(b))
		}
		out = append(out, DirentPlus{Entry: e, Dirent: Dirent{Ino: le.Uint64(d[0:]), Off: le.Uint64(d[8:]), Type: le.Uint32(d[20:]), Name: string(d[DirentHeaderSize : DirentHeaderSize+nl])}})
		b = b[size:]
	}
	return out, nil
}

// U32 and U64 read little-endian fields at off; ok is false when b is too
// short. They decode the small fixed argument structs (forget_in,
// getattr_in, open_in, ...) whose layout is a few scalar fields.
func U32(b []byte, off int) (uint32, bool) {
	if off < 0 || len(b) < off+4 {
		return 0, false
	}
	return le.Uint32(b[off:]), true
}

// U64 reads a little-endian uint64 at off.
func U64(b []byte, off int) (uint64, bool) {
	if off < 0 || len(b) < off+8 {
		return 0, false
	}
	return le.Uint64(b[off:]), true
}

// PutU32 and PutU64 write little-endian fields (b must be long enough).
func PutU32(b []byte, off int, v uint32) { le.PutUint32(b[off:], v) }

// PutU64 writes a little-endian uint64 at off.
func PutU64(b []byte, off int, v uint64) { le.PutUint64(b[off:], v) }

// CString splits b at its first NUL: the name before it and the bytes after
// it. It fails when there is no NUL.
func CString(b []byte) (name, rest []byte, err error) {
	for i, c := range b {
		if c == 0 {
			return b[:i], b[i+1:], nil
		}
	}
	return nil, nil, ErrNoNUL
}
