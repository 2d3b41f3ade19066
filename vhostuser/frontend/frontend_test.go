package frontend

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
)

// fakeBackend answers requests with a scripted function and records them.
type fakeBackend struct {
	conn   *vhostuser.Conn
	reqs   chan *vhostuser.Message
	answer func(m *vhostuser.Message) (payload []byte, reply bool)
}

func newFake(t *testing.T, answer func(m *vhostuser.Message) ([]byte, bool)) (*Client, *fakeBackend) {
	t.Helper()
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeBackend{conn: b, reqs: make(chan *vhostuser.Message, 100), answer: answer}
	go func() {
		defer close(f.reqs)
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			f.reqs <- m
			if p, ok := f.answer(m); ok {
				if err := b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, p, nil); err != nil {
					return
				}
			}
		}
	}()
	c := New(a)
	t.Cleanup(func() { c.Close(); b.Close() })
	return c, f
}

func (f *fakeBackend) next(t *testing.T) *vhostuser.Message {
	t.Helper()
	m, ok := <-f.reqs
	if !ok {
		t.Fatal("fake back-end saw no request")
	}
	return m
}

// standard answers like a back-end without REPLY_ACK.
func standard(m *vhostuser.Message) ([]byte, bool) {
	switch m.Request {
	case vhostuser.GetFeatures:
		return vhostuser.EncodeU64(vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | vhostuser.FeatureRingEventIdx | 1<<9), true
	case vhostuser.GetProtocolFeatures:
		return vhostuser.EncodeU64(vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck | vhostuser.ProtocolLogSHMFD), true
	case vhostuser.GetQueueNum:
		return vhostuser.EncodeU64(2), true
	case vhostuser.GetMaxMemSlots:
		return vhostuser.EncodeU64(32), true
	case vhostuser.GetVringBase:
		s, _ := vhostuser.DecodeVringState(m.Payload)
		return vhostuser.VringState{Index: s.Index, Num: 42}.Encode(), true
	case vhostuser.GetConfig:
		c, _ := vhostuser.DecodeConfigSpace(append([]byte(nil), m.Payload...))
		for i := range c.Data {
			c.Data[i] = byte(int(c.Offset) + i)
		}
		return c.Encode(), true
	}
	if m.NeedReply() {
		return vhostuser.EncodeU64(0), true
	}
	return nil, false
}

