package backend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/virtq"
)

// Errors for requests that are well-formed but not acceptable now.
var (
	ErrNotOwner       = errors.New("SET_OWNER has not been received")
	ErrNotNegotiated  = errors.New("required feature not negotiated")
	ErrNotOffered     = errors.New("feature not offered")
	ErrRingIndex      = errors.New("ring index out of range")
	ErrRingStarted    = errors.New("ring is started")
	ErrRingNotReady   = errors.New("ring is not configured")
	ErrNoMemory       = errors.New("no memory table")
	ErrBadValue       = errors.New("invalid value")
	ErrTooManyRegions = errors.New("too many memory regions")
	ErrNoSuchRegion   = errors.New("no such memory region")
)

// slot is one memory region with the file it is mapped from (kept so that
// the table can be rebuilt on ADD_MEM_REG/REM_MEM_REG).
type slot struct {
	vhostuser.MemRegion
	file *os.File
}

// ring is the back-end state of one ring, owned by the message loop.
type ring struct {
	index int
	stats *counters

	num     uint16 // 0: not set
	addr    vhostuser.VringAddr
	addrSet bool
	// next available and used indexes while no queue exists
	base, usedBase uint16

	kick    *os.File // as received; nil with polling or before SET_VRING_KICK
	kickSet bool     // SET_VRING_KICK received (fd or polling)
	call    fileSlot
	errFD   fileSlot
	enabled bool // per SET_VRING_ENABLE

	// started: kick received while configured. q is nil while the memory
	// table does not cover the ring (it is rebuilt on the next change).
	started bool
	q       *virtq.Queue

	cancel context.CancelFunc
	done   chan struct{}
	failed atomic.Bool // the worker stopped on its own; not restarted

	// track is the ring's part of the inflight region while the ring is
	// started (nil without SET_INFLIGHT_FD), resubmit the heads a previous
	// back-end left in flight and not yet taken again.
	track    *tracker
	resubmit []uint16
}

// session is the state of one front-end connection. Everything but the
// worker goroutines runs on the message loop.
type session struct {
	ctx  context.Context
	s    *Server
	conn *vhostuser.Conn

	owner    bool
	features uint64 // acked virtio features
	protocol uint64 // acked protocol features
	// protocolSet records that SET_PROTOCOL_FEATURES arrived. QEMU sends
	// SET_VRING_ENABLE (vhost-user-net does, to disable rings at start) as
	// soon as protocol features are negotiated, before SET_FEATURES acks
	// VHOST_USER_F_PROTOCOL_FEATURES; the request is valid from then on.
	protocolSet bool
	mem         *guestmem.Memory
	slots       []slot
	rings       []*ring

	// faultLogged is set once a ring failed on a memory fault: further
	// faults on this connection's memory are logged at debug level.
	faultLogged atomic.Bool

	// closeBackendReq closes the back-end request channel
	// (SET_BACKEND_REQ_FD), after stopping the goroutine that forwards
	// config changes on it; nil without a channel.
	closeBackendReq func()

	// inflight is the region of SET_INFLIGHT_FD (nil: no tracking).
	inflight *inflightRegion
	devState *DeviceState // in inflight, for a StateKeeper device
	// replyFiles go with the reply being built (GET_INFLIGHT_FD); handle
	// sends and closes them.
	replyFiles []*os.File
}

func newSession(ctx context.Context, s *Server, conn *vhostuser.Conn) *session {
	sess := &session{ctx: ctx, s: s, conn: conn, rings: make([]*ring, s.info.NumQueues)}
	for i := range sess.rings {
		sess.rings[i] = &ring{index: i, stats: &s.stats[i]}
	}
	return sess
}

// close ends the session: rings stopped, descriptors and memory released,
// device reset.
func (sess *session) close() {
	sess.setBackendReq(nil)
	for _, r := range sess.rings {
		sess.stopRing(r)
		r.call.swap(nil)
		r.errFD.swap(nil)
	}
	sess.setSlots(nil)
	sess.devState.detach()
	sess.devState = nil
	sess.inflight.close()
	sess.inflight = nil
	sess.s.dev.Reset()
}

