package main

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestBenchAllUsageErrors(t *testing.T) {
	notExec := filepath.Join(t.TempDir(), "krun-core")
	if err := os.WriteFile(notExec, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		msg  string
	}{
		{[]string{"--rounds", "0"}, "--rounds"},
		{[]string{"--rounds", "101"}, "--rounds"},
		{[]string{"--seconds", "0"}, "--seconds"},
		{[]string{"--starts", "0"}, "--starts"},
		{[]string{"--size", "1M"}, "--size"},
		{[]string{"--size", "lots"}, "--size"},
		{[]string{"--suites", "blk-raw,disk"}, `unknown suite "disk"`},
		{[]string{"--output", "yaml"}, "output"},
		{[]string{"extra"}, "unexpected argument"},
		{[]string{"--krun-core", notExec}, "not an executable file"},
		{[]string{"--krun-core", filepath.Join(t.TempDir(), "none")}, "not an executable file"},
		{[]string{"--krun-core", "/bin/true", "--dir", "/tmp/a,b"}, "comma"},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		args := append([]string{"all"}, tc.args...)
		if code := benchCommand(args, &out, &errb); code != 1 {
			t.Errorf("bench %q: exit %d, want 1 (%s)", args, code, errb.String())
		}
		if !strings.Contains(errb.String(), tc.msg) {
			t.Errorf("bench %q: stderr %q lacks %q", args, errb.String(), tc.msg)
		}
		if n := strings.Count(strings.TrimSpace(errb.String()), "\n"); n != 0 {
			t.Errorf("bench %q: %d lines on stderr, want one: %q", args, n+1, errb.String())
		}
	}
}

// The sides take turns: each runs first in some round.
func TestOrderRotates(t *testing.T) {
	sides := []string{"a", "b", "c"}
	first := map[string]bool{}
	for r := range 3 {
		o := order(sides, r)
		if got := slices.Sorted(slices.Values(o)); !slices.Equal(got, sides) {
			t.Fatalf("round %d: %v is not a permutation of %v", r, o, sides)
		}
		first[o[0]] = true
	}
	if len(first) != 3 {
		t.Errorf("first sides over 3 rounds: %v, want every side once", first)
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name        string
		higher      bool
		krun, ref   []float64
		fio         []float64
		vsRef, ofIO float64
		refMissing  bool
	}{
		// Per-round ratios 2, 1, 4: median 2 (not the ratio of the medians).
		{name: "throughput", higher: true, krun: []float64{20, 10, 40}, ref: []float64{10, 10, 10},
			fio: []float64{40, 40, 40}, vsRef: 2, ofIO: 0.5},
		// Latencies: the reference's time over krun-core's.
		{name: "latency", higher: false, krun: []float64{50, 100}, ref: []float64{100, 100}, vsRef: 1.5},
		// A round with a zero on either side is left out of the ratio.
		{name: "zero", higher: true, krun: []float64{0, 30}, ref: []float64{10, 10}, vsRef: 3},
		{name: "no reference", higher: true, krun: []float64{1}, refMissing: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &benchFigure{Higher: tc.higher, Ref: sideQSD, Values: map[string][]float64{sideKrun: tc.krun}, CPU: map[string][]float64{}}
			if tc.ref != nil {
				f.Values[sideQSD] = tc.ref
			}
			if tc.fio != nil {
				f.Values[sideFio] = tc.fio
			}
			summarize(f)
			if math.Abs(f.VsRef-tc.vsRef) > 1e-9 || math.Abs(f.OfFio-tc.ofIO) > 1e-9 || f.RefMissing != tc.refMissing {
				t.Errorf("vs ref %v, of fio %v, ref missing %v; want %v, %v, %v", f.VsRef, f.OfFio, f.RefMissing, tc.vsRef, tc.ofIO, tc.refMissing)
			}
			if f.CPU != nil {
				t.Errorf("CPU %v, want nil when no side reported any", f.CPU)
			}
		})
	}
}

func TestParseFio(t *testing.T) {
	doc := `note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs":[{"job_runtime":2000,"read":{"iops":0},"write":{"iops":1500.5,"bw_bytes":6146048,"total_ios":3001,
"lat_ns":{"percentile":{"50.000000":20000,"99.000000":90000}}}}]}`
	w := blkWorkload{Name: "randwrite-4k-qd1", Write: true, BlockSize: 4096, Depth: 1}
	r, err := parseFio([]byte(doc), w)
	if err != nil {
		t.Fatal(err)
	}
	if r.Workload != w.Name || r.Requests != 3001 || r.IOPS != 1500.5 || r.Seconds != 2 || r.P50us != 20 || r.P99us != 90 {
		t.Errorf("parsed %+v", r)
	}
	for _, bad := range []string{`{"jobs":[]}`, `{"jobs":[{"write":{"iops":0}}]}`, `not json`} {
		if _, err := parseFio([]byte(bad), w); err == nil {
			t.Errorf("parseFio(%q): no error", bad)
		}
	}
}
