// Package fs is the virtio-fs device (virtio 1.2, section 5.11): a FUSE
// server that gives the guest one host directory, served over vhost-user.
//
// Every request is a FUSE message written by the guest and is parsed as
// hostile input: lengths, counts, offsets, names and node/handle ids are
// checked before use, and a bad request gets an error reply (or, when it
// cannot carry one, is dropped and counted), never a panic.
//
// The server never reaches outside the shared directory: see confine.go for
// the rules and docs/VIRTIOFS.md for the design.
package fs

import (
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/vhostuser"
)

// Chain is what the server needs from one descriptor chain: a cursor over
// the device-readable request and one over the device-writable reply.
// *virtq.Chain implements it.
type Chain interface {
	Read(p []byte) (int, error)
	RemainingRead() uint64
	PeekReadable(dst [][]byte, max uint64) [][]byte
	SkipRead(n uint64) error
	Write(p []byte) (int, error)
	RemainingWrite() uint64
	PeekWritable(dst [][]byte, max uint64) [][]byte
	SkipWrite(n uint64) error
	Written() uint32
}

// Defaults for Config fields left zero.
const (
	DefaultMaxWrite   = 1 << 20
	DefaultTimeout    = time.Second
	DefaultMaxNodes   = 1 << 20
	DefaultMaxHandles = 1 << 16
	maxMaxWrite       = 1 << 24
	// maxGuestPage is the largest page a Linux guest uses (arm64 and
	// ppc64 with 64 KiB pages). Linux sizes a READ by max_pages pages of
	// its own size, so max_pages * maxGuestPage bounds what a guest may
	// ask for in one READ (Server.maxRead).
	maxGuestPage = 64 << 10
	// fdReserve is what the fd budget leaves the rest of the process:
	// its own descriptors (streams, sockets, logging) and what the
	// vhost-user back-end holds, which sizes itself from the same
	// RLIMIT_NOFILE: up to MaxMemSlots memory regions, and a kick, call
	// and error eventfd per queue.
	fdReserve = 64 + vhostuser.MaxMemSlots + 3*(1+MaxRequestQueues)
)

// memBudgetFor is the node table's memory budget (table.maxMem: what its
// nodes, names and open handles are charged, nodeCharge, aliasCharge and
// handleCost) under a data limit (RLIMIT_DATA, which the sandbox sets;
// RLIM_INFINITY for none): half of seven eighths of the limit, since with
// GOGC=100 the heap grows to twice the live data before a collection, and
// an eighth is left for per-request buffers. A guest that LOOKUPs without FORGET then gets ENFILE; with 2^20
// nodes under the sandbox's 1 GiB it made the Go runtime run out of
// memory, and the share died with the plugin (found in review). Under
// 1 GiB that is about 700 000 nodes of one name each, 245 000 of four
// names (TestNodeCharges).
func memBudgetFor(dataLimit uint64) int64 {
	if dataLimit == unix.RLIM_INFINITY || dataLimit >= 1<<62 {
		return math.MaxInt64
	}
	return max(int64(dataLimit/8*7/2), 1024*(nodeCharge+maxAliases*aliasCharge))
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Dir is the shared directory. The server duplicates the fd; the caller
	// keeps ownership of Dir.
	Dir *os.File
	// ReadOnly refuses every modification with EROFS.
	ReadOnly bool
	// UIDMap and GIDMap translate ids between guest and host (see
	// docs/VIRTIOFS.md). Empty means identity.
	UIDMap, GIDMap []IDMap
	// EntryTimeout and AttrTimeout are how long the guest may cache names
	// and attributes; 0 means DefaultTimeout, negative means no caching.
	EntryTimeout, AttrTimeout time.Duration
	// MaxWrite is the largest WRITE (and READ) the guest is told to send;
	// 0 means DefaultMaxWrite. Rounded down to 4 KiB, at least 4 KiB. A
	// Device lowers it further so that a request's pages and headers fit
	// its largest ring ((QueueSize-4) pages).
	MaxWrite uint32
	// MaxNodes bounds the inodes the guest can hold at once; 0 means
	// DefaultMaxNodes. Under RLIMIT_DATA the nodes' memory is bounded
	// too (memBudgetFor).
	MaxNodes int
	// MaxHandles bounds open files and directories; 0 means a quarter of
	// the file descriptor budget, at most DefaultMaxHandles.
	MaxHandles int
	// MaxOpenFiles is the file descriptor budget; 0 means RLIMIT_NOFILE
	// less a reserve. See nodes.go for how it is shared.
	MaxOpenFiles int
	// NoXattr answers the xattr requests with ENOSYS (the guest then stops
	// sending them).
	NoXattr bool
	// AllowSetID lets the guest set S_ISUID and S_ISGID on host files and
	// security.capability attributes (the suid=on option). Without it the
	// share is nosuid: the server strips those bits from every mode the
	// guest asks for and clears them when the guest modifies a file; see
	// setid.go and docs/VIRTIOFS.md.
	AllowSetID bool
	// Log receives debug and warning messages; nil discards them.
	Log hclog.Logger
}

