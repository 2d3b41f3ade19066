package vmtest

import (
	"errors"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestConsoleExpect(t *testing.T) {
	var mu sync.Mutex
	var logged []string
	c := newConsole(time.Now(), func(s string) { mu.Lock(); logged = append(logged, s); mu.Unlock() }, "READY")

	go func() {
		for _, chunk := range []string{"boot", "ing...\r\nREA", "DY 1.5\nvalue=4", "2\n"} {
			time.Sleep(5 * time.Millisecond)
			c.Write([]byte(chunk))
		}
	}()
	m, err := c.expect(regexp.MustCompile(`READY ([0-9.]+)`), 5*time.Second)
	if err != nil || m[1] != "1.5" {
		t.Fatalf("expect READY: %v %q", err, m)
	}
	m, err = c.expect(regexp.MustCompile(`value=(\d+)\n`), 5*time.Second)
	if err != nil || m[1] != "42" {
		t.Fatalf("expect value: %v %q", err, m)
	}
	// The cursor moved past READY: it is not found again.
	if _, err := c.expect(regexp.MustCompile(`READY`), 20*time.Millisecond); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("second READY: err = %v, want timeout", err)
	}
	if _, ok := c.mark("READY"); !ok {
		t.Errorf("READY line not marked")
	}
	c.Write([]byte("partial"))
	c.flush()
	c.close()
	if _, err := c.expect(regexp.MustCompile(`never`), time.Second); !errors.Is(err, ErrConsoleClosed) {
		t.Errorf("after close: err = %v, want ErrConsoleClosed", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(logged) != 4 || !strings.HasSuffix(logged[0], "| booting...") || !strings.HasSuffix(logged[3], "| partial") {
		t.Errorf("logged lines %q", logged)
	}
	if got := c.String(); got != "booting...\r\nREADY 1.5\nvalue=42\npartial" {
		t.Errorf("String() = %q", got)
	}
}

func TestConsoleBounded(t *testing.T) {
	c := newConsole(time.Now(), nil)
	c.max = 64 << 10
	chunk := []byte(strings.Repeat("x", 1000) + "\n")
	for i := 0; i < c.max/len(chunk)+3; i++ {
		c.Write(chunk)
	}
	c.Write([]byte("tail-marker"))
	if n := len(c.String()); n > c.max {
		t.Errorf("buffer grew to %d bytes, limit %d", n, c.max)
	}
	if _, err := c.expect(regexp.MustCompile(`tail-marker`), time.Second); err != nil {
		t.Errorf("expect after dropping old output: %v", err)
	}
}

func TestLastLines(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"a\nb\nc\n", 2, "b\nc"},
		{"a\nb\r\n", 5, "a\nb"},
		{"a\nb\nc", 3, "a\nb\nc"},
		{"", 3, ""},
	} {
		if got := LastLines(tc.in, tc.n); got != tc.want {
			t.Errorf("LastLines(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}
