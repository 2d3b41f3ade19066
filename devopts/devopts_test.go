package devopts

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

func TestParseFormat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Format
		err  string
	}{
		{"raw", Raw, ""},
		{"qcow2", QCOW2, ""},
		{"", "", "format= is required"},
		{"vmdk", "", `unknown format "vmdk"`},
		{"QCOW2", "", "unknown format"},
	} {
		got, err := ParseFormat(tc.in)
		if got != tc.want || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("ParseFormat(%q) = %q, %v; want %q, error containing %q", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestBackingNames(t *testing.T) {
	if BackingFile(3) != "backing.3" || OptBackingFormat(0) != "backing.0.format" || OptBackingPath(15) != "backing.15.path" {
		t.Fatalf("names: %s %s %s", BackingFile(3), OptBackingFormat(0), OptBackingPath(15))
	}
}

func TestParseFSOptions(t *testing.T) {
	for _, tc := range []struct {
		opts    map[string]string
		check   func(FSOptions) bool
		wantErr string
	}{
		{nil, func(o FSOptions) bool { return !o.AllowSetID && !o.NoXattr && o.Timeout == 0 && o.Workers == 0 }, ""},
		{map[string]string{OptSuid: "on"}, func(o FSOptions) bool { return o.AllowSetID }, ""},
		{map[string]string{OptSuid: "off"}, func(o FSOptions) bool { return !o.AllowSetID }, ""},
		{map[string]string{OptSuid: "yes"}, nil, "suid"},
		{map[string]string{OptSuid: ""}, nil, "suid"},
		{map[string]string{OptXattr: "off"}, func(o FSOptions) bool { return o.NoXattr }, ""},
		{map[string]string{OptCache: "0"}, func(o FSOptions) bool { return o.Timeout < 0 }, ""},
		{map[string]string{OptCache: "30"}, func(o FSOptions) bool { return o.Timeout == 30*time.Second }, ""},
		{map[string]string{OptCache: "3601"}, nil, "cache"},
		{map[string]string{OptWorkers: "256"}, func(o FSOptions) bool { return o.Workers == 256 }, ""},
		{map[string]string{OptWorkers: "0"}, nil, "workers"},
		{map[string]string{OptUIDMap: "0:1000:1"}, func(o FSOptions) bool { return len(o.UIDMap) == 1 && o.UIDMap[0] == IDMap{0, 1000, 1} }, ""},
		{map[string]string{OptGIDMap: "0:1000"}, nil, "gidmap"},
		{map[string]string{"unknown": "x"}, func(FSOptions) bool { return true }, ""},
	} {
		o, err := ParseFSOptions(tc.opts)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: err %v, want one naming %q", tc.opts, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !tc.check(o) {
			t.Errorf("%v: %+v, %v", tc.opts, o, err)
		}
	}
}

func TestIDMaps(t *testing.T) {
	for _, tc := range []struct {
		in, err string
	}{
		{"", ""},
		{"0:1000:1", ""},
		{"0:1000:1/1:100000:65536", ""},
		{"0:1000", "is not GUEST:HOST:COUNT"},
		{"0:x:1", "id map"},
		// strconv's own words ("strconv.ParseUint: parsing \"-1\":
		// invalid syntax") reached the user (from review, helper-114).
		{"0:0:-1", `"-1" is not a decimal number from 0 to 4294967295`},
		{"0:4294967296:1", `"4294967296" is not a decimal number`},
		{"0:1000:0", "count is 0"},
		{"4294967295:0:2", "overflows"},
		{"0:1000:10/5:2000:1", "overlap on the guest side"},
		{"0:1000:10/50:1005:1", "overlap on the host side"},
	} {
		ms, err := ParseIDMaps(tc.in)
		if (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("ParseIDMaps(%q): %v, want error containing %q", tc.in, err, tc.err)
			continue
		}
		if err == nil && FormatIDMaps(ms) != tc.in {
			t.Errorf("FormatIDMaps(ParseIDMaps(%q)) = %q", tc.in, FormatIDMaps(ms))
		}
	}
}

func TestControlRecords(t *testing.T) {
	w := WinsizeRecord(40, 120)
	if len(w) != ControlLen || w[0] != ControlWinsize || binary.LittleEndian.Uint16(w[2:]) != 40 || binary.LittleEndian.Uint16(w[4:]) != 120 {
		t.Fatalf("winsize record % x", w)
	}
	s := SignalRecord(15)
	if len(s) != ControlLen || s[0] != ControlSignal || s[2] != 15 {
		t.Fatalf("signal record % x", s)
	}
	a := SignalAllRecord(9)
	if len(a) != ControlLen || a[0] != ControlSignalAll || a[2] != 9 {
		t.Fatalf("signal-all record % x", a)
	}
}