// Stats are the server's counters.
type Stats struct {
	Requests    atomic.Uint64 // requests handled, FORGETs included
	Errors      atomic.Uint64 // error replies
	Malformed   atomic.Uint64 // requests that could not be decoded
	Unsupported atomic.Uint64 // ENOSYS replies
	ReadBytes   atomic.Uint64
	WriteBytes  atomic.Uint64
	// HandleRefusals counts OPEN, CREATE and OPENDIR refused with ENFILE
	// for want of a handle (MaxHandles, or the memory budget).
	HandleRefusals atomic.Uint64
}

// Server is a FUSE file server over one host directory. Handle is safe for
// concurrent use.
type Server struct {
	log hclog.Logger
	// noAppendWarned: the host kernel's lack of RWF_NOAPPEND was logged
	// (once: the guest decides how often it happens).
	noAppendWarned atomic.Bool
	rootFd         int
	readOnly       bool
	uids           idMapper
	gids           idMapper
	entryTO        timeout
	attrTO         timeout
	maxWrite       uint32
	// maxRead is the largest READ served: max_pages (maxWrite / 4 KiB,
	// what INIT tells the guest) pages of maxGuestPage; a larger one is
	// served that much, as one larger than its reply area is.
	maxRead uint64
	noXattr bool

	canChown   bool
	euid, egid uint32
	// allowSetID is ServerConfig.AllowSetID. canFsetid: the process holds
	// CAP_FSETID, so the host kernel leaves set-id bits alone when the
	// server writes or truncates a file and the server clears them itself.
	allowSetID bool
	canFsetid  bool
	// noFchmodat2 is set once fchmodat2 turned out unusable (old kernel or
	// refused by seccomp), so chmod goes straight to the reopen path.
	noFchmodat2 atomic.Bool

	t *table

	initMu sync.Mutex
	inited atomic.Bool
	minor  atomic.Uint32
	// scratches holds idle per-request scratch space. A channel rather
	// than a sync.Pool: its behaviour does not depend on garbage
	// collections (which also keeps fuzzing coverage deterministic).
	scratches chan *scratch
	closed    atomic.Bool
	stats     Stats
	// handleWarned is when the last "as many open files as it may"
	// warning was logged (reserveHandle): nanoseconds since epoch, on the
	// monotonic clock (a wall clock stepped back would silence it), plus
	// one so that 0 means never.
	handleWarned atomic.Int64
	epoch        time.Time
}

type timeout struct {
	sec  uint64
	nsec uint32
}

func mkTimeout(d time.Duration) timeout {
	switch {
	case d == 0:
		d = DefaultTimeout
	case d < 0:
		d = 0
	}
	return timeout{sec: uint64(d / time.Second), nsec: uint32(d % time.Second)}
}