func TestClientMessages(t *testing.T) {
	c, f := newFake(t, standard)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	region := vhostuser.MemRegion{GuestAddr: 0x1000, Size: 0x2000, UserAddr: 0x7f0000001000, MmapOffset: 0x1000}
	tests := []struct {
		name    string
		call    func() (any, error)
		want    any
		req     vhostuser.Request
		payload []byte
		nfds    int
	}{
		{"GetFeatures", func() (any, error) { return c.GetFeatures() }, vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | vhostuser.FeatureRingEventIdx | 1<<9, vhostuser.GetFeatures, nil, 0},
		{"SetFeatures", func() (any, error) { return nil, c.SetFeatures(7) }, nil, vhostuser.SetFeatures, vhostuser.EncodeU64(7), 0},
		{"GetProtocolFeatures", func() (any, error) { return c.GetProtocolFeatures() }, vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck | vhostuser.ProtocolLogSHMFD, vhostuser.GetProtocolFeatures, nil, 0},
		{"SetOwner", func() (any, error) { return nil, c.SetOwner() }, nil, vhostuser.SetOwner, nil, 0},
		{"ResetOwner", func() (any, error) { return nil, c.ResetOwner() }, nil, vhostuser.ResetOwner, nil, 0},
		{"SetMemTable", func() (any, error) {
			return nil, c.SetMemTable([]MemRegion{{MemRegion: region, File: w}, {MemRegion: vhostuser.MemRegion{GuestAddr: 0x10000, Size: 4096, UserAddr: 0x8000000}, File: w}})
		}, nil, vhostuser.SetMemTable, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region, {GuestAddr: 0x10000, Size: 4096, UserAddr: 0x8000000}}), 2},
		{"GetMaxMemSlots", func() (any, error) { return c.GetMaxMemSlots() }, uint64(32), vhostuser.GetMaxMemSlots, nil, 0},
		{"AddMemReg", func() (any, error) { return nil, c.AddMemReg(MemRegion{MemRegion: region, File: w}) }, nil, vhostuser.AddMemReg, vhostuser.EncodeSingleMemRegion(region), 1},
		{"RemMemReg", func() (any, error) { return nil, c.RemMemReg(region) }, nil, vhostuser.RemMemReg, vhostuser.EncodeSingleMemRegion(region), 0},
		{"SetVringNum", func() (any, error) { return nil, c.SetVringNum(1, 256) }, nil, vhostuser.SetVringNum, vhostuser.VringState{Index: 1, Num: 256}.Encode(), 0},
		{"SetVringAddr", func() (any, error) {
			return nil, c.SetVringAddr(vhostuser.VringAddr{Index: 1, Desc: 1, Used: 2, Avail: 3})
		}, nil, vhostuser.SetVringAddr, vhostuser.VringAddr{Index: 1, Desc: 1, Used: 2, Avail: 3}.Encode(), 0},
		{"SetVringBase", func() (any, error) { return nil, c.SetVringBase(1, 9) }, nil, vhostuser.SetVringBase, vhostuser.VringState{Index: 1, Num: 9}.Encode(), 0},
		{"GetVringBase", func() (any, error) { return c.GetVringBase(1) }, uint32(42), vhostuser.GetVringBase, vhostuser.VringState{Index: 1}.Encode(), 0},
		{"SetVringKick", func() (any, error) { return nil, c.SetVringKick(1, w) }, nil, vhostuser.SetVringKick, vhostuser.EncodeU64(1), 1},
		{"SetVringKick polling", func() (any, error) { return nil, c.SetVringKick(1, nil) }, nil, vhostuser.SetVringKick, vhostuser.EncodeU64(1 | vhostuser.VringNoFDFlag), 0},
		{"SetVringCall", func() (any, error) { return nil, c.SetVringCall(2, w) }, nil, vhostuser.SetVringCall, vhostuser.EncodeU64(2), 1},
		{"SetVringErr", func() (any, error) { return nil, c.SetVringErr(3, w) }, nil, vhostuser.SetVringErr, vhostuser.EncodeU64(3), 1},
		{"SetVringEnable", func() (any, error) { return nil, c.SetVringEnable(1, true) }, nil, vhostuser.SetVringEnable, vhostuser.VringState{Index: 1, Num: 1}.Encode(), 0},
		{"GetQueueNum", func() (any, error) { return c.GetQueueNum() }, uint64(2), vhostuser.GetQueueNum, nil, 0},
		{"GetConfig", func() (any, error) { return c.GetConfig(4, 3) }, []byte{4, 5, 6}, vhostuser.GetConfig, vhostuser.ConfigSpace{Offset: 4, Data: make([]byte, 3)}.Encode(), 0},
		{"SetConfig", func() (any, error) { return nil, c.SetConfig(8, 1, []byte{1, 2}) }, nil, vhostuser.SetConfig, vhostuser.ConfigSpace{Offset: 8, Flags: 1, Data: []byte{1, 2}}.Encode(), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.call()
			if err != nil {
				t.Fatal(err)
			}
			if tt.want != nil && !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %#v, want %#v", got, tt.want)
			}
			m := f.next(t)
			defer m.CloseFiles()
			if m.Request != tt.req || m.Flags != vhostuser.Version || !reflect.DeepEqual(m.Payload, tt.payload) && len(tt.payload)+len(m.Payload) > 0 || len(m.Files) != tt.nfds {
				t.Fatalf("sent %v flags %#x payload %x with %d fds; want %v payload %x with %d fds", m.Request, m.Flags, m.Payload, len(m.Files), tt.req, tt.payload, tt.nfds)
			}
			if _, err := vhostuser.ParseRequest(m); err != nil {
				t.Fatalf("client sent an invalid request: %v", err)
			}
		})
	}
	if err := c.SetVringKick(256, nil); err == nil {
		t.Fatal("ring index 256 accepted")
	}
	if err := c.SetMemTable(nil); err == nil {
		t.Fatal("empty memory table accepted")
	}
}

