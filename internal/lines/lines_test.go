package lines

import (
	"reflect"
	"testing"
)

func TestWriter(t *testing.T) {
	var got []string
	w := &Writer{Max: 5, Line: func(b []byte) { got = append(got, string(b)) }}
	for _, p := range []string{"ab", "c\nde", "f\n\n", "0123456789ab", "\nx"} {
		w.Write([]byte(p))
	}
	want := []string{"abc", "def", "", "01234", "56789", "ab"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("lines %q, want %q", got, want)
	}
	if w.Pending() != 1 {
		t.Errorf("rest of %d bytes, want 1", w.Pending())
	}
	w.Flush()
	if got[len(got)-1] != "x" || w.Pending() != 0 {
		t.Errorf("Flush: lines %q, rest %d", got, w.Pending())
	}
}

func TestTail(t *testing.T) {
	for _, tc := range []struct {
		n    int
		add  []string
		want []string
	}{
		{3, nil, []string{}},
		{3, []string{"a", "b"}, []string{"a", "b"}},
		{3, []string{"a", "b", "c"}, []string{"a", "b", "c"}},
		{3, []string{"a", "b", "c", "d"}, []string{"b", "c", "d"}},
		{3, []string{"a", "b", "c", "d", "e", "f", "g"}, []string{"e", "f", "g"}},
		{1, []string{"a", "b"}, []string{"b"}},
		{0, []string{"a"}, []string{}},
	} {
		tl := &Tail{N: tc.n}
		for _, l := range tc.add {
			tl.Add(l)
		}
		if got := tl.Lines(); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("N=%d after %q: %q, want %q", tc.n, tc.add, got, tc.want)
		}
	}
}

// TestWriterByteAtATime: a guest's UART hands the log a line one byte at
// a time. The partial line was copied whole at every byte (quadratic in
// the line's length, on the vCPU's thread); now it grows as a slice does.
func TestWriterByteAtATime(t *testing.T) {
	var got []string
	w := &Writer{Max: 4096, Line: func(b []byte) { got = append(got, string(b)) }}
	one := []byte{'x'}
	allocs := testing.AllocsPerRun(1, func() {
		for range 4000 {
			w.Write(one)
		}
	})
	if allocs > 100 {
		t.Errorf("%v allocations for a 4000-byte line written a byte at a time", allocs)
	}
	w.Write([]byte("\n"))
	// AllocsPerRun ran the loop twice: 8000 bytes, cut at Max.
	if len(got) != 2 || len(got[0]) != 4096 || len(got[1]) != 8000-4096 {
		t.Errorf("%d lines, want two of 4096 and 3904 bytes", len(got))
	}
}
