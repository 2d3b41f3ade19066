package backend_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// fuzzFiles are the descriptors the session fuzzer attaches: a memfd for
// memory messages, an eventfd for ring messages.
type fuzzFiles struct {
	mem, ev *os.File
	// inflight is an inflight region whose contents the fuzzer writes
	// (a region left by a compromised earlier back-end); cleared before
	// each input.
	inflight *os.File
}

// fuzzInflightSize is the inflight file's size: room for two queues of
// 256 descriptors.
const fuzzInflightSize = 16 << 10

func newFuzzFiles(f *testing.F) fuzzFiles {
	mfd, err := unix.MemfdCreate("fuzz-ram", unix.MFD_CLOEXEC)
	if err != nil {
		f.Fatal(err)
	}
	mem := os.NewFile(uintptr(mfd), "fuzz-ram")
	if err := mem.Truncate(1 << 20); err != nil {
		f.Fatal(err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		f.Fatal(err)
	}
	ifd, err := unix.MemfdCreate("fuzz-inflight", unix.MFD_CLOEXEC)
	if err != nil {
		f.Fatal(err)
	}
	return fuzzFiles{mem: mem, ev: os.NewFile(uintptr(efd), "fuzz-eventfd"), inflight: os.NewFile(uintptr(ifd), "fuzz-inflight")}
}

// resetInflight empties the inflight file.
func (ff fuzzFiles) resetInflight(t *testing.T) {
	if err := ff.inflight.Truncate(0); err != nil {
		t.Fatal(err)
	}
	if err := ff.inflight.Truncate(fuzzInflightSize); err != nil {
		t.Fatal(err)
	}
	if err := ff.mem.Truncate(0); err != nil {
		t.Fatal(err)
	}
	if err := ff.mem.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
}

// fuzzWriteInflight is the request number (not a vhost-user one) of an
// input's record that writes its payload into the inflight file at
// 64 × flags instead of sending a message: the region's contents, written
// before or while the back-end uses it.
const fuzzWriteInflight = 0xff

// fuzzWriteMem is the request number of a record that writes its payload
// into guest memory (the memfd behind every region) at 64 × flags, then
// kicks through the eventfd: the driver's descriptors, rings and buffers,
// written before or while the back-end runs the ring. Guest memory is
// cleared before each input.
const fuzzWriteMem = 0xfe

// filesFor picks the descriptors a request wants, so that the fuzzer gets
// past the descriptor checks; extra adds a stray one.
func (ff fuzzFiles) filesFor(req vhostuser.Request, payload []byte, extra bool) []*os.File {
	var fs []*os.File
	switch req {
	case vhostuser.SetMemTable:
		n := 0
		if len(payload) >= 4 {
			n = int(payload[0])
		}
		for i := 0; i < n && i < vhostuser.MaxFDs; i++ {
			fs = append(fs, ff.mem)
		}
	case vhostuser.AddMemReg:
		fs = append(fs, ff.mem)
	case vhostuser.SetInflightFD:
		fs = append(fs, ff.inflight)
	case vhostuser.SetVringKick, vhostuser.SetVringCall, vhostuser.SetVringErr:
		if len(payload) < 2 || payload[1]&1 == 0 {
			fs = append(fs, ff.ev)
		}
	}
	if extra && len(fs) < vhostuser.MaxFDs {
		fs = append(fs, ff.ev)
	}
	return fs
}

// FuzzSession drives a whole back-end session with a fuzzed sequence of
// requests (each: request byte, flags byte, payload length byte, payload;
// flags bit 0 asks for a reply, bit 1 adds a stray descriptor, bit 2
// counts the length in 4-byte units, for messages of up to 1020 bytes).
// The back-end must never panic (not even one recovered by Protect), never
// hang, and end the session when the connection closes.
func FuzzSession(f *testing.F) {
	ff := newFuzzFiles(f)
	seed := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	m := func(req vhostuser.Request, flags byte, payload []byte) []byte {
		return append([]byte{byte(req), flags, byte(len(payload))}, payload...)
	}
	region := vhostuser.MemRegion{GuestAddr: 0, Size: 1 << 20, UserAddr: 0x7f0000000000}
	f.Add(seed(
		m(vhostuser.SetOwner, 0, nil),
		m(vhostuser.SetProtocolFeatures, 0, vhostuser.EncodeU64(vhostuser.ProtocolReplyAck|vhostuser.ProtocolConfigureMemSlots|vhostuser.ProtocolMQ)),
		m(vhostuser.SetFeatures, 1, vhostuser.EncodeU64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures|vhostuser.FeatureRingEventIdx)),
		m(vhostuser.SetMemTable, 1, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region})),
		m(vhostuser.SetVringNum, 1, vhostuser.VringState{Index: 0, Num: 16}.Encode()),
		m(vhostuser.SetVringAddr, 1, vhostuser.VringAddr{Desc: 0x7f0000000000, Avail: 0x7f0000001000, Used: 0x7f0000002000}.Encode()),
		m(vhostuser.SetVringKick, 1, vhostuser.EncodeU64(0)),
		m(vhostuser.SetVringEnable, 1, vhostuser.VringState{Index: 0, Num: 1}.Encode()),
		m(vhostuser.AddMemReg, 1, vhostuser.EncodeSingleMemRegion(vhostuser.MemRegion{GuestAddr: 1 << 30, Size: 4096, UserAddr: 0x100000})),
		m(vhostuser.GetVringBase, 0, vhostuser.VringState{}.Encode()),
		m(vhostuser.RemMemReg, 1, vhostuser.EncodeSingleMemRegion(region)),
		m(vhostuser.ResetOwner, 1, nil),
	))
	f.Add(seed(
		m(vhostuser.SetOwner, 0, nil),
		m(vhostuser.SetFeatures, 0, vhostuser.EncodeU64(vhostuser.FeatureVersion1)),
		m(vhostuser.SetMemTable, 0, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region})),
		m(vhostuser.SetVringNum, 0, vhostuser.VringState{Index: 0, Num: 4}.Encode()),
		m(vhostuser.SetVringAddr, 0, vhostuser.VringAddr{Desc: 0x7f0000000000, Avail: 0x7f0000000100, Used: 0x7f0000000200}.Encode()),
		m(vhostuser.SetVringKick, 0, vhostuser.EncodeU64(vhostuser.VringNoFDFlag)),
		m(vhostuser.SetMemTable, 0, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region})),
		m(vhostuser.GetConfig, 0, vhostuser.ConfigSpace{Offset: 60, Data: make([]byte, 8)}.Encode()),
	))
	// A driver's chain in guest memory: descriptor table at 0, available
	// ring at 0x1000, used ring at 0x2000, buffers at 0x3000 and 0x3800;
	// the ring started, then its table rewritten under the back-end.
	desc := func(addr uint64, n uint32, fl, next uint16) []byte {
		b := binary.LittleEndian.AppendUint64(nil, addr)
		b = binary.LittleEndian.AppendUint32(b, n)
		b = binary.LittleEndian.AppendUint16(b, fl)
		return binary.LittleEndian.AppendUint16(b, next)
	}
	f.Add(seed(
		m(fuzzWriteMem, 0, append(desc(0x3000, 16, 1, 1), desc(0x3800, 64, 2, 0)...)),
		m(fuzzWriteMem, 0x1000/64, []byte{0, 0, 1, 0, 0, 0}),
		m(fuzzWriteMem, 0x3000/64, []byte("0123456789abcdef")),
		m(vhostuser.SetOwner, 0, nil),
		m(vhostuser.SetFeatures, 0, vhostuser.EncodeU64(vhostuser.FeatureVersion1)),
		m(vhostuser.SetMemTable, 0, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region})),
		m(vhostuser.SetVringNum, 0, vhostuser.VringState{Index: 0, Num: 8}.Encode()),
		m(vhostuser.SetVringAddr, 0, vhostuser.VringAddr{Desc: 0x7f0000000000, Avail: 0x7f0000001000, Used: 0x7f0000002000}.Encode()),
		m(vhostuser.SetVringKick, 0, vhostuser.EncodeU64(0)),
		m(fuzzWriteMem, 0x1000/64, []byte{0, 0, 2, 0, 0, 0, 1, 0}),
		m(fuzzWriteMem, 0, desc(0x0fff_fff0, 0xffff_ffff, 5, 0)),
		m(fuzzWriteMem, 0x1000/64, []byte{0, 0, 3, 0, 0, 0, 1, 0, 0, 0}),
		m(vhostuser.GetVringBase, 0, vhostuser.VringState{}.Encode()),
	))
	// A restarted back-end handed an inflight region: a valid description,
	// and contents that claim requests in flight.
	infl := vhostuser.Inflight{MmapSize: fuzzInflightSize, NumQueues: 2, QueueSize: 16}.Encode()
	f.Add(seed(
		// The region's contents first: the first queue's header, then
		// entries marked in flight with a counter.
		m(fuzzWriteInflight, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 16, 0, 0, 0, 0, 0}),
		m(fuzzWriteInflight, 1, bytes.Repeat([]byte{1, 0, 0, 0, 0, 0, 2, 0, 7, 0, 0, 0, 0, 0, 0, 0}, 8)),
		m(vhostuser.SetOwner, 0, nil),
		m(vhostuser.SetProtocolFeatures, 0, vhostuser.EncodeU64(vhostuser.ProtocolReplyAck|vhostuser.ProtocolInflightSHMFD)),
		m(vhostuser.SetFeatures, 1, vhostuser.EncodeU64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures)),
		m(vhostuser.SetMemTable, 1, vhostuser.EncodeMemTable([]vhostuser.MemRegion{region})),
		m(vhostuser.SetInflightFD, 1, infl),
		m(vhostuser.SetVringNum, 1, vhostuser.VringState{Index: 0, Num: 16}.Encode()),
		m(vhostuser.SetVringBase, 1, vhostuser.VringState{Index: 0, Num: 3}.Encode()),
		m(vhostuser.SetVringAddr, 1, vhostuser.VringAddr{Desc: 0x7f0000000000, Avail: 0x7f0000001000, Used: 0x7f0000002000}.Encode()),
		m(vhostuser.SetVringKick, 1, vhostuser.EncodeU64(0)),
		m(vhostuser.SetVringEnable, 1, vhostuser.VringState{Index: 0, Num: 1}.Encode()),
		// Rewritten while the ring runs.
		m(fuzzWriteInflight, 0, bytes.Repeat([]byte{0xff}, 64)),
		m(vhostuser.GetVringBase, 0, vhostuser.VringState{}.Encode()),
	))
	// A full memory table (8 regions: 264 bytes, past a one-byte length).
	full := make([]vhostuser.MemRegion, vhostuser.MaxFDs)
	for i := range full {
		full[i] = vhostuser.MemRegion{GuestAddr: uint64(i) << 20, Size: 1 << 20, UserAddr: 0x7f0000000000 + uint64(i)<<20}
	}
	table := vhostuser.EncodeMemTable(full)
	f.Add(seed(
		m(vhostuser.SetOwner, 0, nil),
		append([]byte{byte(vhostuser.SetMemTable), 1 | 4, byte(len(table) / 4)}, table...),
		m(vhostuser.GetVringBase, 0, vhostuser.VringState{}.Encode()),
	))
	f.Fuzz(func(t *testing.T, data []byte) {
		ff.resetInflight(t)
		dev := newTestDevice(2)
		// How the rings serve follows the input's length, so that the
		// record format stays as it is: on the ring's goroutine, on
		// workers (out of order, MaxInFlight reached), with an Inliner,
		// or completed later from another goroutine.
		switch len(data) % 4 {
		case 1:
			dev.workers, dev.maxInFlight = 2, 2
		case 2:
			dev.mode, dev.workers = "inline", 2
		case 3:
			dev.mode = "async"
		}
		logs := &syncbuf.Buffer{}
		srv, err := backend.NewServer(dev, newLogger(logs))
		if err != nil {
			t.Fatal(err)
		}
		fa, fb, err := vhostuser.SocketPair()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			// The back-end's end goes with its session, as serve's
			// caller closes it: a back-end that ended the session on a
			// bad message must not leave the sender below blocked on a
			// full socket (found by this fuzzer: a 1-byte SET_MEM_TABLE
			// followed by more than a socket buffer of requests).
			done <- srv.Serve(context.Background(), fa)
			fa.Close()
		}()
		conn, err := vhostuser.NewConn(fb)
		fb.Close()
		if err != nil {
			t.Fatal(err)
		}
		// Drain replies so the back-end never blocks on a full socket.
		go func() {
			for {
				m, err := conn.Recv()
				if err != nil {
					return
				}
				m.CloseFiles()
			}
		}()
		for len(data) >= 3 {
			req, flags, n := vhostuser.Request(data[0]), uint32(data[1]), int(data[2])
			data = data[3:]
			if req != fuzzWriteInflight && req != fuzzWriteMem && flags&4 != 0 {
				n *= 4 // a long message: a full memory table, a large config read
			}
			if n > len(data) {
				n = len(data)
			}
			payload := data[:n]
			data = data[n:]
			if req == fuzzWriteInflight {
				ff.inflight.WriteAt(payload, int64(flags)*64%fuzzInflightSize)
				continue
			}
			if req == fuzzWriteMem {
				ff.mem.WriteAt(payload, int64(flags)*64)
				ff.ev.Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
				continue
			}
			hdrFlags := vhostuser.Version | (flags&1)*vhostuser.FlagNeedReply
			if err := conn.Send(req, hdrFlags, payload, ff.filesFor(req, payload, flags&2 != 0)); err != nil {
				break // the back-end closed the connection
			}
		}
		conn.UnixConn().CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("back-end hung; log:\n%s", logs.String())
		}
		conn.Close()
		if l := logs.String(); strings.Contains(l, "panic") || strings.Contains(l, "memory fault") {
			t.Fatalf("back-end panicked:\n%s", l)
		}
		if st := srv.Stats(); st[0].Running || st[1].Running {
			t.Fatalf("ring still running after the session: %+v", st)
		}
	})
}