func TestClientReplyAck(t *testing.T) {
	c, f := newFake(t, func(m *vhostuser.Message) ([]byte, bool) {
		if m.Request == vhostuser.SetVringNum {
			return vhostuser.EncodeU64(1), true // refuse
		}
		return standard(m)
	})
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if m := f.next(t); m.NeedReply() {
		t.Fatal("SET_PROTOCOL_FEATURES itself asked for an ack before REPLY_ACK was on")
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	if m := f.next(t); !m.NeedReply() {
		t.Fatal("need_reply not set with REPLY_ACK negotiated")
	}
	if err := c.SetVringNum(0, 8); !errors.Is(err, ErrNacked) {
		t.Fatalf("nacked request: %v", err)
	}
	f.next(t)
	// Requests with their own reply never ask for an ack.
	if _, err := c.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	if m := f.next(t); m.NeedReply() {
		t.Fatal("need_reply set on GET_FEATURES")
	}
}

func TestClientBadReplies(t *testing.T) {
	tests := []struct {
		name  string
		reply func(m *vhostuser.Message, c *vhostuser.Conn)
	}{
		{"wrong request", func(m *vhostuser.Message, c *vhostuser.Conn) {
			c.Send(vhostuser.GetQueueNum, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(1), nil)
		}},
		{"no reply flag", func(m *vhostuser.Message, c *vhostuser.Conn) {
			c.Send(m.Request, vhostuser.Version, vhostuser.EncodeU64(1), nil)
		}},
		{"short", func(m *vhostuser.Message, c *vhostuser.Conn) {
			c.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, []byte{1}, nil)
		}},
		{"fd in reply", func(m *vhostuser.Message, c *vhostuser.Conn) {
			c.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(1), []*os.File{os.Stdin})
		}},
		{"hang up", func(m *vhostuser.Message, c *vhostuser.Conn) { c.Close() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b, err := vhostuser.Pair()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			defer b.Close()
			go func() {
				m, err := b.Recv()
				if err == nil {
					tt.reply(m, b)
				}
			}()
			before := countFDs(t)
			if _, err := New(a).GetFeatures(); err == nil {
				t.Fatal("bad reply accepted")
			}
			if countFDs(t) > before {
				t.Fatal("descriptor from a bad reply leaked")
			}
		})
	}
	// GET_VRING_BASE reply for another ring; GET_CONFIG of another size.
	c, _ := newFake(t, func(m *vhostuser.Message) ([]byte, bool) {
		switch m.Request {
		case vhostuser.GetVringBase:
			return vhostuser.VringState{Index: 5}.Encode(), true
		case vhostuser.GetConfig:
			return vhostuser.ConfigSpace{Data: []byte{1}}.Encode(), true
		}
		return standard(m)
	})
	if _, err := c.GetVringBase(1); err == nil {
		t.Fatal("GET_VRING_BASE reply for another ring accepted")
	}
	if _, err := c.GetConfig(0, 4); err == nil {
		t.Fatal("GET_CONFIG reply of the wrong size accepted")
	}
	// An empty GET_CONFIG reply is the back-end's refusal.
	c2, _ := newFake(t, func(m *vhostuser.Message) ([]byte, bool) {
		if m.Request == vhostuser.GetConfig {
			return nil, true
		}
		return standard(m)
	})
	if _, err := c2.GetConfig(0, 4); !errors.Is(err, vhostuser.ErrBadPayload) {
		t.Fatalf("refused GET_CONFIG: %v", err)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestSetupSequence(t *testing.T) {
	c, f := newFake(t, standard)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	cfg := SetupConfig{
		Features:         vhostuser.FeatureVersion1 | vhostuser.FeatureRingIndirectDesc | 1<<9,
		RequiredFeatures: vhostuser.FeatureVersion1,
		ProtocolFeatures: ^uint64(0),
		Regions:          []MemRegion{{MemRegion: vhostuser.MemRegion{Size: 4096, UserAddr: 0x7f0000000000}, File: w}},
		Queues: []QueueSetup{
			{Index: 0, Size: 16, Desc: 1, Avail: 2, Used: 3, Kick: w, Call: w},
			{Index: 1, Size: 16, Desc: 4, Avail: 5, Used: 6, Disabled: true},
		},
	}
	n, err := c.Setup(cfg)
	if err != nil {
		t.Fatal(err)
	}
	wantN := Negotiated{
		OfferedFeatures:  vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | vhostuser.FeatureRingEventIdx | 1<<9,
		Features:         vhostuser.FeatureVersion1 | vhostuser.FeatureProtocolFeatures | 1<<9,
		OfferedProtocol:  vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck | vhostuser.ProtocolLogSHMFD,
		ProtocolFeatures: vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck,
		MaxQueues:        2,
	}
	if n != wantN {
		t.Fatalf("negotiated %+v\nwant %+v", n, wantN)
	}
	c.Close()
	var got []vhostuser.Request
	var enables []uint32
	for m := range f.reqs {
		got = append(got, m.Request)
		if m.Request == vhostuser.SetVringEnable {
			s, _ := vhostuser.DecodeVringState(m.Payload)
			enables = append(enables, s.Num)
		}
		m.CloseFiles()
	}
	want := []vhostuser.Request{
		vhostuser.SetOwner, vhostuser.GetFeatures, vhostuser.GetProtocolFeatures, vhostuser.SetProtocolFeatures,
		vhostuser.GetQueueNum, vhostuser.SetFeatures, vhostuser.SetMemTable,
	}
	for range 2 {
		want = append(want, vhostuser.SetVringNum, vhostuser.SetVringBase, vhostuser.SetVringAddr,
			vhostuser.SetVringCall, vhostuser.SetVringKick, vhostuser.SetVringEnable)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("sequence\n%v\nwant\n%v", got, want)
	}
	if !reflect.DeepEqual(enables, []uint32{1, 0}) {
		t.Fatalf("enables %v", enables)
	}
}

func TestSetupErrors(t *testing.T) {
	c, _ := newFake(t, standard)
	if _, err := c.Setup(SetupConfig{RequiredFeatures: 1 << 40}); err == nil {
		t.Fatal("missing required feature accepted")
	}
	c, _ = newFake(t, standard)
	if _, err := c.Setup(SetupConfig{ProtocolFeatures: vhostuser.ProtocolMQ, Queues: []QueueSetup{{Index: 2}}}); err == nil {
		t.Fatal("queue beyond GET_QUEUE_NUM accepted")
	}
	c, _ = newFake(t, standard)
	if _, err := c.Setup(SetupConfig{UseAddMemReg: true, Regions: make([]MemRegion, 1)}); err == nil {
		t.Fatal("ADD_MEM_REG without CONFIGURE_MEM_SLOTS accepted")
	}
	// A back-end that hangs up mid-sequence.
	c, _ = newFake(t, func(m *vhostuser.Message) ([]byte, bool) { return nil, false })
	c.Conn().UnixConn().CloseRead()
	if _, err := c.Setup(SetupConfig{}); err == nil {
		t.Fatal("setup against a silent back-end succeeded")
	}
}

// TestTimeout: a back-end that never answers makes a request fail with
// ErrTimeout after the client's timeout, and every later one at once with
// ErrBroken.
func TestTimeout(t *testing.T) {
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	go func() {
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			m.CloseFiles()
		}
	}()
	c := New(a)
	defer c.Close()
	c.SetTimeout(100 * time.Millisecond)
	start := time.Now()
	if _, err := c.GetConfig(0, 8); !errors.Is(err, ErrTimeout) {
		t.Fatalf("GetConfig from a silent back-end: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("GetConfig took %v", d)
	}
	// "At once": the later request does not wait for the silent
	// back-end at all, which a timeout of its own now far beyond the
	// bound shows; a bound of 50 ms on the call itself was a loaded
	// machine's scheduling as much as the client's.
	c.SetTimeout(time.Minute)
	start = time.Now()
	if _, err := c.GetFeatures(); !errors.Is(err, ErrBroken) {
		t.Fatalf("request after a timeout: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("request after a timeout took %v: it waited for the back-end", d)
	}
}

// TestStopWaitsLongerThanOtherRequests: GET_VRING_BASE and SET_VRING_ENABLE
// 0 are answered once the ring's requests in flight are done, so a slow
// back-end (a flush on a loaded disk) answers them later than the
// ordinary timeout: they get the stop timeout, and an answer within it is
// not a dead back-end. Before, a reset during a flush of more than 5 s
// failed a virtio-fs device for the VM's life. (From review.)
func TestStopWaitsLongerThanOtherRequests(t *testing.T) {
	const slow = 300 * time.Millisecond
	c := New(slowBackend(t, slow))
	defer c.Close()
	c.SetTimeout(slow / 3)
	c.SetStopTimeout(10 * slow)
	n, err := c.GetVringBase(0)
	if err != nil || n != 7 {
		t.Fatalf("GET_VRING_BASE answered after %v: %d, %v", slow, n, err)
	}
	if err := c.SetVringEnable(0, false); err != nil {
		t.Fatalf("SET_VRING_ENABLE 0: %v", err)
	}
	// Any other request still gets the ordinary timeout.
	if _, err := c.GetFeatures(); !errors.Is(err, ErrTimeout) {
		t.Fatalf("GET_FEATURES answered after %v with a timeout of %v: %v", slow, slow/3, err)
	}
}

// TestStopWithinALimit: a caller's shorter limit for a ring stop (what is
// left of core/mmio's stop budget) wins over the stop timeout; a longer
// one does not extend it.
func TestStopWithinALimit(t *testing.T) {
	const slow = 300 * time.Millisecond
	for _, tc := range []struct {
		name    string
		stop    time.Duration // the client's stop timeout
		limit   time.Duration
		timeout bool
	}{
		{"limit longer than the stop timeout", 10 * slow, 20 * slow, false},
		{"no limit", 10 * slow, 0, false},
		{"limit shorter than the answer", 10 * slow, slow / 3, true},
		{"stop timeout shorter than the limit", slow / 3, 10 * slow, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New(slowBackend(t, slow))
			defer c.Close()
			c.SetStopTimeout(tc.stop)
			start := time.Now()
			_, err := c.GetVringBaseWithin(0, tc.limit)
			took := time.Since(start)
			if got := errors.Is(err, ErrTimeout); got != tc.timeout {
				t.Fatalf("GET_VRING_BASE answered after %v, stop timeout %v, limit %v: %v after %v", slow, tc.stop, tc.limit, err, took)
			}
			// Which limit ended the wait is what the error names, not how
			// long the wait took: on a loaded machine the goroutine woke
			// past the answer's time ("timed out only after 311ms").
			if want := fmt.Sprintf("%v (%v)", ErrTimeout, min(tc.stop, tc.limit)); tc.timeout && !strings.Contains(err.Error(), want) {
				t.Fatalf("GET_VRING_BASE timed out after %v: %v, want it ended by the %v limit", took, err, min(tc.stop, tc.limit))
			}
		})
	}
}

// slowBackend is a back-end that answers GET_VRING_BASE (ring 0 at 7) and
// GET_FEATURES after slow, and nothing else; the returned end is the
// front-end's.
func slowBackend(t *testing.T, slow time.Duration) *vhostuser.Conn {
	t.Helper()
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	go func() {
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			m.CloseFiles()
			time.Sleep(slow)
			switch m.Request {
			case vhostuser.GetVringBase:
				b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.VringState{Index: 0, Num: 7}.Encode(), nil)
			case vhostuser.GetFeatures:
				b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, make([]byte, 8), nil)
			}
		}
	}()
	return a
}

