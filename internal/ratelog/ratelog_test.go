package ratelog

import (
	"sync"
	"testing"
	"time"
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
