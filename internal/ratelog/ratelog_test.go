package ratelog

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

func TestLimiter(t *testing.T) {
	var l Limiter
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at       time.Duration
		ok       bool
		unlogged uint64
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{5 * time.Second, false, 0},
		{DefaultEvery, true, 2},
		{DefaultEvery + time.Millisecond, false, 0},
		{3 * DefaultEvery, true, 1},
	}
	for i, s := range steps {
		ok, n := l.allowAt(t0.Add(s.at))
		if ok != s.ok || n != s.unlogged {
			t.Errorf("step %d (+%v): Allow = %v, %d; want %v, %d", i, s.at, ok, n, s.ok, s.unlogged)
		}
	}
}

// TestLimiterConcurrent: of many events at once, one is logged.
func TestLimiterConcurrent(t *testing.T) {
	l := Limiter{Every: time.Hour}
	var wg sync.WaitGroup
	var mu sync.Mutex
	allowed := 0
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if ok, _ := l.Allow(); ok {
				mu.Lock()
				allowed++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if allowed != 1 {
		t.Errorf("%d of 64 concurrent events logged, want 1", allowed)
	}
}

// TestWarnAndError: the first event is logged at the limiter's level
// (a warning, an error), the next ones within the interval as debug lines,
// and the next one logged counts them.
func TestWarnAndError(t *testing.T) {
	for _, tc := range []struct {
		level string
		log   func(l *Limiter, log hclog.Logger, msg string, args ...any)
	}{
		{"[WARN]", (*Limiter).Warn},
		{"[ERROR]", (*Limiter).Error},
	} {
		buf := &syncbuf.Buffer{}
		log := hclog.New(&hclog.LoggerOptions{Output: buf, Level: hclog.Debug})
		l := Limiter{Every: time.Hour}
		for range 3 {
			tc.log(&l, log, "refused", "k", 1)
		}
		l.last.Store(1) // the interval has passed
		tc.log(&l, log, "refused", "k", 2)
		out := buf.String()
		if w, d := strings.Count(out, tc.level), strings.Count(out, "[DEBUG]"); w != 2 || d != 2 {
			t.Fatalf("%d %s lines and %d debug lines, want 2 and 2:\n%s", w, tc.level, d, out)
		}
		if !strings.Contains(out, "k=2 unlogged_before=2") || strings.Count(out, "unlogged_before") != 1 {
			t.Errorf("the second %s line does not say the 2 events left unlogged (and only it):\n%s", tc.level, out)
		}
	}
}

func TestBudget(t *testing.T) {
	b := Budget{Burst: 3, PerSecond: 2}
	t0 := time.Unix(1000, 0)
	type step struct {
		at      time.Duration
		ok      bool
		refused uint64
	}
	for i, s := range []step{
		{0, true, 0}, {0, true, 0}, {0, true, 0}, // the burst
		{0, false, 0}, {100 * time.Millisecond, false, 0}, // 0.2 of a token
		{500 * time.Millisecond, true, 2},  // one token back; two refused before
		{500 * time.Millisecond, false, 0}, // spent
		{10 * time.Second, true, 1},        // refilled, to the burst only
		{10 * time.Second, true, 0},
		{10 * time.Second, true, 0},
		{10 * time.Second, false, 0},
		{9 * time.Second, false, 0}, // time going back refills nothing
	} {
		ok, refused := b.allowAt(t0.Add(s.at))
		if ok != s.ok || refused != s.refused {
			t.Errorf("step %d at %v: Allow = %v, %d; want %v, %d", i, s.at, ok, refused, s.ok, s.refused)
		}
	}
}
