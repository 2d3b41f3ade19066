package vmm

import (
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/krun-core/krun-core/internal/lines"
)

// ConsoleTailLines is how many console lines Result.ConsoleTail keeps
// (besides a kernel panic's line).
const ConsoleTailLines = 30

// consoleTailWidth cuts a line kept for Result.ConsoleTail: the lines are
// shown on the user's terminal; a kernel's are far shorter, a guest's
// flood is cut.
const consoleTailWidth = 512

// panicMarker starts the line of a kernel panic, which says why the
// guest rebooted (panic=-1); the trace after it can be longer than the
// tail.
const panicMarker = "Kernel panic - not syncing"

// consoleTail keeps what Result.ConsoleTail shows.
type consoleTail struct {
	last lines.Tail
	// flush passes on a last line the guest left without a newline (the
	// console writer's Flush); called once the VM has stopped.
	flush func()

	mu        sync.Mutex
	added     int    // lines added
	panicLine string // the last line with panicMarker
	panicAt   int    // its number in added
}

func newConsoleTail() *consoleTail {
	return &consoleTail{last: lines.Tail{N: ConsoleTailLines}}
}

// add keeps one printable console line.
func (t *consoleTail) add(l string) {
	if len(l) > consoleTailWidth {
		n := consoleTailWidth
		for n > 0 && !utf8.RuneStart(l[n]) {
			n--
		}
		l = l[:n] + "..."
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.added++
	if strings.Contains(l, panicMarker) {
		t.panicLine, t.panicAt = l, t.added
	}
	t.last.Add(l)
}

// lines returns the last lines, after the panic's line and "..." when it
// is no longer among them. A line without a newline at the end of the
// console is passed on first: the VM has stopped.
func (t *consoleTail) lines() []string {
	if t.flush != nil {
		t.flush()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	got := t.last.Lines()
	if t.panicLine != "" && t.added-t.panicAt >= len(got) {
		return append([]string{t.panicLine, "..."}, got...)
	}
	return got
}
