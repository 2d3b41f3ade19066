package net

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/krun-core/krun-core/devopts"
)

// chunkReader returns its data in reads of the sizes in cuts (cycled; 0
// means 1), and io.EOF once it is empty, with the last bytes when eofEarly.
type chunkReader struct {
	data     []byte
	cuts     []byte
	i        int
	eofEarly bool
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := 1
	if len(r.cuts) > 0 {
		n = max(int(r.cuts[r.i%len(r.cuts)]), 1)
		r.i++
	}
	n = min(n, len(p), len(r.data))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	if len(r.data) == 0 && r.eofEarly {
		return n, io.EOF
	}
	return n, nil
}

// frameEvent is what one frameReader.read ends with: a frame, a skipped
// one, or the stream's end.
type frameEvent struct {
	frame   []byte
	skipped bool
	end     string // "", "closed", "mid-header", "mid-frame" or "broken"
}

// modelFrames is the specification of passt's stream as frameReader must
// read it: a 4-byte big-endian length, then that many bytes; lengths
// outside [ethHeaderLen, max] are skipped whole, and one above
// devopts.PasstMaxFrame ends the stream (out of step).
func modelFrames(stream []byte, max int) []frameEvent {
	var out []frameEvent
	for {
		switch {
		case len(stream) == 0:
			return append(out, frameEvent{end: "closed"})
		case len(stream) < 4:
			return append(out, frameEvent{end: "mid-header"})
		}
		n := int(binary.BigEndian.Uint32(stream))
		stream = stream[4:]
		if n > devopts.PasstMaxFrame {
			return append(out, frameEvent{end: "broken"})
		}
		if n > len(stream) {
			return append(out, frameEvent{end: "mid-frame"})
		}
		if n > max || n < ethHeaderLen {
			out = append(out, frameEvent{skipped: true})
		} else {
			out = append(out, frameEvent{frame: stream[:n]})
		}
		stream = stream[n:]
	}
}

// FuzzFrameReader reads an arbitrary stream from passt (a process that
// handles the network's bytes, so not trusted with the plugin's memory),
// cut into arbitrary reads, and checks frameReader against modelFrames:
// every frame within the limit comes out whole and in order, every other
// length is skipped whole, the stream's end is reported for what it cut,
// and frame buffers stay within the limit and the bytes sent.
func FuzzFrameReader(f *testing.F) {
	frame := func(n int, fill byte) []byte {
		b := make([]byte, 4+n)
		binary.BigEndian.PutUint32(b, uint32(n))
		for i := 4; i < len(b); i++ {
			b[i] = fill
		}
		return b
	}
	f.Add(frame(60, 1), []byte{64}, false, uint16(1514))
	f.Add(bytes.Join([][]byte{frame(14, 2), frame(13, 3), frame(1600, 4), frame(100, 5)}, nil), []byte{1, 3, 200}, true, uint16(1514))
	f.Add(append(frame(100, 6), 0, 0), []byte{7}, false, uint16(1514))
	f.Add(frame(100, 7)[:50], []byte{}, true, uint16(1514))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1, 2, 3}, []byte{2}, false, uint16(9000))
	// The limits exactly: max and max+1 bytes, ethHeaderLen and one less.
	f.Add(bytes.Join([][]byte{frame(100, 8), frame(101, 9), frame(14, 10), frame(13, 11)}, nil), []byte{5, 50}, false, uint16(100))

	f.Fuzz(func(t *testing.T, stream, cuts []byte, eofEarly bool, max16 uint16) {
		max := int(max16)
		want := modelFrames(stream, max)
		var allocated int
		fr := frameReader{alloc: func(n int) []byte {
			if n > max {
				t.Fatalf("allocated %d bytes for a frame, limit %d", n, max)
			}
			allocated += n
			return make([]byte, n)
		}}
		r := &chunkReader{data: stream, cuts: cuts, eofEarly: eofEarly}
		for i, w := range want {
			err := fr.read(r, max)
			var got frameEvent
			switch {
			case err == nil:
				got.frame = fr.frame()
				fr.consume()
			case errors.Is(err, errFrameTooLong):
				got.skipped = true
			case errors.Is(err, errStreamBroken):
				got.end = "broken"
			case errors.Is(err, io.ErrUnexpectedEOF):
				got.end = "mid-frame"
			case errors.Is(err, io.EOF) && fr.hdrHave == 0:
				got.end = "closed"
			case errors.Is(err, io.EOF):
				got.end = "mid-header"
			default:
				t.Fatalf("event %d: unexpected error %v", i, err)
			}
			if got.end != w.end || got.skipped != w.skipped || !bytes.Equal(got.frame, w.frame) {
				t.Fatalf("event %d: got frame of %d bytes, skipped %v, end %q; want frame of %d bytes, skipped %v, end %q",
					i, len(got.frame), got.skipped, got.end, len(w.frame), w.skipped, w.end)
			}
			if got.end != "" {
				break
			}
		}
		// A frame's buffer is taken when its length arrives, so at most
		// one frame's worth beyond the bytes passt sent.
		if allocated > len(stream)+max {
			t.Fatalf("allocated %d bytes for a %d-byte stream, limit %d a frame", allocated, len(stream), max)
		}
	})
}