// handle is the single choke point every request goes through: it
// validates the message, dispatches it, and sends the reply or the
// REPLY_ACK. A returned error closes the connection: it is returned when
// the front-end cannot be told about a failure any other way.
func (sess *session) handle(m *vhostuser.Message) error {
	defer m.CloseFiles()
	log := sess.s.log
	ackBefore := sess.protocol&vhostuser.ProtocolReplyAck != 0
	payload, err := vhostuser.ParseRequest(m)
	var reply []byte
	defer func() {
		for _, f := range sess.replyFiles {
			f.Close()
		}
		sess.replyFiles = nil
	}()
	if err == nil {
		err = Protect(func() error {
			var herr error
			reply, herr = sess.dispatch(m, payload)
			return herr
		})
		if err != nil {
			err = fmt.Errorf("%v: %w", m.Request, err)
		}
	}
	hasReply := vhostuser.HasReply(m.Request)
	// need_reply counts when REPLY_ACK was negotiated before the request
	// or by it (SET_PROTOCOL_FEATURES).
	ack := m.NeedReply() && !hasReply && (ackBefore || sess.protocol&vhostuser.ProtocolReplyAck != 0)
	if err != nil {
		// Spaced: with REPLY_ACK the connection goes on, and a front-end
		// (a guest, through the core) can repeat a refused request at
		// will. The first of each request code is a warning, then one per
		// interval with the count left unlogged; the rest go to debug.
		sess.s.refusedLimiter(m.Request).Warn(log, "vhost-user request failed", "request", m.Request.String(), "error", err)
		switch {
		case ack:
			return sess.send(m.Request, vhostuser.EncodeU64(1))
		case m.Request == vhostuser.GetConfig:
			return sess.send(m.Request, nil) // an empty reply means failure
		case m.Request == vhostuser.GetInflightFD:
			// A region of size 0 tells the front-end there is none.
			return sess.send(m.Request, vhostuser.Inflight{}.Encode())
		default:
			return err
		}
	}
	log.Trace("vhost-user request", "request", m.Request.String())
	switch {
	case hasReply:
		return sess.conn.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, reply, sess.replyFiles)
	case ack:
		return sess.send(m.Request, vhostuser.EncodeU64(0))
	}
	return nil
}

func (sess *session) send(req vhostuser.Request, payload []byte) error {
	return sess.conn.Send(req, vhostuser.Version|vhostuser.FlagReply, payload, nil)
}

// dispatch runs one validated request; payload is ParseRequest's result.
// It returns the reply body for requests that have one.
func (sess *session) dispatch(m *vhostuser.Message, payload any) ([]byte, error) {
	switch m.Request {
	case vhostuser.GetFeatures:
		return vhostuser.EncodeU64(sess.s.features), nil
	case vhostuser.SetFeatures:
		return nil, sess.setFeatures(payload.(uint64))
	case vhostuser.GetProtocolFeatures:
		return vhostuser.EncodeU64(sess.s.protocol), nil
	case vhostuser.SetProtocolFeatures:
		p := payload.(uint64)
		if extra := p &^ sess.s.protocol; extra != 0 {
			return nil, fmt.Errorf("%w: protocol features %#x", ErrNotOffered, extra)
		}
		sess.protocol = p
		sess.protocolSet = true
		return nil, nil
	case vhostuser.SetOwner:
		sess.owner = true
		return nil, nil
	case vhostuser.ResetOwner:
		sess.resetOwner()
		return nil, nil
	case vhostuser.GetQueueNum:
		if err := sess.needProtocol(vhostuser.ProtocolMQ); err != nil {
			return nil, err
		}
		return vhostuser.EncodeU64(uint64(sess.s.info.NumQueues)), nil
	case vhostuser.GetMaxMemSlots:
		if err := sess.needProtocol(vhostuser.ProtocolConfigureMemSlots); err != nil {
			return nil, err
		}
		return vhostuser.EncodeU64(uint64(sess.memSlots())), nil
	case vhostuser.GetConfig:
		return sess.getConfig(payload.(vhostuser.ConfigSpace))
	case vhostuser.SetConfig:
		if err := sess.needProtocol(vhostuser.ProtocolConfig); err != nil {
			return nil, err
		}
		c := payload.(vhostuser.ConfigSpace)
		return nil, sess.s.dev.WriteConfig(c.Offset, c.Data)
	case vhostuser.SetBackendReqFD:
		if err := sess.needProtocol(vhostuser.ProtocolBackendReq); err != nil {
			return nil, err
		}
		f := m.TakeFile(0)
		conn, err := vhostuser.NewConn(f) // a duplicate: f is ours to close
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("back-end request channel: %w", err)
		}
		sess.setBackendReq(conn)
		return nil, nil
	}

	// Everything below changes memory or rings and needs an owner.
	if !sess.owner {
		return nil, ErrNotOwner
	}
	switch m.Request {
	case vhostuser.SetMemTable:
		return nil, sess.setMemTable(m, payload.([]vhostuser.MemRegion))
	case vhostuser.AddMemReg:
		return nil, sess.addMemReg(m, payload.(vhostuser.MemRegion))
	case vhostuser.RemMemReg:
		return nil, sess.remMemReg(payload.(vhostuser.MemRegion))
	case vhostuser.SetVringNum:
		return nil, sess.setVringNum(payload.(vhostuser.VringState))
	case vhostuser.SetVringAddr:
		return nil, sess.setVringAddr(payload.(vhostuser.VringAddr))
	case vhostuser.SetVringBase:
		return nil, sess.setVringBase(payload.(vhostuser.VringState))
	case vhostuser.GetVringBase:
		return sess.getVringBase(payload.(vhostuser.VringState))
	case vhostuser.SetVringKick:
		return nil, sess.setVringKick(m, payload.(vhostuser.VringFD))
	case vhostuser.SetVringCall, vhostuser.SetVringErr:
		return nil, sess.setVringCallErr(m, payload.(vhostuser.VringFD))
	case vhostuser.SetVringEnable:
		return nil, sess.setVringEnable(payload.(vhostuser.VringState))
	case vhostuser.ResetDevice:
		if err := sess.needProtocol(vhostuser.ProtocolResetDevice); err != nil {
			return nil, err
		}
		sess.resetDevice()
		return nil, nil
	case vhostuser.GetInflightFD:
		return sess.getInflightFD(payload.(vhostuser.Inflight))
	case vhostuser.SetInflightFD:
		return nil, sess.setInflightFD(m, payload.(vhostuser.Inflight))
	}
	return nil, vhostuser.ErrUnknownRequest
}

