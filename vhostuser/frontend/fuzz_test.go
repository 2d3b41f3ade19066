package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
)

// The client fuzzer plays a hostile back-end: a compromised plugin that
// answers every request the core's front-end waits for with whatever the
// fuzzer chose. An input is a mode byte, then records, one per reply the
// back-end sends:
//
//	ctl byte, payload length (u16 LE, at most fuzzMaxRecord), payload
//
// ctl bit 0: raw: the payload is written to the socket as it is (headers
// included: several messages, half a message, a header claiming any size;
// nothing at all makes the client wait for its timeout). Otherwise the
// payload gets a header: the request it answers (bit 1: the next request
// code instead), the reply flag (bit 2: left out) and, with bit 3, the
// need_reply flag too.
// ctl bits 4-6: the descriptors sent with it (fuzzFDKind).
// ctl bit 7: the back-end closes the connection after this reply.
//
// The back-end takes a record for each request the client waits for a
// reply to (a reply body, or REPLY_ACK) and, when the client gives it a
// back-end request channel (SET_BACKEND_REQ_FD), one more that it writes
// raw to that channel first. When the records run out it closes the
// connection.
//
// The mode byte picks the front-end's side: bit 0 drops REPLY_ACK from
// the protocol features it wants, bit 1 forces ADD_MEM_REG, bit 2 runs
// Reattach (with an inflight region) instead of Setup, bit 3 gives the
// queue an error eventfd and leaves it disabled.
//
// Whatever the back-end does, every call must return (no hang: the
// client's timeout is short, and the whole input must finish within
// fuzzExecLimit), nothing may panic, the values the core uses must be
// what it asked for (config bytes of the asked size, an inflight region
// of the core's own that its queues can need), and every descriptor the
// back-end sent must be closed once the client is.
const (
	fuzzRaw       = 1 << 0
	fuzzWrongReq  = 1 << 1
	fuzzNoReply   = 1 << 2
	fuzzNeedReply = 1 << 3
	fuzzFDShift   = 4
	fuzzClose     = 1 << 7

	fuzzMaxRecord = 2*vhostuser.MaxPayloadSize + 64

	fuzzModeNoAck     = 1 << 0
	fuzzModeAddMemReg = 1 << 1
	fuzzModeReattach  = 1 << 2
	fuzzModeErrQueue  = 1 << 3

	fuzzTimeout   = 10 * time.Millisecond
	fuzzExecLimit = 10 * time.Second
)

// fuzzFDKind is what ctl bits 4-6 attach to a reply.
const (
	fdNone      = iota
	fdMemfd     // a memfd of fuzzRegionSize bytes (a valid inflight region)
	fdEmptyFile // a memfd of 0 bytes
	fdPipe      // a pipe's read end
	fdDiskFile  // a regular file that is no memfd, fuzzRegionSize bytes
	fdTwoMemfds // two memfds
	fdSocket    // a unix socket
	fdTooMany   // MaxFDs+1 eventfds
)

const fuzzRegionSize = 4096

// fuzzFiles are the descriptors the hostile back-end sends and the ones
// the front-end gives it (memory, eventfds); made once per fuzz worker,
// since the kernel duplicates whatever is sent.
type fuzzFiles struct {
	memfd, empty, pipeR, pipeW, disk, sockA, sockB, ev, ram *os.File
}

func newClientFuzzFiles(tb testing.TB) *fuzzFiles {
	memfd := func(name string, size int64) *os.File {
		fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
		if err != nil {
			tb.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), name)
		if err := f.Truncate(size); err != nil {
			tb.Fatal(err)
		}
		return f
	}
	ff := &fuzzFiles{memfd: memfd("fuzz-inflight", fuzzRegionSize), empty: memfd("fuzz-empty", 0), ram: memfd("fuzz-ram", 1<<20)}
	var err error
	if ff.pipeR, ff.pipeW, err = os.Pipe(); err != nil {
		tb.Fatal(err)
	}
	if ff.disk, err = os.CreateTemp(tb.TempDir(), "fuzz-disk"); err != nil {
		tb.Fatal(err)
	}
	if err := ff.disk.Truncate(fuzzRegionSize); err != nil {
		tb.Fatal(err)
	}
	if ff.sockA, ff.sockB, err = vhostuser.SocketPair(); err != nil {
		tb.Fatal(err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		tb.Fatal(err)
	}
	ff.ev = os.NewFile(uintptr(efd), "fuzz-eventfd")
	if c, ok := tb.(interface{ Cleanup(func()) }); ok {
		c.Cleanup(func() {
			for _, f := range []*os.File{ff.memfd, ff.empty, ff.pipeR, ff.pipeW, ff.disk, ff.sockA, ff.sockB, ff.ev, ff.ram} {
				f.Close()
			}
		})
	}
	return ff
}

