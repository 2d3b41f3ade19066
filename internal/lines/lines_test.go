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