// setBackendReq replaces the back-end request channel (nil: none) and, for
// a device that reports config changes, forwards them on the new one.
func (sess *session) setBackendReq(conn *vhostuser.Conn) {
	if sess.closeBackendReq != nil {
		sess.closeBackendReq()
		sess.closeBackendReq = nil
	}
	if conn == nil {
		return
	}
	cc, ok := sess.s.dev.(ConfigChanger)
	if !ok {
		sess.closeBackendReq = func() { conn.Close() }
		return
	}
	ctx, cancel := context.WithCancel(sess.ctx)
	done := make(chan struct{})
	sess.closeBackendReq = func() {
		cancel()
		// Closed before the wait: it ends a Send blocked on a front-end
		// that does not read the channel.
		conn.Close()
		<-done
	}
	changes := cc.ConfigChanges()
	log := sess.s.log
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-changes:
				if !ok {
					// Closed (a device's watcher that ended with
					// defer close): no more changes will come. A
					// closed channel yields at once, forever; sent on,
					// it would be a change message in a loop that
					// never waits. A nil channel never fires.
					changes = nil
					continue
				}
				// No NEED_REPLY: the front-end answers nothing, and a
				// front-end that is gone, or does not read, must not
				// block the device nor the session's end: never a
				// blocking write (a front-end that shares the socket's
				// open file can clear O_NONBLOCK on it; found in
				// review, helper-86). A change the full channel cannot
				// take is dropped; the next one tells the same.
				err := conn.SendNoWait(vhostuser.Request(vhostuser.BackendConfigChangeMsg), vhostuser.Version, nil)
				switch {
				case err == nil:
				case ctx.Err() != nil:
					return // closed under it by closeBackendReq
				case errors.Is(err, vhostuser.ErrWouldBlock):
					sess.s.backendReqLog.Warn(log, "config change not sent: the front-end does not read its back-end request channel", "error", err)
				default:
					log.Warn("config change not sent to the front-end", "error", err)
					return
				}
			}
		}
	}()
}

func (sess *session) needProtocol(bit uint64) error {
	if sess.protocol&bit == 0 {
		return fmt.Errorf("%w: protocol feature %#x", ErrNotNegotiated, bit)
	}
	return nil
}

func (sess *session) protocolFeaturesNegotiated() bool {
	return sess.features&vhostuser.FeatureProtocolFeatures != 0
}

func (sess *session) ring(idx uint32) (*ring, error) {
	if idx >= uint32(len(sess.rings)) {
		return nil, fmt.Errorf("%w: %d, device has %d", ErrRingIndex, idx, len(sess.rings))
	}
	return sess.rings[idx], nil
}

// ---- features and config ----

// ringFeatures are the features a started ring depends on.
const ringFeatures = vhostuser.FeatureRingEventIdx | vhostuser.FeatureRingIndirectDesc

func (sess *session) setFeatures(f uint64) error {
	if extra := f &^ sess.s.features; extra != 0 {
		return fmt.Errorf("%w: features %#x", ErrNotOffered, extra)
	}
	if (f^sess.features)&ringFeatures != 0 {
		for _, r := range sess.rings {
			if r.started {
				return fmt.Errorf("%w: ring %d: ring features cannot change while it runs", ErrRingStarted, r.index)
			}
		}
	}
	if err := sess.s.dev.SetFeatures(f); err != nil {
		return fmt.Errorf("device refused features %#x: %w", f, err)
	}
	sess.features = f
	sess.reconcileAll()
	return nil
}

func (sess *session) getConfig(c vhostuser.ConfigSpace) ([]byte, error) {
	if err := sess.needProtocol(vhostuser.ProtocolConfig); err != nil {
		return nil, err
	}
	out := vhostuser.ConfigSpace{Offset: c.Offset, Flags: c.Flags, Data: make([]byte, len(c.Data))}
	if err := sess.s.dev.ReadConfig(c.Offset, out.Data); err != nil {
		return nil, err
	}
	return out.Encode(), nil
}

func (sess *session) resetOwner() {
	sess.resetDevice()
	sess.owner = false
}

