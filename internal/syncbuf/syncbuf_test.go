package syncbuf

import (
	"strings"
	"sync"
	"testing"
)

// TestConcurrentWrites: writers on several goroutines and a reader at the
// same time (go test -race finds a missing lock); every write is kept whole.
func TestConcurrentWrites(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				b.Write([]byte("abc\n"))
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	s := b.String()
	if n := strings.Count(s, "abc\n"); n != 800 || len(s) != 800*4 {
		t.Fatalf("%d whole writes in %d bytes, want 800 in 3200", n, len(s))
	}
}
