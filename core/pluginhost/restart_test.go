package pluginhost

import (
	"errors"
	"testing"
	"time"
)

func TestRestartsBudgetAndBackoff(t *testing.T) {
	r := NewRestarts(RestartPolicy{})
	t0 := time.Unix(1000, 0)
	want := []time.Duration{0, 250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second}
	for i, w := range want {
		d, err := r.Next(t0.Add(time.Duration(i) * time.Second))
		if err != nil || d != w {
			t.Fatalf("restart %d: delay %v, err %v; want %v", i, d, err, w)
		}
	}
	if _, err := r.Next(t0.Add(10 * time.Second)); !errors.Is(err, ErrRestartsExhausted) {
		t.Fatalf("sixth restart within the window: %v", err)
	}
	// Once the first restarts leave the window, restarts are allowed
	// again; this one comes long after the previous: at once.
	d, err := r.Next(t0.Add(61500 * time.Millisecond))
	if err != nil || d != 0 {
		t.Fatalf("restart after the window moved: %v, %v", d, err)
	}
	if r.Total() != 6 {
		t.Fatalf("total %d", r.Total())
	}
	d, err = r.Next(t0.Add(10 * time.Minute))
	if err != nil || d != 0 {
		t.Fatalf("restart after a quiet window: %v, %v", d, err)
	}
}

// A plugin that dies less often than Window/Max is restarted at once every
// time; the back-off is for one that dies faster.
func TestRestartsNoBackoffWhenSpaced(t *testing.T) {
	r := NewRestarts(RestartPolicy{Max: 100, Window: 100 * time.Second}) // one a second on average
	t0 := time.Unix(0, 0)
	for i := range 20 {
		d, err := r.Next(t0.Add(time.Duration(i) * 1500 * time.Millisecond))
		if err != nil || d != 0 {
			t.Fatalf("restart %d: %v, %v", i, d, err)
		}
	}
	if d, _ := r.Next(t0.Add(29 * time.Second)); d != DefaultRestartBackoff {
		t.Fatalf("a restart half a second after the previous: delay %v", d)
	}
}

func TestRestartsBackoffCapped(t *testing.T) {
	r := NewRestarts(RestartPolicy{Max: 40, Window: time.Hour})
	var last time.Duration
	for i := range 40 {
		d, err := r.Next(time.Unix(int64(i), 0))
		if err != nil {
			t.Fatal(err)
		}
		last = d
	}
	if last != DefaultRestartMaxBackoff {
		t.Fatalf("delay %v, want the cap %v", last, DefaultRestartMaxBackoff)
	}
}

func TestRestartsOff(t *testing.T) {
	r := NewRestarts(RestartPolicy{Max: -1})
	if r.Enabled() {
		t.Fatal("enabled")
	}
	if _, err := r.Next(time.Now()); !errors.Is(err, ErrRestartsExhausted) {
		t.Fatal(err)
	}
}

func TestParseRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want RestartPolicy
		ok   bool
	}{
		{"5/60s", RestartPolicy{Max: 5, Window: time.Minute}, true},
		{"30/10m", RestartPolicy{Max: 30, Window: 10 * time.Minute}, true},
		{"7", RestartPolicy{Max: 7}, true},
		{"off", RestartPolicy{Max: -1}, true},
		{"0", RestartPolicy{Max: -1}, true},
		{"-1", RestartPolicy{}, false},
		{"5/", RestartPolicy{}, false},
		{"5/-1s", RestartPolicy{}, false},
		{"x/1s", RestartPolicy{}, false},
		{"", RestartPolicy{}, false},
	} {
		got, err := ParseRestartPolicy(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("%q: %+v, %v", tc.in, got, err)
		}
	}
	if s := (RestartPolicy{}).String(); s != "5/1m0s" {
		t.Errorf("default policy prints as %q", s)
	}
}