// resetDevice (RESET_DEVICE, the guest reset the device): every ring stops
// and is disabled, and the device returns to its initial state
// (Device.Reset). The front-end keeps ownership, the memory table and the
// protocol features; it sets the rings and the features up again.
func (sess *session) resetDevice() {
	for _, r := range sess.rings {
		sess.stopRing(r)
		r.enabled = false
	}
	sess.s.dev.Reset()
}

// ---- memory ----

func (sess *session) setMemTable(m *vhostuser.Message, rs []vhostuser.MemRegion) error {
	slots := make([]slot, len(rs))
	for i, r := range rs {
		slots[i] = slot{MemRegion: r, file: m.Files[i]}
	}
	if err := sess.setSlots(slots); err != nil {
		return err
	}
	for i := range rs {
		m.TakeFile(i) // now owned by the slot
	}
	return nil
}

func (sess *session) addMemReg(m *vhostuser.Message, r vhostuser.MemRegion) error {
	if err := sess.needProtocol(vhostuser.ProtocolConfigureMemSlots); err != nil {
		return err
	}
	if n := sess.memSlots(); len(sess.slots) >= n {
		return fmt.Errorf("%w: all %d slots in use", ErrTooManyRegions, n)
	}
	slots := append(append([]slot(nil), sess.slots...), slot{MemRegion: r, file: m.Files[0]})
	if err := sess.setSlots(slots); err != nil {
		return err
	}
	m.TakeFile(0)
	return nil
}

// memSlots is how many regions the back-end offers (GET_MAX_MEM_SLOTS)
// and holds: each keeps its descriptor open, so a process with a small
// open-file limit (a sandboxed plugin's RLIMIT_NOFILE) offers fewer than
// vhostuser.MaxMemSlots rather than lose the connection when the kernel
// cannot pass it one more.
func (sess *session) memSlots() int {
	var lim unix.Rlimit
	// prlimit64 with no new limit: what the sandbox's filter allows.
	if err := unix.Prlimit(0, unix.RLIMIT_NOFILE, nil, &lim); err != nil {
		return vhostuser.MaxMemSlots
	}
	return memSlotsFor(lim.Cur, sess.s.info.NumQueues)
}

// Descriptors set aside from the open-file limit before memory slots:
// the process's own (standard streams, the plugin's sockets, the device's
// files, inflight region, back-end request channel, a message's MaxFDs in
// flight) plus kick, call and error eventfds per queue.
const (
	fdReserve     = 64
	fdReservePerQ = 3
	minMemSlots   = vhostuser.MaxMemTableRegions
)

// memSlotsFor gives memSlots' answer for an open-file limit and a queue
// count; never fewer than SET_MEM_TABLE's regions.
func memSlotsFor(nofile uint64, queues int) int {
	reserve := uint64(fdReserve + fdReservePerQ*queues)
	if nofile < reserve+minMemSlots {
		return minMemSlots
	}
	return int(min(nofile-reserve, vhostuser.MaxMemSlots))
}

func (sess *session) remMemReg(r vhostuser.MemRegion) error {
	if err := sess.needProtocol(vhostuser.ProtocolConfigureMemSlots); err != nil {
		return err
	}
	for i, s := range sess.slots {
		if s.GuestAddr == r.GuestAddr && s.UserAddr == r.UserAddr && s.Size == r.Size {
			slots := append(append([]slot(nil), sess.slots[:i]...), sess.slots[i+1:]...)
			return sess.setSlots(slots)
		}
	}
	return fmt.Errorf("%w: guest %#x size %#x user %#x", ErrNoSuchRegion, r.GuestAddr, r.Size, r.UserAddr)
}

// MaxGuestMemory bounds the guest memory a front-end may have mapped at
// once (all slots). Mapping a sparse file costs no memory, only address
// space: without a bound, eight regions of a huge sparse memfd fill the
// process's 128 TiB, and the Go runtime's next heap growth fails (a crash
// of the plugin, for every front-end). During a table change the old and
// the new table are both mapped, so twice this must fit.
const MaxGuestMemory = 16 << 40

// setSlots installs a new memory table: map it, stop every ring worker,
// move the started rings to the new memory, restart the workers, then
// unmap the old memory and close the files of old slots not in the new
// table. On error nothing changes (and the caller keeps the new files).
func (sess *session) setSlots(slots []slot) error {
	regions := make([]vhostuser.MemRegion, len(slots))
	for i, s := range slots {
		regions[i] = s.MemRegion
	}
	if err := vhostuser.CheckMemRegions(regions); err != nil {
		return err
	}
	var total uint64
	for i, s := range slots {
		if err := checkFileSize(s); err != nil {
			return fmt.Errorf("region %d: %w", i, err)
		}
		if s.Size > MaxGuestMemory-total {
			return fmt.Errorf("the memory table maps more than %d GiB in all", MaxGuestMemory>>30)
		}
		total += s.Size
	}
	var mem *guestmem.Memory
	if len(slots) > 0 {
		gr := make([]guestmem.Region, len(slots))
		for i, s := range slots {
			gr[i] = guestmem.Region{
				GuestAddr: guestmem.Addr(s.GuestAddr),
				Size:      s.Size,
				UserAddr:  s.UserAddr,
				File:      s.file,
				Offset:    s.MmapOffset,
			}
		}
		var err error
		if mem, err = guestmem.Map(gr); err != nil {
			return fmt.Errorf("map memory table: %w", err)
		}
	}

	for _, r := range sess.rings {
		sess.stopWorker(r)
	}
	old := sess.mem
	oldSlots := sess.slots
	sess.mem, sess.slots = mem, slots
	for _, r := range sess.rings {
		if r.started {
			sess.remap(r)
		}
	}
	sess.reconcileAll()
	if old != nil {
		old.Close()
	}
	keep := make(map[*os.File]bool, len(slots))
	for _, s := range slots {
		keep[s.file] = true
	}
	for _, s := range oldSlots {
		if !keep[s.file] {
			s.file.Close()
		}
	}
	return nil
}

