package pluginhost

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/krun-core/krun-core/devopts"
)

// Defaults of RestartPolicy: at most DefaultRestartMax restarts within
// DefaultRestartWindow. A restart comes at once, unless the previous one
// was less than Window/Max ago (the plugin dies faster than the budget
// allows on average): then after DefaultRestartBackoff, doubling with each
// such restart in a row, up to DefaultRestartMaxBackoff.
const (
	DefaultRestartMax        = 5
	DefaultRestartWindow     = 60 * time.Second
	DefaultRestartBackoff    = 250 * time.Millisecond
	DefaultRestartMaxBackoff = 4 * time.Second
)

// Health checking of a running plugin: Health is asked every
// HealthInterval, and a plugin that does not answer within HealthTimeout
// counts as hung.
const (
	HealthInterval = 2 * time.Second
	HealthTimeout  = 10 * time.Second
)

// RestartPolicy bounds how often a plugin that dies (or stops answering)
// is started again. The zero value is the default policy.
type RestartPolicy struct {
	// Max is how many restarts the Window allows; 0 means
	// DefaultRestartMax, a negative value none (the device fails at the
	// first death, as without restarts).
	Max int
	// Window is the sliding window Max counts in; 0 means
	// DefaultRestartWindow.
	Window time.Duration
}

// ParseRestartPolicy parses the command line's form: "N/DURATION" (at
// most N restarts within DURATION, e.g. "5/60s"), "N" (within the default
// window) or "off".
func ParseRestartPolicy(s string) (RestartPolicy, error) {
	if s == "off" || s == "0" {
		return RestartPolicy{Max: -1}, nil
	}
	n, w, hasW := strings.Cut(s, "/")
	max, ok := devopts.Decimal(n)
	if !ok || max > 10000 {
		return RestartPolicy{}, fmt.Errorf("restarts %q: want N/DURATION (e.g. 5/60s), N, or off", s)
	}
	p := RestartPolicy{Max: max}
	if hasW {
		d, err := time.ParseDuration(w)
		if err != nil || d <= 0 || d > 24*time.Hour {
			return RestartPolicy{}, fmt.Errorf("restarts %q: window %q is not a duration in (0, 24h]", s, w)
		}
		p.Window = d
	}
	return p, nil
}

// String is the form ParseRestartPolicy reads.
func (p RestartPolicy) String() string {
	if p.max() < 0 {
		return "off"
	}
	return fmt.Sprintf("%d/%v", p.max(), p.window())
}

func (p RestartPolicy) max() int {
	if p.Max == 0 {
		return DefaultRestartMax
	}
	return p.Max
}

func (p RestartPolicy) window() time.Duration {
	if p.Window <= 0 {
		return DefaultRestartWindow
	}
	return p.Window
}

// ErrRestartsExhausted is wrapped by Restarts.Next's error when the policy
// allows no further restart.
var ErrRestartsExhausted = errors.New("plugin restart limit reached")

// Restarts is the restart budget of one plugin under a policy. It is safe
// for concurrent use.
type Restarts struct {
	policy RestartPolicy

	mu     sync.Mutex
	times  []time.Time // restarts within the window, oldest first
	last   time.Time   // the latest restart
	streak int         // restarts in a row, each soon after the previous one
	total  int
}

// NewRestarts starts an empty budget.
func NewRestarts(p RestartPolicy) *Restarts { return &Restarts{policy: p} }

// Policy is the budget's policy.
func (r *Restarts) Policy() RestartPolicy { return r.policy }

// Enabled reports whether the policy allows restarts at all.
func (r *Restarts) Enabled() bool { return r.policy.max() > 0 }

// Next records a restart at now and returns how long to wait before it: 0,
// unless the previous restart was less than Window/Max ago; then
// DefaultRestartBackoff, doubling with each such restart in a row, up to
// DefaultRestartMaxBackoff. It returns an error wrapping
// ErrRestartsExhausted when the window holds Max restarts already.
func (r *Restarts) Next(now time.Time) (time.Duration, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	max, win := r.policy.max(), r.policy.window()
	if max <= 0 {
		return 0, fmt.Errorf("%w: restarts are off", ErrRestartsExhausted)
	}
	keep := r.times[:0]
	for _, t := range r.times {
		if now.Sub(t) < win {
			keep = append(keep, t)
		}
	}
	r.times = keep
	if len(r.times) >= max {
		return 0, fmt.Errorf("%w: %d restarts within %v", ErrRestartsExhausted, len(r.times), win)
	}
	if r.total > 0 && now.Sub(r.last) < win/time.Duration(max) {
		r.streak++
	} else {
		r.streak = 0
	}
	var delay time.Duration
	if r.streak > 0 {
		delay = DefaultRestartMaxBackoff
		if r.streak < 8 {
			delay = min(DefaultRestartBackoff<<(r.streak-1), DefaultRestartMaxBackoff)
		}
	}
	r.last = now
	r.times = append(r.times, now)
	r.total++
	return delay, nil
}

// Total is the number of restarts recorded so far.
func (r *Restarts) Total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}