// NewServer checks the directory and returns a server for it.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Dir == nil {
		return nil, fmt.Errorf("virtio-fs: no shared directory")
	}
	if err := devopts.ValidateIDMaps("uid", cfg.UIDMap); err != nil {
		return nil, fmt.Errorf("virtio-fs: %w", err)
	}
	if err := devopts.ValidateIDMaps("gid", cfg.GIDMap); err != nil {
		return nil, fmt.Errorf("virtio-fs: %w", err)
	}
	// A fresh O_PATH fd of the directory itself (openat2 of "." rather than
	// dup or fcntl, which the plugin's seccomp profile limits).
	fd, err := openBeneath(int(cfg.Dir.Fd()), ".", unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fmt.Errorf("virtio-fs: shared directory %s: %w", cfg.Dir.Name(), err)
	}
	var st unix.Stat_t
	if err := statFd(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("virtio-fs: stat shared directory: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		unix.Close(fd)
		return nil, fmt.Errorf("virtio-fs: shared directory %s is not a directory", cfg.Dir.Name())
	}
	maxWrite := cfg.MaxWrite
	if maxWrite == 0 {
		maxWrite = DefaultMaxWrite
	}
	maxWrite = min(maxWrite, maxMaxWrite) &^ 4095
	if maxWrite < 4096 {
		maxWrite = 4096
	}
	maxNodes := cfg.MaxNodes
	if maxNodes <= 0 {
		maxNodes = DefaultMaxNodes
	}
	var dataLimit unix.Rlimit
	if unix.Prlimit(0, unix.RLIMIT_DATA, nil, &dataLimit) != nil {
		dataLimit.Cur = unix.RLIM_INFINITY
	}
	// File descriptors: the reserve is the vhost-user socket, memory
	// regions, eventfds and logging; of the rest, two thirds hold nodes'
	// O_PATH fds (idle ones are closed beyond that and reopened by name;
	// those that cannot be may go an eighth over, roomLocked) and what
	// is left open files and directories, which cannot be closed behind
	// the guest's back. The parts add up to the budget, no more: they
	// added up to 35/32 of it, and a guest could run the process out of
	// descriptors before the server's own limits answered ENFILE (found
	// in review, helper-85).
	fdBudget := cfg.MaxOpenFiles
	if fdBudget <= 0 {
		fdBudget = 1 << 20
		var rl unix.Rlimit
		if unix.Prlimit(0, unix.RLIMIT_NOFILE, nil, &rl) == nil && rl.Cur < uint64(fdBudget) {
			fdBudget = int(rl.Cur)
		}
		fdBudget -= fdReserve
	}
	fdBudget = max(fdBudget, 32)
	maxOpen := fdBudget * 2 / 3
	maxHandles := cfg.MaxHandles
	if maxHandles <= 0 {
		maxHandles = min(DefaultMaxHandles, fdBudget-maxOpen-max(maxOpen/8, 1))
	}
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s := &Server{
		epoch:      time.Now(),
		log:        log,
		rootFd:     fd,
		readOnly:   cfg.ReadOnly,
		uids:       idMapper(cfg.UIDMap),
		gids:       idMapper(cfg.GIDMap),
		entryTO:    mkTimeout(cfg.EntryTimeout),
		attrTO:     mkTimeout(cfg.AttrTimeout),
		maxWrite:   maxWrite,
		maxRead:    uint64(maxWrite/4096) * maxGuestPage,
		noXattr:    cfg.NoXattr,
		euid:       uint32(unix.Geteuid()),
		egid:       uint32(unix.Getegid()),
		allowSetID: cfg.AllowSetID,
	}
	caps := effectiveCaps()
	s.canChown = caps&(1<<unix.CAP_CHOWN) != 0
	s.canFsetid = caps&(1<<unix.CAP_FSETID) != 0
	s.t = newTable(fd, &st, maxNodes, maxOpen, maxHandles)
	s.t.maxMem = memBudgetFor(dataLimit.Cur)
	s.scratches = make(chan *scratch, maxIdleScratch)
	return s, nil
}

// effectiveCaps returns the calling thread's effective capability set
// (CAP_CHOWN: the process may give files away; CAP_FSETID: the kernel
// keeps set-id bits when it writes). Threads of a Go process share their
// capabilities unless one is changed on purpose; the sandbox empties them
// on every thread before the server is made. When capget fails, root is
// assumed to hold every capability and anyone else none.
func effectiveCaps() uint64 {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		if unix.Geteuid() == 0 {
			return ^uint64(0)
		}
		return 0
	}
	return uint64(data[1].Effective)<<32 | uint64(data[0].Effective)
}