// checkFileSize refuses a region that extends beyond the end of a regular
// file (a memfd): touching it would fault. A file truncated later still
// faults; ring workers recover from that (Protect).
func checkFileSize(s slot) error {
	var st unix.Stat_t
	rc, err := s.file.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("fstat memory region file: %w", serr)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil
	}
	if size := uint64(st.Size); s.Size > size || s.MmapOffset > size-s.Size {
		return fmt.Errorf("%w: region %#x+%#x lies beyond the end of its file (%d bytes)", vhostuser.ErrBadPayload, s.MmapOffset, s.Size, st.Size)
	}
	return nil
}

// queueConfig translates the ring's user addresses in mem.
func (sess *session) queueConfig(r *ring, mem *guestmem.Memory) (virtq.Config, error) {
	if mem == nil {
		return virtq.Config{}, ErrNoMemory
	}
	n := uint64(r.num)
	extra := uint64(0)
	if sess.features&vhostuser.FeatureRingEventIdx != 0 {
		extra = 2
	}
	desc, err := mem.TranslateUser(r.addr.Desc, 16*n)
	if err != nil {
		return virtq.Config{}, fmt.Errorf("ring %d descriptor table: %w", r.index, err)
	}
	avail, err := mem.TranslateUser(r.addr.Avail, 4+2*n+extra)
	if err != nil {
		return virtq.Config{}, fmt.Errorf("ring %d available ring: %w", r.index, err)
	}
	used, err := mem.TranslateUser(r.addr.Used, 4+8*n+extra)
	if err != nil {
		return virtq.Config{}, fmt.Errorf("ring %d used ring: %w", r.index, err)
	}
	return virtq.Config{
		Size:      r.num,
		DescTable: desc,
		AvailRing: avail,
		UsedRing:  used,
		EventIdx:  sess.features&vhostuser.FeatureRingEventIdx != 0,
		Indirect:  sess.features&vhostuser.FeatureRingIndirectDesc != 0,
		// A front-end reads the device's configuration (virtio-blk's
		// seg_max) before it sets the ring size: chains may be as long as
		// that configuration allows, whatever this ring's size.
		MaxChain: uint16(max(int(r.num), sess.s.info.MaxChain)),
	}, nil
}

// buildQueue makes the ring's queue in the current memory, positioned at
// the saved indexes.
func (sess *session) buildQueue(r *ring) error {
	cfg, err := sess.queueConfig(r, sess.mem)
	if err != nil {
		return err
	}
	q, err := virtq.NewQueue(sess.mem, cfg)
	if err != nil {
		return fmt.Errorf("ring %d: %w", r.index, err)
	}
	q.SetNextAvail(r.base)
	q.SetNextUsed(r.usedBase)
	r.q = q
	return nil
}

// saveQueue records the queue's indexes and drops it.
func (r *ring) saveQueue() {
	if r.q != nil {
		r.base, r.usedBase = r.q.NextAvail(), r.q.NextUsed()
		r.q = nil
	}
}

// remap moves a started ring (worker stopped) to the current memory. If
// the memory no longer covers it, the ring waits without a queue until a
// later table does.
func (sess *session) remap(r *ring) {
	if r.q != nil {
		if cfg, err := sess.queueConfig(r, sess.mem); err == nil && cfg == r.q.Config() {
			if err := r.q.SetMemory(sess.mem); err == nil {
				return
			}
		}
	}
	r.saveQueue()
	if err := sess.buildQueue(r); err != nil {
		sess.s.ringStopLog.Warn(sess.s.log, "ring not covered by the new memory table; paused", "queue", r.index, "error", err)
	}
}

// ---- rings ----

func (sess *session) setVringNum(s vhostuser.VringState) error {
	r, err := sess.ring(s.Index)
	if err != nil {
		return err
	}
	if r.started {
		return fmt.Errorf("%w: ring %d", ErrRingStarted, r.index)
	}
	if s.Num == 0 || s.Num > uint32(sess.s.info.MaxQueueSize) || s.Num&(s.Num-1) != 0 {
		return fmt.Errorf("%w: ring %d size %d is not a power of two in 1..%d", ErrBadValue, r.index, s.Num, sess.s.info.MaxQueueSize)
	}
	r.num = uint16(s.Num)
	return nil
}