// fds returns the raw descriptors of kind.
func (ff *fuzzFiles) fds(kind int) []int {
	fd := func(f *os.File) int { return int(f.Fd()) }
	switch kind {
	case fdMemfd:
		return []int{fd(ff.memfd)}
	case fdEmptyFile:
		return []int{fd(ff.empty)}
	case fdPipe:
		return []int{fd(ff.pipeR)}
	case fdDiskFile:
		return []int{fd(ff.disk)}
	case fdTwoMemfds:
		return []int{fd(ff.memfd), fd(ff.memfd)}
	case fdSocket:
		return []int{fd(ff.sockA)}
	case fdTooMany:
		fds := make([]int, vhostuser.MaxFDs+1)
		for i := range fds {
			fds[i] = fd(ff.ev)
		}
		return fds
	}
	return nil
}

// fuzzRecord is one reply of the hostile back-end.
type fuzzRecord struct {
	ctl     byte
	payload []byte
}

func (r fuzzRecord) encode() []byte {
	b := []byte{r.ctl}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(r.payload)))
	return append(b, r.payload...)
}

// fuzzScript hands out an input's records in order.
type fuzzScript struct {
	data []byte
	// gen, when set, makes the records instead (valid replies, to build
	// the seed corpus), and rec collects them.
	gen func(m *vhostuser.Message, channel bool) fuzzRecord
	rec []byte
}

func (s *fuzzScript) next(m *vhostuser.Message, channel bool) (fuzzRecord, bool) {
	if s.gen != nil {
		r := s.gen(m, channel)
		s.rec = append(s.rec, r.encode()...)
		return r, true
	}
	if len(s.data) < 3 {
		return fuzzRecord{}, false
	}
	r := fuzzRecord{ctl: s.data[0]}
	n := min(int(binary.LittleEndian.Uint16(s.data[1:])), fuzzMaxRecord, len(s.data)-3)
	r.payload = s.data[3 : 3+n]
	s.data = s.data[3+n:]
	return r, true
}

// wire is what the back-end writes for r, the reply to m.
func (r fuzzRecord) wire(m *vhostuser.Message) []byte {
	if r.ctl&fuzzRaw != 0 {
		return r.payload
	}
	req := m.Request
	if r.ctl&fuzzWrongReq != 0 {
		req++
	}
	flags := vhostuser.Version | vhostuser.FlagReply
	if r.ctl&fuzzNoReply != 0 {
		flags &^= vhostuser.FlagReply
	}
	if r.ctl&fuzzNeedReply != 0 {
		flags |= vhostuser.FlagNeedReply
	}
	b := make([]byte, vhostuser.HeaderSize, vhostuser.HeaderSize+len(r.payload))
	vhostuser.Header{Request: req, Flags: flags, Size: uint32(len(r.payload))}.Encode(b)
	return append(b, r.payload...)
}

// writeRecord writes r's bytes, with its descriptors, to the socket fd.
func (ff *fuzzFiles) writeRecord(fd int, b []byte, ctl byte) error {
	var oob []byte
	if fds := ff.fds(int(ctl>>fuzzFDShift) & 7); len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if len(b) == 0 {
		return nil // nothing to say: the client waits for its timeout
	}
	n, err := unix.SendmsgN(fd, b, oob, nil, unix.MSG_NOSIGNAL)
	for err == nil && n < len(b) {
		var k int
		k, err = unix.Write(fd, b[n:])
		n += k
	}
	return err
}