// Stats returns the server's counters.
func (s *Server) Stats() *Stats { return &s.stats }

// Reset forgets every node and handle, as after a device reset. A new INIT
// is needed before other requests.
func (s *Server) Reset() {
	s.initMu.Lock()
	defer s.initMu.Unlock()
	s.inited.Store(false)
	s.t.reset()
}

// Close releases everything the server holds. Requests must not be in
// flight.
func (s *Server) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.t.reset()
	return unix.Close(s.rootFd)
}

// counts reports live nodes and handles (tests).
func (s *Server) counts() (nodes, handles int) { return s.t.count() }

// handleWarnEvery is how often at most reserveHandle warns.
const handleWarnEvery = time.Minute

// reserveHandle is the table's reserveHandle, counted and said in the log
// (at most once a minute) when it refuses: the guest's open then fails
// with ENFILE, "Too many open files in system", which names no cause on
// the host side.
func (s *Server) reserveHandle(dir bool) unix.Errno {
	e := s.t.reserveHandle(dir)
	if e != unix.ENFILE {
		return e
	}
	s.stats.HandleRefusals.Add(1)
	now, last := int64(time.Since(s.epoch))+1, s.handleWarned.Load()
	if last != 0 && now-last < int64(handleWarnEvery) || !s.handleWarned.CompareAndSwap(last, now) {
		return e
	}
	open, atLimit := s.t.handleUse()
	if atLimit && s.t.maxHandles >= DefaultMaxHandles {
		// The plugin's own cap, reached from open-files= of about
		// 266000 up: raising open-files= adds nothing here.
		s.log.Warn("the guest holds as many files and directories open on this share as the plugin allows at most; more opens fail with ENFILE (a larger open-files= does not raise this)",
			"open", open, "limit", s.t.maxHandles)
	} else if atLimit {
		s.log.Warn("the guest holds as many files and directories open on this share as it may; more opens fail with ENFILE: raise the share's open-files= (run --root-open-files for the root, krun-oci's annotation krun.open_files)",
			"open", open, "limit", s.t.maxHandles)
	} else {
		s.log.Warn("the plugin's memory budget for the guest's inodes and open files is spent; more opens fail with ENFILE until the guest forgets inodes",
			"open", open)
	}
	return e
}

// maxIdleScratch bounds the idle scratch spaces kept (about 135 KiB each).
const maxIdleScratch = 16

func (s *Server) getScratch() *scratch {
	select {
	case sc := <-s.scratches:
		return sc
	default:
		return new(scratch)
	}
}

func (s *Server) putScratch(sc *scratch) {
	select {
	case s.scratches <- sc:
	default:
	}
}

// scratch is per-request working memory, pooled so that requests allocate
// nothing once warm.
type scratch struct {
	hdr  [fuse.InHeaderSize]byte
	in   [fuse.MaxInPayload]byte
	out  [512]byte
	big  [fuse.MaxXattrSize]byte // xattr values and lists, symlink targets
	segs [][]byte
	hseg [][]byte
	iov  iovec
	req  request
	al   []alias
}

// request is one FUSE request being served.
type request struct {
	s    *Server
	c    Chain
	sc   *scratch
	h    fuse.InHeader
	in   []byte // the arguments (for WRITE only fuse_write_in)
	data uint64 // WRITE: payload bytes still in the chain
	hdr  [][]byte
}