func (sess *session) setVringAddr(a vhostuser.VringAddr) error {
	r, err := sess.ring(a.Index)
	if err != nil {
		return err
	}
	if r.num == 0 {
		return fmt.Errorf("%w: ring %d: SET_VRING_NUM first", ErrRingNotReady, r.index)
	}
	if r.started {
		// Only the logging flag may change on the fly.
		if r.addr.Desc != a.Desc || r.addr.Avail != a.Avail || r.addr.Used != a.Used {
			return fmt.Errorf("%w: ring %d addresses cannot change", ErrRingStarted, r.index)
		}
		r.addr = a
		return nil
	}
	// The spec's alignments (virtio 1.2, 2.7): the queue's own checks
	// apply to guest addresses, these to the front-end's.
	if a.Desc%16 != 0 || a.Avail%2 != 0 || a.Used%4 != 0 {
		return fmt.Errorf("%w: ring %d addresses desc %#x avail %#x used %#x not aligned to 16, 2 and 4 bytes", ErrBadValue, r.index, a.Desc, a.Avail, a.Used)
	}
	prev, prevSet := r.addr, r.addrSet
	r.addr, r.addrSet = a, true
	if _, err := sess.queueConfig(r, sess.mem); err != nil {
		r.addr, r.addrSet = prev, prevSet
		return err
	}
	return sess.tryStart(r)
}

func (sess *session) setVringBase(s vhostuser.VringState) error {
	r, err := sess.ring(s.Index)
	if err != nil {
		return err
	}
	if r.started {
		return fmt.Errorf("%w: ring %d", ErrRingStarted, r.index)
	}
	if s.Num > 0xffff {
		return fmt.Errorf("%w: ring %d base %#x (packed rings are not supported)", ErrBadValue, r.index, s.Num)
	}
	r.base, r.usedBase = uint16(s.Num), uint16(s.Num)
	return nil
}

func (sess *session) getVringBase(s vhostuser.VringState) ([]byte, error) {
	r, err := sess.ring(s.Index)
	if err != nil {
		return nil, err
	}
	sess.stopRing(r)
	r.call.swap(nil)
	return vhostuser.VringState{Index: s.Index, Num: uint32(r.base)}.Encode(), nil
}

func (sess *session) setVringKick(m *vhostuser.Message, v vhostuser.VringFD) error {
	r, err := sess.ring(v.Index)
	if err != nil {
		return err
	}
	var kick *os.File
	if !v.NoFD {
		if kick, err = nonBlockingDup(m.Files[0]); err != nil {
			return fmt.Errorf("ring %d kick: %w", r.index, err)
		}
	}
	sess.stopWorker(r)
	if r.kick != nil {
		r.kick.Close()
	}
	r.kick, r.kickSet = kick, true
	r.failed.Store(false)
	if r.started {
		sess.reconcile(r)
		return nil
	}
	return sess.tryStart(r)
}

// tryStart starts a ring once it has a size, addresses and a kick.
func (sess *session) tryStart(r *ring) error {
	if r.started || !r.kickSet || r.num == 0 || !r.addrSet {
		return nil
	}
	if err := sess.buildQueue(r); err != nil {
		return err
	}
	if err := sess.attachInflight(r); err != nil {
		r.q = nil
		return err
	}
	r.started = true
	r.failed.Store(false)
	sess.reconcile(r)
	return nil
}

func (sess *session) setVringCallErr(m *vhostuser.Message, v vhostuser.VringFD) error {
	r, err := sess.ring(v.Index)
	if err != nil {
		return err
	}
	var f *os.File
	if !v.NoFD {
		// Non-blocking, so that a full pipe can never block a worker.
		if f, err = nonBlockingDup(m.Files[0]); err != nil {
			return fmt.Errorf("ring %d %v: %w", r.index, m.Request, err)
		}
	}
	if m.Request == vhostuser.SetVringErr {
		r.errFD.swap(f)
		return nil
	}
	r.call.swap(f)
	if r.started && f != nil {
		// Completions signalled while the old (or no) descriptor was in
		// place would be lost; a spurious interrupt is harmless.
		r.call.signal()
	}
	return nil
}

func (sess *session) setVringEnable(s vhostuser.VringState) error {
	if !sess.protocolFeaturesNegotiated() && !sess.protocolSet {
		return fmt.Errorf("%w: VHOST_USER_F_PROTOCOL_FEATURES", ErrNotNegotiated)
	}
	r, err := sess.ring(s.Index)
	if err != nil {
		return err
	}
	if s.Num > 1 {
		return fmt.Errorf("%w: ring %d enable %d", ErrBadValue, r.index, s.Num)
	}
	r.enabled = s.Num == 1
	sess.reconcile(r)
	return nil
}