// hostileBackend serves the client's end of conn from script until the
// connection closes or the records run out.
func hostileBackend(ff *fuzzFiles, conn *vhostuser.Conn, s *fuzzScript, channels *[]*os.File) {
	defer conn.Close()
	raw, err := conn.UnixConn().File()
	if err != nil {
		return
	}
	defer raw.Close()
	fd := int(raw.Fd()) // blocking; the client reads or closes its end
	for {
		m, err := conn.Recv()
		if err != nil {
			return
		}
		if m.Request == vhostuser.SetBackendReqFD && len(m.Files) == 1 {
			ch := m.TakeFile(0)
			*channels = append(*channels, ch)
			r, ok := s.next(m, true)
			if !ok {
				m.CloseFiles()
				return
			}
			ff.writeRecord(int(ch.Fd()), r.payload, r.ctl)
		}
		m.CloseFiles()
		if !vhostuser.HasReply(m.Request) && !m.NeedReply() {
			continue
		}
		r, ok := s.next(m, false)
		if !ok {
			return
		}
		if ff.writeRecord(fd, r.wire(m), r.ctl) != nil || r.ctl&fuzzClose != 0 {
			return
		}
	}
}

// validReply is what a well-behaved back-end with every protocol feature
// answers (the seeds).
func validReply(m *vhostuser.Message, channel bool) fuzzRecord {
	if channel {
		// A config change that asks for a reply.
		b := make([]byte, vhostuser.HeaderSize)
		vhostuser.Header{Request: vhostuser.Request(vhostuser.BackendConfigChangeMsg), Flags: vhostuser.Version | vhostuser.FlagNeedReply}.Encode(b)
		return fuzzRecord{ctl: fuzzRaw, payload: b}
	}
	u64 := func(v uint64) fuzzRecord { return fuzzRecord{payload: vhostuser.EncodeU64(v)} }
	switch m.Request {
	case vhostuser.GetFeatures:
		return u64(vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | vhostuser.FeatureRingEventIdx)
	case vhostuser.GetProtocolFeatures:
		return u64(SupportedProtocolFeatures | vhostuser.ProtocolStatus)
	case vhostuser.GetQueueNum:
		return u64(2)
	case vhostuser.GetMaxMemSlots:
		return u64(32)
	case vhostuser.GetVringBase:
		s, _ := vhostuser.DecodeVringState(m.Payload)
		return fuzzRecord{payload: vhostuser.VringState{Index: s.Index, Num: 42}.Encode()}
	case vhostuser.GetConfig:
		c, _ := vhostuser.DecodeConfigSpace(append([]byte(nil), m.Payload...))
		for i := range c.Data {
			c.Data[i] = byte(int(c.Offset) + i)
		}
		return fuzzRecord{payload: c.Encode()}
	case vhostuser.GetInflightFD:
		in, _ := vhostuser.DecodeInflight(m.Payload)
		in.MmapSize, in.MmapOffset = fuzzRegionSize, 0
		return fuzzRecord{ctl: fdMemfd << fuzzFDShift, payload: in.Encode()}
	}
	return u64(0) // REPLY_ACK: success
}

// fuzzQueues are the rings the front-end sets up: 2 queues of 16.
const (
	fuzzNumQueues = 2
	fuzzQueueSize = 16
)

