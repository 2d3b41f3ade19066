package frontend

import (
	"errors"
	"os"
	"slices"
	"testing"

	"github.com/krun-core/krun-core/vhostuser"
)

// TestReceiveErrorBreaksTheClient: a reply the connection cannot receive
// (a header it refuses, which leaves the rest of the message in the
// stream) is the end of the connection, as Conn.Recv says: the client
// closes it and fails every later request with ErrBroken. It used to go
// on reading the stream where the refused header left it, so a later
// request took the refused message's payload, here a well-formed reply
// the back-end planted there, as its own reply.
func TestReceiveErrorBreaksTheClient(t *testing.T) {
	planted := func() []byte {
		b := make([]byte, vhostuser.HeaderSize)
		vhostuser.Header{Request: vhostuser.GetFeatures, Flags: vhostuser.Version | vhostuser.FlagReply, Size: 8}.Encode(b)
		return append(b, vhostuser.EncodeU64(0xbad)...)
	}
	tests := []struct {
		name string
		hdr  vhostuser.Header
	}{
		{"payload too large", vhostuser.Header{Request: vhostuser.GetFeatures, Flags: vhostuser.Version | vhostuser.FlagReply, Size: vhostuser.MaxPayloadSize + 1}},
		{"wrong version", vhostuser.Header{Request: vhostuser.GetFeatures, Flags: 2 | vhostuser.FlagReply, Size: 20}},
		{"unknown flags", vhostuser.Header{Request: vhostuser.GetFeatures, Flags: vhostuser.Version | vhostuser.FlagReply | 1<<8, Size: 20}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, b := clientPair(t)
			go answerRaw(b, func(first bool) []byte {
				if !first {
					return nil // the planted reply answers it
				}
				msg := make([]byte, vhostuser.HeaderSize)
				tt.hdr.Encode(msg)
				return append(msg, planted()...)
			})
			if _, err := c.GetFeatures(); !Gone(err) {
				t.Fatalf("refused reply header: %v, want the back-end gone", err)
			}
			f, err := c.GetFeatures()
			if !errors.Is(err, ErrBroken) {
				t.Fatalf("request after a refused reply: %#x, %v; want ErrBroken", f, err)
			}
		})
	}
}

// TestStrayReplyBreaksTheClient: a message that is not the reply to the
// request (no reply flag, or another request's code) may be one the
// back-end sent beside its replies, with the real reply still to come; the
// client used to fail only that request and leave the connection open, so
// the next request took the waiting reply, here one the back-end planted,
// for its own. It now ends the connection as after a reply it could not
// receive. A reply of the wrong size keeps it: that message was this
// request's reply, read to its end.
func TestStrayReplyBreaksTheClient(t *testing.T) {
	reply := func(req vhostuser.Request, flags uint32, v uint64) []byte {
		b := make([]byte, vhostuser.HeaderSize)
		vhostuser.Header{Request: req, Flags: flags, Size: 8}.Encode(b)
		return append(b, vhostuser.EncodeU64(v)...)
	}
	tests := []struct {
		name  string
		first []byte // sent in answer to the first GET_FEATURES, before the planted reply
		gone  bool
	}{
		{"another request's reply", reply(vhostuser.GetQueueNum, vhostuser.Version|vhostuser.FlagReply, 1), true},
		{"no reply flag", reply(vhostuser.GetFeatures, vhostuser.Version, 1), true},
		{"wrong payload size", append(func() []byte {
			b := make([]byte, vhostuser.HeaderSize)
			vhostuser.Header{Request: vhostuser.GetFeatures, Flags: vhostuser.Version | vhostuser.FlagReply, Size: 4}.Encode(b)
			return b
		}(), 0, 0, 0, 0), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, b := clientPair(t)
			go answerRaw(b, func(first bool) []byte {
				switch {
				case first && tt.gone:
					return append(slices.Clone(tt.first), reply(vhostuser.GetFeatures, vhostuser.Version|vhostuser.FlagReply, 0xbad)...)
				case first:
					return tt.first
				case tt.gone:
					return nil // the planted reply answers it
				}
				return reply(vhostuser.GetFeatures, vhostuser.Version|vhostuser.FlagReply, 7)
			})
			_, err := c.GetFeatures()
			if err == nil || Gone(err) != tt.gone {
				t.Fatalf("first GET_FEATURES: %v, want an error, gone %v", err, tt.gone)
			}
			f, err := c.GetFeatures()
			if tt.gone {
				if !errors.Is(err, ErrBroken) {
					t.Fatalf("request after a stray reply: %#x, %v; want ErrBroken", f, err)
				}
				return
			}
			if err != nil || f != 7 {
				t.Fatalf("request after a short reply: %#x, %v; want 7 (the connection in step)", f, err)
			}
		})
	}
}

// TestLocalSendErrorIsNotGone: a message the front-end cannot make (a nil,
// closed or too many files, a payload too large) fails that call with
// vhostuser.ErrNotSent and leaves the connection usable; it was reported as
// ErrDisconnected, which callers (Gone) take for a back-end that died and
// restart, so a bug of the core's own would have looked like a plugin
// crashing. (From review, helper-110.)
func TestLocalSendErrorIsNotGone(t *testing.T) {
	closed, err := os.CreateTemp(t.TempDir(), "closed")
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	tooMany := make([]*os.File, vhostuser.MaxFDs+1)
	for i := range tooMany {
		tooMany[i] = os.Stdin
	}
	tests := []struct {
		name    string
		req     vhostuser.Request
		payload []byte
		files   []*os.File
	}{
		{"nil file", vhostuser.SetVringKick, vhostuser.EncodeVringFD(0, false), []*os.File{nil}},
		{"closed file", vhostuser.SetVringKick, vhostuser.EncodeVringFD(0, false), []*os.File{closed}},
		{"too many files", vhostuser.SetVringKick, vhostuser.EncodeVringFD(0, false), tooMany},
		{"payload too large", vhostuser.SetConfig, make([]byte, vhostuser.MaxPayloadSize+1), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, b := clientPair(t)
			_, err := c.call(tt.req, tt.payload, tt.files)
			if !errors.Is(err, vhostuser.ErrNotSent) || Gone(err) {
				t.Fatalf("error %v: want ErrNotSent, not gone", err)
			}
			// The connection is as it was: the next request is answered.
			go func() {
				m, err := b.Recv()
				if err != nil {
					return
				}
				m.CloseFiles()
				b.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(7), nil)
			}()
			if v, err := c.GetFeatures(); err != nil || v != 7 {
				t.Fatalf("GET_FEATURES after the refused send: %#x, %v", v, err)
			}
		})
	}
}

// answerRaw is a back-end on b that writes answer(first) as raw bytes in
// answer to each request (nothing for nil), until the connection ends.
func answerRaw(b *vhostuser.Conn, answer func(first bool) []byte) {
	for first := true; ; first = false {
		m, err := b.Recv()
		if err != nil {
			return
		}
		m.CloseFiles()
		if msg := answer(first); msg != nil {
			if _, err := b.UnixConn().Write(msg); err != nil {
				return
			}
		}
	}
}

// clientPair returns a Client on one end of a socket pair and the other
// end, the back-end's, both closed when the test ends.
func clientPair(t *testing.T) (*Client, *vhostuser.Conn) {
	t.Helper()
	a, b, err := vhostuser.Pair()
	if err != nil {
		t.Fatal(err)
	}
	c := New(a)
	t.Cleanup(func() {
		c.Close()
		b.Close()
	})
	return c, b
}
