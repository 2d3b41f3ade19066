package cpio

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestCpioRoundTrip(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, []byte("from a host file"), 0o600); err != nil {
		t.Fatal(err)
	}
	entries := []Entry{
		{Name: "dir", Mode: Dir | 0o755},
		{Name: "dir/a", Mode: Reg | 0o644, Data: []byte("x")},     // 1 byte: padding
		{Name: "dir/bb", Mode: Reg | 0o600, Data: []byte("four")}, // exact multiple
		{Name: "dir/empty", Mode: Reg | 0o644},                    // no data
		{Name: "dir/host", Mode: Reg | 0o755, Src: src},           // streamed
		{Name: "dir/link", Mode: Symlink | 0o777, Data: []byte("a")},
		{Name: "dir/console", Mode: Char | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "dir/sda", Mode: Block | 0o600, RdevMajor: 8},
	}
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for i := range entries {
		if err := w.Add(&entries[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-aligned", buf.Len())
	}
	got, err := Read(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(entries) {
		t.Fatalf("read %d entries, wrote %d", len(got), len(entries))
	}
	for i, e := range entries {
		want := e.Data
		if e.Src != "" {
			want = []byte("from a host file")
		}
		g := got[i]
		if g.Name != e.Name || g.Mode != e.Mode || !bytes.Equal(g.Data, want) || g.RdevMajor != e.RdevMajor || g.RdevMinor != e.RdevMinor {
			t.Errorf("entry %d: got %+v, want %+v (data %q)", i, g, e, want)
		}
	}

	// GNU cpio, when installed, must agree on the member list.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-it", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -it: %v", err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name)
		}
		if g, w := strings.TrimSpace(string(out)), strings.Join(names, "\n"); g != w {
			t.Errorf("cpio -it lists\n%s\nwant\n%s", g, w)
		}
	}
}

func TestCpioRejects(t *testing.T) {
	tests := []struct {
		name string
		e    Entry
	}{
		{"dir with data", Entry{Name: "d", Mode: Dir | 0o755, Data: []byte("x")}},
		{"device with data", Entry{Name: "c", Mode: Char, Data: []byte("x")}},
		{"fifo", Entry{Name: "p", Mode: 0o010000 | 0o644}},
		{"nul in name", Entry{Name: "a\x00b", Mode: Reg | 0o644}},
		{"missing source", Entry{Name: "f", Mode: Reg | 0o644, Src: "/nonexistent/krun-vmtest"}},
		{"source for symlink", Entry{Name: "l", Mode: Symlink | 0o777, Src: "/etc/hostname"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := NewWriter(&bytes.Buffer{})
			if err := w.Add(&tc.e); err == nil {
				t.Errorf("Add accepted %+v", tc.e)
			}
		})
	}
}

func TestReadCpioMalformed(t *testing.T) {
	var good bytes.Buffer
	w := NewWriter(&good)
	if err := w.Add(&Entry{Name: "f", Mode: Reg | 0o644, Data: []byte("data")}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	g := good.Bytes()
	tests := map[string][]byte{
		"empty":       nil,
		"bad magic":   append([]byte("070707"), g[6:]...),
		"truncated":   g[:len(g)-20],
		"no trailer":  g[:HeaderLen+4+4], // header, name "f\0" padded, data
		"bad hex":     append(append([]byte{}, g[:6]...), append([]byte("zzzzzzzz"), g[14:]...)...),
		"huge name":   append(append([]byte{}, g[:94]...), append([]byte("ffffffff"), g[102:]...)...),
		"zero name":   append(append([]byte{}, g[:94]...), append([]byte("00000000"), g[102:]...)...),
		"size beyond": append(append([]byte{}, g[:54]...), append([]byte("7fffffff"), g[62:]...)...),
	}
	for name, b := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := Read(bytes.NewReader(b)); err == nil {
				t.Errorf("Read accepted a malformed archive")
			}
		})
	}
}