// driveClient runs the front-end through negotiation, set-up and the
// requests the core makes later, checking what each returns. Errors are
// expected (the back-end is hostile); wrong values are not.
func driveClient(t testing.TB, ff *fuzzFiles, c *Client, mode byte, strict bool) {
	// Once the client says the back-end is gone, it is gone for every
	// later request: the client never reads on in a stream it lost.
	var gone error
	checkErr := func(t testing.TB, what string, err error) {
		t.Helper()
		checkError(t, strict, what, err)
		if gone != nil && !Gone(err) {
			t.Fatalf("%s after the back-end was gone (%v): %v", what, gone, err)
		}
		if gone == nil && Gone(err) {
			gone = err
		}
	}
	cfg := SetupConfig{
		Features:         ^uint64(0),
		ProtocolFeatures: SupportedProtocolFeatures,
		UseAddMemReg:     mode&fuzzModeAddMemReg != 0,
		Regions: []MemRegion{
			{MemRegion: vhostuser.MemRegion{GuestAddr: 0, Size: 1 << 19, UserAddr: 0x7f0000000000}, File: ff.ram},
			{MemRegion: vhostuser.MemRegion{GuestAddr: 1 << 19, Size: 1 << 19, UserAddr: 0x7f0000080000, MmapOffset: 1 << 19}, File: ff.ram},
		},
	}
	if mode&fuzzModeNoAck != 0 {
		cfg.ProtocolFeatures &^= vhostuser.ProtocolReplyAck
	}
	for i := range fuzzNumQueues {
		q := QueueSetup{Index: uint32(i), Size: fuzzQueueSize, Desc: 0x7f0000001000, Avail: 0x7f0000002000, Used: 0x7f0000003000, Kick: ff.ev, Call: ff.ev}
		if mode&fuzzModeErrQueue != 0 && i == 1 {
			q.Err, q.Disabled = ff.ev, true
		}
		cfg.Queues = append(cfg.Queues, q)
	}

	var n Negotiated
	var err error
	if mode&fuzzModeReattach != 0 {
		prev := Negotiated{Features: vhostuser.FeatureVersion1, ProtocolFeatures: vhostuser.ProtocolInflightSHMFD}
		f, ferr := newRegionFile(fuzzRegionSize)
		if ferr != nil {
			t.Fatal(ferr)
		}
		in := &Inflight{Inflight: vhostuser.Inflight{MmapSize: fuzzRegionSize, NumQueues: fuzzNumQueues, QueueSize: fuzzQueueSize}, File: f}
		n, err = c.Reattach(cfg, prev, in)
		in.Close()
		if err == nil {
			if prev.Features&^n.OfferedFeatures != 0 || prev.ProtocolFeatures&^n.ProtocolFeatures != 0 {
				t.Fatalf("Reattach accepted a back-end without the previous features: %+v", n)
			}
			for _, q := range cfg.Queues {
				err = errors.Join(err, c.SetupQueue(q, n.Features&vhostuser.FeatureProtocolFeatures != 0))
			}
		}
	} else {
		n, err = c.Setup(cfg)
	}
	checkErr(t, "Setup", err)
	checkNegotiated(t, cfg, n, err)

	for _, a := range [][2]uint32{{0, 36}, {8, 4}, {0, vhostuser.MaxConfigSize}, {vhostuser.MaxConfigSize - 1, 1}} {
		b, err := c.GetConfig(a[0], a[1])
		if err == nil && len(b) != int(a[1]) {
			t.Fatalf("GetConfig(%d, %d) returned %d bytes", a[0], a[1], len(b))
		}
		checkErr(t, "GetConfig", err)
	}
	checkErr(t, "SetConfig", c.SetConfig(0, vhostuser.ConfigFlagWritable, []byte{1, 2, 3, 4}))
	_, err = c.GetVringBase(0)
	checkErr(t, "GetVringBase", err)
	checkErr(t, "DisableVringWithin", c.DisableVringWithin(1, 0))
	checkInflight(t, c, checkErr)

	var changes atomic.Int32
	stop, err := c.BackendRequests(func() { changes.Add(1) })
	if c.ProtocolFeatures()&vhostuser.ProtocolBackendReq != 0 {
		checkErr(t, "BackendRequests", err)
	} else if err == nil {
		t.Fatal("BackendRequests without BACKEND_REQ")
	}
	if err == nil {
		defer stop()
	}
	checkErr(t, "ResetDevice", c.ResetDeviceWithin(0))
	_, err = c.GetQueueNum()
	checkErr(t, "GetQueueNum", err)
	_, err = c.GetMaxMemSlots()
	checkErr(t, "GetMaxMemSlots", err)
	checkErr(t, "RemMemReg", c.RemMemReg(cfg.Regions[1].MemRegion))
}

// checkError fails on an error that says nothing (every failure must name
// what failed), and on any error when strict (a well-behaved back-end).
func checkError(t testing.TB, strict bool, what string, err error) {
	t.Helper()
	if err != nil && strict {
		t.Fatalf("%s against a well-behaved back-end: %v", what, err)
	}
	if err != nil && err.Error() == "" {
		t.Fatalf("%s: empty error", what)
	}
}

// checkNegotiated checks that what Setup or Reattach reports as
// negotiated is within what the front-end asked for and the back-end
// offered.
func checkNegotiated(t testing.TB, cfg SetupConfig, n Negotiated, err error) {
	if p := n.ProtocolFeatures &^ (n.OfferedProtocol & cfg.ProtocolFeatures & SupportedProtocolFeatures); p != 0 {
		t.Fatalf("protocol features %#x acked beyond the offer %#x and the wish %#x", n.ProtocolFeatures, n.OfferedProtocol, cfg.ProtocolFeatures)
	}
	if f := n.Features &^ n.OfferedFeatures; f != 0 {
		t.Fatalf("features %#x acked beyond the offer %#x", n.Features, n.OfferedFeatures)
	}
	if err != nil {
		return
	}
	if n.ProtocolFeatures&vhostuser.ProtocolMQ != 0 {
		for _, q := range cfg.Queues {
			if uint64(q.Index) >= n.MaxQueues {
				t.Fatalf("queue %d accepted with %d queues", q.Index, n.MaxQueues)
			}
		}
	}
}