// stopRing stops the ring (GET_VRING_BASE semantics): worker stopped,
// indexes saved, kick closed; it must be started again by SET_VRING_KICK.
func (sess *session) stopRing(r *ring) {
	sess.stopWorker(r)
	r.saveQueue()
	r.started = false
	if r.track != nil && len(r.resubmit) == 0 {
		// A ring stopped cleanly completed every request it took (it
		// waits for them): nothing is in flight. The part is forgotten
		// only when it says so too, whatever r.failed says: one the
		// guest broke completed everything, and the driver's reset lays
		// the ring out afresh (its used index from 0), which a kept part
		// would contradict; one that faulted or whose handler panicked
		// dropped requests a successor resubmits, also when it failed
		// while this stop waited for it (its worker then sees its
		// context cancelled and records no failure; found in review,
		// helper-153: the dropped request was lost and a completed one
		// served again).
		Protect(func() error {
			if r.track.idle() {
				r.track.forget()
			}
			return nil
		})
	}
	r.track, r.resubmit = nil, nil
	if r.kick != nil {
		r.kick.Close()
	}
	r.kick, r.kickSet = nil, false
	r.failed.Store(false)
}

func (sess *session) reconcileAll() {
	for _, r := range sess.rings {
		sess.reconcile(r)
	}
}

// reconcile starts or stops the ring's worker to match its state.
func (sess *session) reconcile(r *ring) {
	run := r.started && r.q != nil && (r.enabled || !sess.protocolFeaturesNegotiated()) && !r.failed.Load()
	switch {
	case run && r.done == nil:
		sess.startWorker(r)
	case !run && r.done != nil:
		sess.stopWorker(r)
	}
}

func (sess *session) startWorker(r *ring) {
	ctx, cancel := context.WithCancel(sess.ctx)
	done := make(chan struct{})
	r.cancel, r.done = cancel, done
	rc := ringConfig{index: r.index, q: r.q, kick: r.kick, call: &r.call, stats: r.stats, log: sess.s.log,
		track: r.track, resubmit: &r.resubmit, hook: sess.s.testHook, malformedLog: &sess.s.malformedLog}
	log := sess.s.log
	dev := sess.s.dev
	r.stats.running.Store(true)
	log.Debug("queue started", "queue", r.index)
	go func() {
		defer close(done)
		err := serveRing(ctx, dev, rc)
		r.stats.running.Store(false)
		if ctx.Err() != nil {
			// Stopped by the message loop. A fault while stopping means
			// guest memory went away under an idle ring (a front-end
			// that truncated it); the ring is stopping anyway.
			var fe *FaultError
			switch {
			case err == nil:
			case errors.As(err, &fe):
				log.Debug("queue stopped; guest memory was unusable", "queue", r.index, "error", err)
			default:
				sess.s.ringStopLog.Warn(log, "queue stopped with an error", "queue", r.index, "error", err)
			}
			return
		}
		// The ring failed on its own: logged before it is counted, so
		// whoever sees the count finds the line.
		r.failed.Store(true)
		var fe *FaultError
		switch {
		case errors.As(err, &fe) && !sess.faultLogged.CompareAndSwap(false, true):
			// The front-end's memory is broken for every ring; the
			// first fault said so.
			log.Debug("queue failed on a memory fault too", "queue", r.index, "error", err)
		case errors.Is(err, virtq.ErrQueueBroken):
			// Not the back-end's failure: the driver's (one line, not
			// an ERROR; a guest breaks rings at will, so spaced too).
			sess.s.ringFailedLog.Warn(log, "the guest broke a queue; it stays stopped until the front-end restarts it (the driver's reset)", "queue", r.index, "error", err)
		default:
			args := []any{"queue", r.index, "error", err}
			var pe *PanicError
			if errors.As(err, &pe) {
				args = append(args, "stack", string(pe.Stack)) // a device bug: where it is
			}
			sess.s.ringFailedLog.Error(log, "queue failed; it serves nothing more until the front-end resets it or the plugin is replaced (krun-core restarts a plugin whose ring failed)", args...)
		}
		r.stats.failures.Add(1)
		// The owner hears first: a front-end woken by the error eventfd
		// asks the plugin's health (krun-core does, to tell a failed
		// plugin from a ring the guest broke), and finds it said.
		if f := sess.s.RingFailed; f != nil {
			f(r.index, err)
		}
		r.errFD.signal()
	}()
}

// serveRing asks the device how to serve the ring and runs the ring engine
// until ctx is done (nil) or the ring fails (the error). The context the
// device gets ends in both cases.
func serveRing(parent context.Context, dev Device, rc ringConfig) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	var qc QueueConfig
	err := Protect(func() error {
		var err error
		qc, err = dev.Queue(ctx, rc.index)
		return err
	})
	if err != nil {
		return fmt.Errorf("queue %d: device: %w", rc.index, err)
	}
	e, err := newEngine(rc, qc)
	if err != nil {
		return fmt.Errorf("queue %d: %w", rc.index, err)
	}
	return e.run(ctx, cancel)
}