// Handle serves the request in c and writes its reply into c's writable
// buffers. It returns the number of bytes written, the used length for the
// chain (0 for FORGET and BATCH_FORGET, which have no reply).
func (s *Server) Handle(c Chain) uint32 {
	s.stats.Requests.Add(1)
	sc := s.getScratch()
	defer s.putScratch(sc)

	if err := readFull(c, sc.hdr[:]); err != nil {
		s.stats.Malformed.Add(1)
		return 0
	}
	h, _ := fuse.DecodeInHeader(sc.hdr[:])
	r := &sc.req
	*r = request{s: s, c: c, sc: sc, h: h}
	defer func() { *r = request{} }()

	argLen, ok := s.argLen(c, h)
	if !ok {
		s.stats.Malformed.Add(1)
		if h.Opcode == fuse.OpForget || h.Opcode == fuse.OpBatchForget {
			return 0
		}
		return r.finish(unix.EINVAL)
	}
	if h.Opcode == fuse.OpWrite {
		n := min(argLen, fuse.WriteInSize)
		if err := readFull(c, sc.in[:n]); err != nil {
			return r.finish(unix.EINVAL)
		}
		r.in = sc.in[:n]
		r.data = argLen - n
	} else {
		if argLen > uint64(len(sc.in)) {
			s.stats.Malformed.Add(1)
			return r.finish(unix.E2BIG)
		}
		if err := readFull(c, sc.in[:argLen]); err != nil {
			s.stats.Malformed.Add(1)
			return r.finish(unix.EINVAL)
		}
		r.in = sc.in[:argLen]
	}

	switch h.Opcode {
	case fuse.OpForget:
		if s.inited.Load() {
			if n, ok := fuse.U64(r.in, 0); ok {
				s.t.forget(h.NodeID, n)
			} else {
				s.stats.Malformed.Add(1)
			}
		}
		return 0
	case fuse.OpBatchForget:
		if s.inited.Load() {
			s.batchForget(r.in)
		}
		return 0
	}
	if c.RemainingWrite() < fuse.OutHeaderSize {
		// The guest left no room for the reply: do not act on a request
		// whose outcome it cannot learn.
		s.stats.Malformed.Add(1)
		return 0
	}
	if c.RemainingWrite() < fuse.OutHeaderSize+fixedReply(h.Opcode) {
		// Room for an error but not for the reply: refused before it
		// acts. The server made the file, truncated, wrote or changed
		// the mode and then answered ENOBUFS for the reply that did not
		// fit (found in review, helper-141).
		s.stats.Malformed.Add(1)
		return r.finish(unix.ENOBUFS)
	}
	return r.finish(s.dispatch(r))
}

// fixedReply is the size of op's reply payload where that is a fixed
// struct, and 0 for the requests whose reply is empty or of a size the
// request chooses (READ, READDIR, READLINK, the xattr calls, INIT, which
// fit what the reply area holds or answer an error without acting).
func fixedReply(op fuse.Opcode) uint64 {
	switch op {
	case fuse.OpLookup, fuse.OpMknod, fuse.OpMkdir, fuse.OpSymlink, fuse.OpLink:
		return fuse.EntryOutSize
	case fuse.OpCreate:
		return fuse.EntryOutSize + fuse.OpenOutSize
	case fuse.OpOpen, fuse.OpOpendir:
		return fuse.OpenOutSize
	case fuse.OpGetattr, fuse.OpSetattr:
		return fuse.AttrOutSize
	case fuse.OpWrite:
		return fuse.WriteOutSize
	case fuse.OpLseek:
		return fuse.LseekOutSize
	case fuse.OpStatfs:
		return fuse.StatfsOutSize
	}
	return 0
}

// argLen validates the header's length against the chain and returns the
// argument bytes (extensions excluded).
func (s *Server) argLen(c Chain, h fuse.InHeader) (uint64, bool) {
	if h.Len < fuse.InHeaderSize {
		return 0, false
	}
	n := uint64(h.Len) - fuse.InHeaderSize
	if n > c.RemainingRead() {
		return 0, false
	}
	ext := uint64(h.TotalExtLen) * 8
	if ext > n {
		return 0, false
	}
	return n - ext, true
}

