package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
	"github.com/krun-core/krun-core/virtq"
)

// pluginDir holds krun-plugin-null, built once from this package.
var pluginDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "plugin-null-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, "krun-plugin-null"), ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building krun-plugin-null: %v\n%s", err, out)
		os.Exit(1)
	}
	pluginDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// logSink collects the host log (the plugin's lines included).
type logSink struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logSink) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func socketPair(t *testing.T) (plugin, guest *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "plugin-end"), os.NewFile(uintptr(fds[1]), "guest-end")
}

// launch starts krun-plugin-null on sock, configured with opts and
// handed files.
func launch(t *testing.T, sock *os.File, sandboxed bool, opts map[string]string, files ...pluginhost.NamedFile) (*pluginhost.Plugin, *logSink) {
	t.Helper()
	logs := &logSink{}
	cfg := pluginhost.Config{
		Kind:      "null",
		PluginDir: pluginDir,
		Socket:    sock,
		Files:     files,
		Logger:    hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug}),
	}
	if sandboxed {
		cfg.Sandbox = sandbox.LaunchConfig{Log: cfg.Logger}
	} else {
		cfg.SandboxOff = true
	}
	p, err := pluginhost.Launch(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("host log:\n%s", logs)
		}
	})
	dev, note, err := p.Configure(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if dev.Type != DeviceTypeEntropy || dev.NumQueues != 1 || len(dev.Config) != 0 {
		t.Fatalf("configured device %+v", dev)
	}
	if dev.Features&backend.FrameworkFeatures != backend.FrameworkFeatures {
		t.Errorf("offered features %#x lack the framework's %#x", dev.Features, backend.FrameworkFeatures)
	}
	if sandboxed != strings.HasPrefix(note, "restricted") {
		t.Errorf("sandbox note %q (sandboxed: %v)", note, sandboxed)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return p, logs
}

// guestOn starts a test guest with 16-entry rings on the front-end end
// of a socket pair; it is closed when the test ends.
func guestOn(t *testing.T, guestEnd *os.File) *testguest.Guest {
	t.Helper()
	c, err := frontend.NewFromFile(guestEnd)
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Start(c, testguest.Options{QueueSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// fetch posts one device-writable buffer of n bytes prefilled with 0xAA and
// returns what the device wrote.
func fetch(t *testing.T, g *testguest.Guest, n uint32) []byte {
	t.Helper()
	r := g.Rings[0]
	addr, err := g.Mem.Alloc(uint64(n), 16)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Mem.Free(addr)
	buf, err := g.Mem.Bytes(addr, uint64(n))
	if err != nil {
		t.Fatal(err)
	}
	for i := range buf {
		buf[i] = 0xAA
	}
	if _, err := r.Post([]testguest.Segment{{Addr: addr, Len: n, Writable: true}}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Kick(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var done []testguest.Completion
	for len(done) == 0 {
		c, err := r.Wait(ctx)
		if err != nil {
			t.Fatalf("waiting for the entropy device: %v", err)
		}
		done = append(done, c...)
	}
	if len(done) != 1 {
		t.Fatalf("%d completions for one request", len(done))
	}
	return append([]byte(nil), buf[:min(done[0].Len, n)]...)
}

func TestEntropyOverConnectedSocket(t *testing.T) {
	for _, sandboxed := range []bool{true, false} {
		t.Run(fmt.Sprintf("sandbox=%v", sandboxed), func(t *testing.T) {
			pluginEnd, guestEnd := socketPair(t)
			defer guestEnd.Close()
			p, logs := launch(t, pluginEnd, sandboxed, map[string]string{"fill": "zero"})
			pluginEnd.Close() // the plugin has its own copy

			if sandboxed {
				if err := (sandbox.LaunchConfig{}).Verify(p.Pid()); err != nil {
					t.Errorf("plugin not confined after Configure: %v", err)
				}
			}
			g := guestOn(t, guestEnd)
			got := fetch(t, g, 4096)
			if len(got) != 4096 || !bytes.Equal(got, make([]byte, 4096)) {
				t.Fatalf("fill=zero device wrote %d bytes, not all zero", len(got))
			}
			stats, err := p.Stats(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if stats["requests"] != 1 || stats["bytes"] != 4096 || stats["q0.requests"] != 1 {
				t.Errorf("stats %v, want 1 request of 4096 bytes", stats)
			}
			st, msg, err := p.Health(context.Background())
			if err != nil || st.String() != "STATE_SERVING" {
				t.Errorf("Health = %v %q %v", st, msg, err)
			}
			d, err := p.Describe(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			pol, err := sandbox.ParsePolicy(d.PolicyJSON)
			if err != nil || pol.Kind != "null" || d.Kind != "null" || !d.Configured || d.SDKVersion != pluginsdk.Version {
				t.Errorf("Describe = %+v, policy %+v, %v", d, pol, err)
			}
			if err := p.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
			if err := p.Err(); err != nil {
				t.Errorf("exit after Shutdown: %v", err)
			}
			if !strings.Contains(logs.String(), "krun-plugin-null: configured") {
				t.Errorf("the plugin's log did not reach the host log")
			}
		})
	}
}

// TestEntropyFromAFile: a file the user names on --plugin
// (file.source=PATH) is opened by krun-core (devspec) and handed to the
// sandboxed plugin, which serves its bytes; the plugin itself cannot open
// anything.
func TestEntropyFromAFile(t *testing.T) {
	src := filepath.Join(t.TempDir(), "seed")
	want := bytes.Repeat([]byte("krun-core entropy from a file "), 100)
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	spec, err := devspec.ParsePlugin("null,fill=file,file.source=" + src)
	if err != nil {
		t.Fatal(err)
	}
	opened, err := spec.Open(devspec.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer opened.Close()
	var files []pluginhost.NamedFile
	for _, f := range opened.Files {
		files = append(files, pluginhost.NamedFile{Name: f.Name, File: f.File})
	}
	pluginEnd, guestEnd := socketPair(t)
	defer guestEnd.Close()
	p, _ := launch(t, pluginEnd, true, opened.Options, files...)
	pluginEnd.Close()
	g := guestOn(t, guestEnd)
	got := fetch(t, g, 1024)
	got = append(got, fetch(t, g, 4096)...) // the rest: the file ends first
	if !bytes.Equal(got, want) {
		t.Errorf("the device served %d bytes, not the file's %d", len(got), len(want))
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestEntropyListeningReconnect serves a listening socket, as
// `krun-core serve` does: a front-end disconnects and connects again.
func TestEntropyListeningReconnect(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rng.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false) // the file stays for the plugin's copy
	lf, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	p, _ := launch(t, lf, true, nil)
	lf.Close()

	var first []byte
	for i := 0; i < 2; i++ {
		g, err := testguest.Dial(path, testguest.Options{QueueSize: 16})
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		got := fetch(t, g, 512)
		g.Close()
		if len(got) != 512 || bytes.Equal(got, bytes.Repeat([]byte{0xAA}, 512)) || bytes.Equal(got, first) {
			t.Fatalf("connection %d: random fill wrote %d bytes %x...", i+1, len(got), got[:min(len(got), 16)])
		}
		first = got
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestConfigureErrors(t *testing.T) {
	tests := []struct {
		opts map[string]string
		want string
	}{
		{map[string]string{"size": "1"}, `plugin null: Configure: unknown option "size" (want fill)`},
		{map[string]string{"fill": "ones"}, `plugin null: Configure: option fill="ones": want random, zero or file`},
		{map[string]string{"fill": "file"}, `plugin null: Configure: fill=file needs the file to read: file.source=PATH`},
	}
	for _, tc := range tests {
		pluginEnd, guestEnd := socketPair(t)
		p, err := pluginhost.Launch(pluginhost.Config{Kind: "null", PluginDir: pluginDir, Socket: pluginEnd, SandboxOff: true})
		pluginEnd.Close()
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = p.Configure(context.Background(), tc.opts)
		if err == nil || err.Error() != tc.want {
			t.Errorf("Configure(%v) = %v, want %q", tc.opts, err, tc.want)
		}
		if err := p.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "Start in state failed") {
			t.Errorf("Start after a failed Configure: %v", err)
		}
		if st, msg, _ := p.Health(context.Background()); st.String() != "STATE_FAILED" || !strings.Contains(msg, "fill") && !strings.Contains(msg, "size") {
			t.Errorf("Health after a failed Configure: %v %q", st, msg)
		}
		p.Kill()
		guestEnd.Close()
	}
}

// TestHandle drives the device's request handler directly with hostile
// chains: no writable buffer, a huge buffer (capped).
func TestHandleWithoutWritable(t *testing.T) {
	d := newEntropy(zeros{}, hclog.NewNullLogger())
	var c virtq.Chain
	n, err := d.handle(&c)
	if n != 0 || !errors.Is(err, errNoWritable) {
		t.Fatalf("handle(empty chain) = %d, %v", n, err)
	}
	if got := d.Counters(); got["err_no_writable"] != 1 || got["requests"] != 1 {
		t.Fatalf("counters %v", got)
	}
	var cfg [4]byte
	if err := d.ReadConfig(0, cfg[:]); err == nil {
		t.Error("ReadConfig of a device without config space succeeded")
	}
	if err := d.WriteConfig(0, cfg[:]); err == nil {
		t.Error("WriteConfig succeeded")
	}
	if _, err := json.Marshal(nullPlugin{}.Policy(nil)); err != nil {
		t.Fatal(err)
	}
	if err := (nullPlugin{}).Policy(nil).Validate(); err != nil {
		t.Fatalf("declared policy invalid: %v", err)
	}
}

// BenchmarkLaunchToFirstRPC measures starting an SDK plugin up to its first
// answered RPC (Describe), with and without the launcher-side sandbox
// (namespaces cost a few milliseconds).
func BenchmarkLaunchToFirstRPC(b *testing.B) {
	for _, sandboxed := range []bool{false, true} {
		b.Run(fmt.Sprintf("sandbox=%v", sandboxed), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				pluginEnd, guestEnd := socketPairB(b)
				cfg := pluginhost.Config{Kind: "null", PluginDir: pluginDir, Socket: pluginEnd, SandboxOff: !sandboxed}
				if sandboxed {
					cfg.Sandbox = sandbox.LaunchConfig{Log: hclog.NewNullLogger()}
				}
				b.StartTimer()
				p, err := pluginhost.Launch(cfg)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := p.Describe(context.Background()); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p.Kill()
				pluginEnd.Close()
				guestEnd.Close()
				b.StartTimer()
			}
		})
	}
}

func socketPairB(b *testing.B) (*os.File, *os.File) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "plugin-end"), os.NewFile(uintptr(fds[1]), "guest-end")
}