// stopWorker cancels the ring's worker and waits for it to return.
func (sess *session) stopWorker(r *ring) {
	if r.done == nil {
		return
	}
	r.cancel()
	stuckAfter := sess.s.StuckWorkerTimeout
	if stuckAfter <= 0 {
		stuckAfter = DefaultStuckWorkerTimeout
	}
	warn, stuck := time.NewTimer(min(5*time.Second, stuckAfter)), time.NewTimer(stuckAfter)
	defer warn.Stop()
	defer stuck.Stop()
	for waiting := true; waiting; {
		select {
		case <-r.done:
			waiting = false
		case <-warn.C:
			sess.s.log.Warn("queue worker is slow to stop", "queue", r.index)
		case <-stuck.C:
			// Still waiting: a request in a device's Handle cannot be
			// taken back. Whoever runs the server may replace it.
			sess.s.log.Error("queue worker has not stopped: a request never completes, or the front-end does not take its notifications", "queue", r.index, "waited", stuckAfter)
			if f := sess.s.RingFailed; f != nil {
				f(r.index, ErrWorkerStuck)
			}
		}
	}
	r.cancel, r.done = nil, nil
}

// ---- inflight I/O tracking ----

// getInflightFD allocates a zeroed inflight region laid out for the queue
// count and size the front-end asks for, and hands it over. It is not used
// until the front-end gives it back with SET_INFLIGHT_FD.
func (sess *session) getInflightFD(in vhostuser.Inflight) ([]byte, error) {
	if err := sess.needProtocol(vhostuser.ProtocolInflightSHMFD); err != nil {
		return nil, err
	}
	f, size, err := newInflightFile(in)
	if err != nil {
		return nil, err
	}
	sess.replyFiles = append(sess.replyFiles, f)
	out := vhostuser.Inflight{MmapSize: size, NumQueues: in.NumQueues, QueueSize: in.QueueSize}
	return out.Encode(), nil
}

// setInflightFD maps the region rings track their requests in; a ring
// that starts afterwards recovers what a previous back-end left in it.
// Rings must be stopped.
func (sess *session) setInflightFD(m *vhostuser.Message, in vhostuser.Inflight) error {
	if err := sess.needProtocol(vhostuser.ProtocolInflightSHMFD); err != nil {
		return err
	}
	for _, r := range sess.rings {
		if r.started {
			return fmt.Errorf("%w: ring %d: the inflight region cannot change while it runs", ErrRingStarted, r.index)
		}
	}
	reg, err := mapInflight(m.Files[0], in)
	if err != nil {
		return err
	}
	sess.devState.detach()
	sess.devState = nil
	sess.inflight.close()
	sess.inflight = reg
	if sk, ok := sess.s.dev.(StateKeeper); ok && reg.state != nil {
		sess.devState = newDeviceState(reg.state)
		sk.UseState(sess.devState)
	}
	sess.s.log.Debug("in-flight region from the front-end", "queues", in.NumQueues, "queue_size", in.QueueSize)
	return nil
}

// attachInflight gives a starting ring its part of the inflight region:
// a fresh part is initialized; one a previous back-end used is recovered,
// and the ring then resumes after the heads it resubmits (the used index
// in guest memory plus their number), whatever base the front-end set (a
// front-end whose back-end died cannot know it). Guest memory and the
// region are read with faults caught (the message loop runs under
// Protect).
func (sess *session) attachInflight(r *ring) error {
	r.track, r.resubmit = nil, nil
	b := sess.inflight.queue(r.index)
	if b == nil {
		return nil
	}
	used := r.q.UsedIndex()
	t, heads, err := newTracker(b, sess.inflight.queueSize, r.num, used)
	if err != nil {
		return fmt.Errorf("ring %d: %w", r.index, err)
	}
	// Every head a back-end left in flight was taken from the available
	// ring: there are at most as many as the driver made available
	// beyond the used index. More are forged (a compromised back-end
	// wrote the region): resubmitting them would serve chains the driver
	// never handed over, complete them to it, and start past its
	// available index (found in review, helper-153). A driver that moved
	// its available index by more than the ring breaks the ring anyway
	// (Pending's error), as it would without the region.
	r.q.SetNextAvail(used)
	if len(heads) > 0 {
		if p, err := r.q.Pending(); err == nil && int(p) < len(heads) {
			return fmt.Errorf("ring %d: %w: %d requests in flight, the driver made %d available beyond the used index %d",
				r.index, errInflightCorrupt, len(heads), p, used)
		}
	}
	r.q.SetNextAvail(used + uint16(len(heads)))
	r.q.SetNextUsed(used)
	r.track, r.resubmit = t, heads
	if len(heads) > 0 {
		sess.s.log.Info("resubmitting requests a previous back-end left in flight", "queue", r.index, "requests", len(heads))
	}
	return nil
}
