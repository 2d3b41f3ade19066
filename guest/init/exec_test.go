package main

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// execFrame returns the EXEC frame the host sends for id.
func execFrame(t *testing.T, id uint32) stdioframe.Frame {
	t.Helper()
	var b bytes.Buffer
	if err := stdioframe.NewWriter(&b).WriteExec(stdioframe.Exec, id, []byte(`{"args":["true"]}`)); err != nil {
		t.Fatal(err)
	}
	f, err := stdioframe.NewReader(&b, stdioframe.HostToGuest).Next()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestExecRefusals: an exec beyond maxExecs is answered (a message and
// krun-init's own status), so that its caller on the host does not wait
// for good; one that reuses a live program's id is not (an answer would
// end that program's session on the host).
func TestExecRefusals(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	tests := []struct {
		name       string
		live       int    // programs already running, ids 1..live
		id         uint32 // the new exec's
		wantStderr string // "" for no answer at all
	}{
		{"too many", maxExecs, 100, "exec'd programs already run in this container"},
		{"id in use", 3, 2, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			in := &initProc{log: &logger{out: devNull}, stdio: &stdio{w: stdioframe.NewWriter(&out)}}
			m := &execManager{in: in, procs: map[uint32]*execProc{}}
			for i := 1; i <= tc.live; i++ {
				m.procs[uint32(i)] = &execProc{m: m, id: uint32(i)}
			}
			m.frame(execFrame(t, tc.id))
			if len(m.procs) != tc.live {
				t.Errorf("%d programs registered, want %d", len(m.procs), tc.live)
			}
			r := stdioframe.NewReader(&out, stdioframe.GuestToHost)
			if tc.wantStderr == "" {
				if f, err := r.Next(); err != io.EOF {
					t.Fatalf("answered with %v (%v), want nothing", f.Type, err)
				}
				return
			}
			f, err := r.Next()
			if err != nil || f.Type != stdioframe.ExecStderr || f.ExecID() != tc.id || !strings.Contains(string(f.ExecData()), tc.wantStderr) {
				t.Fatalf("first frame %v id %d %q (%v), want EXEC_STDERR for %d with %q", f.Type, f.ExecID(), f.ExecData(), err, tc.id, tc.wantStderr)
			}
			f, err = r.Next()
			if err != nil || f.Type != stdioframe.ExecExit || f.ExecID() != tc.id || f.ExecByte() != initconfig.StatusInitFailed {
				t.Fatalf("second frame %v id %d status %d (%v), want EXEC_EXIT %d for %d", f.Type, f.ExecID(), f.ExecByte(), err, initconfig.StatusInitFailed, tc.id)
			}
		})
	}
}
