package vmtest

import (
	"bytes"
	"compress/gzip"
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
	entries := []cpioEntry{
		{Name: "dir", Mode: cpioDir | 0o755},
		{Name: "dir/a", Mode: cpioReg | 0o644, Data: []byte("x")},     // 1 byte: padding
		{Name: "dir/bb", Mode: cpioReg | 0o600, Data: []byte("four")}, // exact multiple
		{Name: "dir/empty", Mode: cpioReg | 0o644},                    // no data
		{Name: "dir/host", Mode: cpioReg | 0o755, Src: src},           // streamed
		{Name: "dir/link", Mode: cpioSymlink | 0o777, Data: []byte("a")},
		{Name: "dir/console", Mode: cpioChar | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "dir/sda", Mode: cpioBlock | 0o600, RdevMajor: 8},
	}
	var buf bytes.Buffer
	w := newCpioWriter(&buf)
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
	got, err := readCpio(bytes.NewReader(buf.Bytes()))
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
		e    cpioEntry
	}{
		{"dir with data", cpioEntry{Name: "d", Mode: cpioDir | 0o755, Data: []byte("x")}},
		{"device with data", cpioEntry{Name: "c", Mode: cpioChar, Data: []byte("x")}},
		{"fifo", cpioEntry{Name: "p", Mode: 0o010000 | 0o644}},
		{"nul in name", cpioEntry{Name: "a\x00b", Mode: cpioReg | 0o644}},
		{"missing source", cpioEntry{Name: "f", Mode: cpioReg | 0o644, Src: "/nonexistent/krun-vmtest"}},
		{"source for symlink", cpioEntry{Name: "l", Mode: cpioSymlink | 0o777, Src: "/etc/hostname"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := newCpioWriter(&bytes.Buffer{})
			if err := w.Add(&tc.e); err == nil {
				t.Errorf("Add accepted %+v", tc.e)
			}
		})
	}
}

func TestReadCpioMalformed(t *testing.T) {
	var good bytes.Buffer
	w := newCpioWriter(&good)
	if err := w.Add(&cpioEntry{Name: "f", Mode: cpioReg | 0o644, Data: []byte("data")}); err != nil {
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
		"no trailer":  g[:cpioHeaderLen+4+4], // header, name "f\0" padded, data
		"bad hex":     append(append([]byte{}, g[:6]...), append([]byte("zzzzzzzz"), g[14:]...)...),
		"huge name":   append(append([]byte{}, g[:94]...), append([]byte("ffffffff"), g[102:]...)...),
		"zero name":   append(append([]byte{}, g[:94]...), append([]byte("00000000"), g[102:]...)...),
		"size beyond": append(append([]byte{}, g[:54]...), append([]byte("7fffffff"), g[62:]...)...),
	}
	for name, b := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := readCpio(bytes.NewReader(b)); err == nil {
				t.Errorf("readCpio accepted a malformed archive")
			}
		})
	}
}

func TestInitramfsLayout(t *testing.T) {
	host := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(host, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ib := NewInitramfs()
	// A fake /bin/sh lets Write run without busybox.
	ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
	ib.AddFile("/opt/deep/dir/tool", host, 0o700)
	ib.AddSymlink("/usr/bin/tool", "/opt/deep/dir/tool")
	ib.SetInit("echo hi")
	out := filepath.Join(t.TempDir(), "initrd")
	if err := ib.Write(out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries, err := readCpio(f)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]cpioEntry{}
	for _, e := range entries {
		// Every parent must precede its child: the kernel creates nothing implicitly.
		if dir := filepath.Dir(e.Name); dir != "." {
			p, ok := seen[dir]
			if !ok || p.Mode&cpioTypeMask != cpioDir {
				t.Errorf("%s precedes its directory %s", e.Name, dir)
			}
		}
		seen[e.Name] = e
	}
	for name, mode := range map[string]uint32{
		"init":                 cpioReg | 0o755,
		"dev/console":          cpioChar | 0o600,
		"opt/deep/dir/tool":    cpioReg | 0o700,
		"usr/bin/tool":         cpioSymlink | 0o777,
		"tmp":                  cpioDir | 0o1777,
		"etc/krun-e2e/test.sh": cpioReg | 0o755,
	} {
		if e, ok := seen[name]; !ok || e.Mode != mode {
			t.Errorf("%s: mode %#o present=%v, want %#o", name, e.Mode, ok, mode)
		}
	}
	if c := seen["dev/console"]; c.RdevMajor != 5 || c.RdevMinor != 1 {
		t.Errorf("/dev/console is %d:%d, want 5:1", c.RdevMajor, c.RdevMinor)
	}
	if !strings.Contains(string(seen["etc/krun-e2e/test.sh"].Data), "echo hi") {
		t.Errorf("test script lacks the user's script")
	}
	if !strings.Contains(string(seen["etc/krun-e2e/lib.sh"].Data), ib.ResultMarker()) {
		t.Errorf("guest helpers lack the result marker %q", ib.ResultMarker())
	}
}

func TestInitramfsGzip(t *testing.T) {
	ib := NewInitramfs()
	ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
	ib.SetCompression(CompressGzip)
	out := filepath.Join(t.TempDir(), "initrd.gz")
	if err := ib.Write(out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("not gzip: %v", err)
	}
	entries, err := readCpio(zr)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range entries {
		found = found || e.Name == "init"
	}
	if !found {
		t.Errorf("no /init in the gzip archive")
	}
}

func TestInitramfsErrors(t *testing.T) {
	tests := []struct {
		name  string
		build func(ib *Initramfs)
	}{
		{"relative path", func(ib *Initramfs) { ib.AddBytes("bin/x", nil, 0o644) }},
		{"root", func(ib *Initramfs) { ib.AddDir("/", 0o755) }},
		{"missing host file", func(ib *Initramfs) { ib.AddFile("/x", "/nonexistent/krun-vmtest", 0o644) }},
		{"host dir", func(ib *Initramfs) { ib.AddFile("/x", "/", 0o644) }},
		{"file as parent", func(ib *Initramfs) {
			ib.AddBytes("/a", nil, 0o644)
			ib.AddBytes("/a/b", nil, 0o644)
		}},
		{"nil kernel", func(ib *Initramfs) { ib.AddModules(nil, "virtio_blk") }},
		{"no shell", func(ib *Initramfs) { delete(ib.nodes, "/bin/sh") }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ib := NewInitramfs()
			ib.AddBytes("/bin/sh", []byte("fake"), 0o755)
			tc.build(ib)
			if err := ib.Write(filepath.Join(t.TempDir(), "initrd")); err == nil {
				t.Errorf("Write succeeded")
			}
		})
	}
}