// checkInflight asks for an inflight region and checks that what the core
// would keep is its own sealed memfd of a size its queues can need.
func checkInflight(t testing.TB, c *Client, checkErr func(testing.TB, string, error)) {
	in, err := c.GetInflightFD(fuzzNumQueues, fuzzQueueSize)
	checkErr(t, "GetInflightFD", err)
	if err != nil {
		if in != nil {
			t.Fatalf("GetInflightFD returned a region with error %v", err)
		}
		return
	}
	defer in.Close()
	if in.NumQueues != fuzzNumQueues || in.QueueSize != fuzzQueueSize || in.MmapOffset != 0 {
		t.Fatalf("inflight region %+v, asked %d queues of %d", in.Inflight, fuzzNumQueues, fuzzQueueSize)
	}
	if in.MmapSize == 0 || in.MmapSize > maxInflightBytes(fuzzNumQueues, fuzzQueueSize) {
		t.Fatalf("inflight region of %d bytes for %d queues of %d", in.MmapSize, fuzzNumQueues, fuzzQueueSize)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(in.File.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if uint64(st.Size) != in.MmapSize {
		t.Fatalf("inflight file of %d bytes, region %d", st.Size, in.MmapSize)
	}
	seals, err := unix.FcntlInt(in.File.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&(unix.F_SEAL_SHRINK|unix.F_SEAL_GROW) != unix.F_SEAL_SHRINK|unix.F_SEAL_GROW {
		t.Fatalf("inflight region is not the front-end's sealed memfd: seals %#x, %v", seals, err)
	}
	if err := in.Reset(); err != nil {
		t.Fatalf("reset the front-end's own region: %v", err)
	}
	for i := range fuzzNumQueues {
		if err := in.ResetQueue(i); err != nil {
			t.Fatalf("reset queue %d of the front-end's own region: %v", i, err)
		}
	}
	checkErr(t, "SetInflightFD", c.SetInflightFD(in))
}

// runClientInput runs one input: the hostile back-end on one end of a
// socket pair, the front-end on the other. It returns the records the
// back-end sent when gen makes them.
func runClientInput(t testing.TB, ff *fuzzFiles, data []byte, gen func(*vhostuser.Message, bool) fuzzRecord) []byte {
	if len(data) == 0 {
		return nil
	}
	mode, s := data[0], &fuzzScript{data: data[1:], gen: gen}
	// A hang is a crash, with every goroutine's stack.
	watchdog := time.AfterFunc(fuzzExecLimit, func() {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		panic(fmt.Sprintf("front-end did not finish within %v:\n%s", fuzzExecLimit, buf))
	})
	defer watchdog.Stop()
	before := openFDs(t)
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	c := New(a)
	// Short, for a fuzzer that makes the client wait often; a
	// well-behaved back-end's replies must never be late.
	timeout := fuzzTimeout
	if gen != nil {
		timeout = DefaultTimeout
	}
	c.SetTimeout(timeout)
	c.SetStopTimeout(timeout)
	var channels []*os.File
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		hostileBackend(ff, b, s, &channels)
	}()
	func() {
		defer func() {
			c.Close()
			wg.Wait()
			for _, ch := range channels {
				ch.Close()
			}
		}()
		driveClient(t, ff, c, mode, gen != nil)
	}()
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors open before, %d after", before, after)
	}
	if gen != nil {
		return append([]byte{mode}, s.rec...)
	}
	return nil
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// FuzzClient fuzzes the front-end against a hostile back-end (see the
// comment at the top).
func FuzzClient(f *testing.F) {
	ff := newClientFuzzFiles(f)
	for _, mode := range []byte{0, fuzzModeNoAck, fuzzModeAddMemReg, fuzzModeReattach, fuzzModeReattach | fuzzModeNoAck, fuzzModeErrQueue | fuzzModeAddMemReg | fuzzModeNoAck} {
		f.Add(runClientInput(f, ff, []byte{mode}, validReply))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		runClientInput(t, ff, data, nil)
	})
}