func readFull(c Chain, p []byte) error {
	for len(p) > 0 {
		n, err := c.Read(p)
		if err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// begin reserves the reply header in the writable buffers. Handlers call
// it (through the reply helpers) right before writing a successful reply's
// payload; nothing is written to the chain before that.
func (r *request) begin() bool {
	if r.hdr != nil {
		return true
	}
	if r.c.RemainingWrite() < fuse.OutHeaderSize {
		return false
	}
	r.hdr = r.c.PeekWritable(r.sc.hseg[:0], fuse.OutHeaderSize)
	r.sc.hseg = r.hdr[:0]
	if err := r.c.SkipWrite(fuse.OutHeaderSize); err != nil {
		r.hdr = nil
		return false
	}
	return true
}

// finish writes the reply header: success with whatever payload the
// handler wrote, or the error.
func (r *request) finish(e unix.Errno) uint32 {
	s := r.s
	if e == 0 && r.hdr == nil && !r.begin() {
		e = unix.EIO
	}
	if e != 0 {
		s.stats.Errors.Add(1)
		if e == unix.ENOSYS {
			s.stats.Unsupported.Add(1)
		}
		if r.hdr == nil && !r.begin() {
			// No room for even a header: the guest broke its own request.
			s.stats.Malformed.Add(1)
			return r.c.Written()
		}
	}
	var b [fuse.OutHeaderSize]byte
	oh := fuse.OutHeader{Len: r.c.Written(), Unique: r.h.Unique}
	if e != 0 {
		oh.Len = fuse.OutHeaderSize
		oh.Error = -int32(e)
	}
	oh.Encode(b[:])
	p := b[:]
	for _, seg := range r.hdr {
		p = p[copy(seg, p):]
	}
	return r.c.Written()
}

// reply writes a complete success payload (the concatenation of parts).
func (r *request) reply(parts ...[]byte) unix.Errno {
	total := uint64(0)
	for _, p := range parts {
		total += uint64(len(p))
	}
	if r.c.RemainingWrite() < fuse.OutHeaderSize+total {
		return unix.ENOBUFS
	}
	if !r.begin() {
		return unix.ENOBUFS
	}
	for _, p := range parts {
		if _, err := r.c.Write(p); err != nil {
			return unix.ENOBUFS
		}
	}
	return 0
}

// room is the payload space the reply has left.
func (r *request) room() uint64 {
	w := r.c.RemainingWrite()
	if r.hdr == nil {
		if w < fuse.OutHeaderSize {
			return 0
		}
		w -= fuse.OutHeaderSize
	}
	return w
}

func errno(err error) unix.Errno {
	if err == nil {
		return 0
	}
	if e, ok := err.(unix.Errno); ok && e != 0 {
		return e
	}
	return unix.EIO
}

func (s *Server) dispatch(r *request) unix.Errno {
	op := r.h.Opcode
	if op == fuse.OpInit {
		return s.opInit(r)
	}
	if !s.inited.Load() {
		return unix.EIO
	}
	switch op {
	case fuse.OpDestroy:
		return s.opDestroy(r)
	case fuse.OpLookup:
		return s.opLookup(r)
	case fuse.OpGetattr:
		return s.opGetattr(r)
	case fuse.OpSetattr:
		return s.opSetattr(r)
	case fuse.OpReadlink:
		return s.opReadlink(r)
	case fuse.OpSymlink:
		return s.opSymlink(r)
	case fuse.OpMknod:
		return s.opMknod(r)
	case fuse.OpMkdir:
		return s.opMkdir(r)
	case fuse.OpUnlink:
		return s.opRemove(r, 0)
	case fuse.OpRmdir:
		return s.opRemove(r, unix.AT_REMOVEDIR)
	case fuse.OpRename:
		return s.opRename(r, false)
	case fuse.OpRename2:
		return s.opRename(r, true)
	case fuse.OpLink:
		return s.opLink(r)
	case fuse.OpOpen:
		return s.opOpen(r)
	case fuse.OpRead:
		return s.opRead(r)
	case fuse.OpWrite:
		return s.opWrite(r)
	case fuse.OpStatfs:
		return s.opStatfs(r)
	case fuse.OpRelease, fuse.OpReleasedir:
		return s.opRelease(r)
	case fuse.OpFsync, fuse.OpFsyncdir:
		return s.opFsync(r)
	case fuse.OpFlush:
		return s.opFlush(r)
	case fuse.OpSetxattr:
		return s.opSetxattr(r)
	case fuse.OpGetxattr:
		return s.opGetxattr(r, false)
	case fuse.OpListxattr:
		return s.opGetxattr(r, true)
	case fuse.OpRemovexattr:
		return s.opRemovexattr(r)
	case fuse.OpOpendir:
		return s.opOpendir(r)
	case fuse.OpReaddir:
		return s.opReaddir(r, false)
	case fuse.OpReaddirplus:
		return s.opReaddir(r, true)
	case fuse.OpAccess:
		return s.opAccess(r)
	case fuse.OpCreate:
		return s.opCreate(r)
	case fuse.OpFallocate:
		return s.opFallocate(r)
	case fuse.OpLseek:
		return s.opLseek(r)
	case fuse.OpSyncfs:
		return s.opSyncfs(r)
	}
	return unix.ENOSYS
}

// supportedInit are the INIT flags this server can honour.
const supportedInit = fuse.InitAsyncRead | fuse.InitAtomicOTrunc | fuse.InitBigWrites |
	fuse.InitAutoInvalData | fuse.InitDoReaddirplus | fuse.InitReaddirplusAuto |
	fuse.InitAsyncDIO | fuse.InitParallelDirops | fuse.InitMaxPages | fuse.InitCacheSymlinks |
	fuse.InitHandleKillprivV2

func (s *Server) opInit(r *request) unix.Errno {
	in, err := fuse.DecodeInitIn(r.in)
	if err != nil {
		return unix.EINVAL
	}
	if in.Major < fuse.KernelVersion {
		return unix.EPROTO
	}
	out := fuse.InitOut{Major: fuse.KernelVersion, Minor: fuse.KernelMinorVersion}
	var b [fuse.InitOutSize]byte
	if in.Major > fuse.KernelVersion {
		// The kernel retries INIT with our major version.
		out.Encode(b[:])
		return r.reply(b[:8])
	}
	minor := min(in.Minor, fuse.KernelMinorVersion)
	size := fuse.InitOutSize
	if minor < 23 {
		size = fuse.InitOutCompat22
	}
	if r.room() < uint64(size) {
		// Refused before the session it would end is dropped.
		return unix.ENOBUFS
	}
	s.initMu.Lock()
	defer s.initMu.Unlock()
	// A new session starts from nothing (INIT after DESTROY, or a hostile
	// second INIT).
	s.t.reset()
	out.MaxReadahead = in.MaxReadahead
	out.Flags = in.Flags & supportedInit
	out.MaxBackground = 64
	out.CongestionThreshold = 48
	out.MaxWrite = s.maxWrite
	out.TimeGran = 1
	out.MaxPages = uint16(s.maxWrite / 4096)
	out.Encode(b[:])
	s.minor.Store(minor)
	s.inited.Store(true)
	return r.reply(b[:size])
}

func (s *Server) opDestroy(r *request) unix.Errno {
	s.initMu.Lock()
	s.inited.Store(false)
	s.t.reset()
	s.initMu.Unlock()
	return r.reply()
}

func (s *Server) batchForget(in []byte) {
	count, ok := fuse.U32(in, 0)
	if !ok || len(in) < fuse.BatchForgetInSize {
		s.stats.Malformed.Add(1)
		return
	}
	body := in[fuse.BatchForgetInSize:]
	if uint64(count)*fuse.ForgetOneSize > uint64(len(body)) {
		// Forget what is there; the count lies.
		s.stats.Malformed.Add(1)
		count = uint32(len(body) / fuse.ForgetOneSize)
	}
	for i := 0; i < int(count); i++ {
		id, _ := fuse.U64(body, i*fuse.ForgetOneSize)
		n, _ := fuse.U64(body, i*fuse.ForgetOneSize+8)
		s.t.forget(id, n)
	}
}

// checkOffset validates a guest file offset (and optional length): both
// must fit in int64 without the sum overflowing.
func checkOffset(off, n uint64) unix.Errno {
	if off > math.MaxInt64 || n > math.MaxInt64 || off+n > math.MaxInt64 {
		return unix.EINVAL
	}
	return 0
}