// TestSetupNeverTurnsOnLogAll: a back-end built on libvhost-user offers
// VHOST_F_LOG_ALL to every front-end; the core asks for "everything
// offered" at start-up, and so switched on dirty-page logging with no log
// region until the guest's own features replaced it (from review).
func TestSetupNeverTurnsOnLogAll(t *testing.T) {
	c, f := newFake(t, func(m *vhostuser.Message) ([]byte, bool) {
		if m.Request == vhostuser.GetFeatures {
			return vhostuser.EncodeU64(vhostuser.FeatureVersion1 | vhostuser.FeatureLogAll | 1<<9), true
		}
		return standard(m)
	})
	n, err := c.Negotiate(SetupConfig{Features: ^uint64(0)})
	if err != nil {
		t.Fatal(err)
	}
	if n.Features&vhostuser.FeatureLogAll != 0 {
		t.Errorf("negotiated features %#x include VHOST_F_LOG_ALL", n.Features)
	}
	c.Close()
	for m := range f.reqs {
		if m.Request == vhostuser.SetFeatures {
			if v, err := vhostuser.DecodeU64(m.Payload); err != nil || v&vhostuser.FeatureLogAll != 0 || v&(1<<9) == 0 {
				t.Errorf("SET_FEATURES %#x (%v)", v, err)
			}
		}
		m.CloseFiles()
	}
}
