package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// fakeDevice is a back-end device with a config space of its own or none.
type fakeDevice struct {
	typ      uint32
	queues   int
	features uint64
	config   []byte // nil: no VHOST_USER_PROTOCOL_F_CONFIG
}

func (f *fakeDevice) Info() backend.DeviceInfo {
	i := backend.DeviceInfo{Type: f.typ, NumQueues: f.queues, MaxQueueSize: 256, Features: f.features}
	if f.config != nil {
		i.ProtocolFeatures = vhostuser.ProtocolConfig
	}
	return i
}

func (f *fakeDevice) ReadConfig(off uint32, p []byte) error {
	if uint64(off)+uint64(len(p)) > uint64(len(f.config)) {
		return errors.New("outside")
	}
	copy(p, f.config[off:])
	return nil
}
func (f *fakeDevice) WriteConfig(uint32, []byte) error { return errors.New("read-only") }
func (f *fakeDevice) SetFeatures(uint64) error         { return nil }
func (f *fakeDevice) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: f}, nil
}

// Handle completes every request with nothing written: the fake device
// only negotiates and shows its config space.
func (f *fakeDevice) Handle(req *backend.Request) { req.Complete(0) }
func (f *fakeDevice) Reset()                      {}

// serveFake serves dev on a fresh listening socket until the test ends.
func serveFake(t *testing.T, dev backend.Device) string {
	t.Helper()
	srv, err := backend.NewServer(dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortDir(t), "be.sock")
	backendtest.Serve(t, srv, sock)
	return sock
}

func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "vu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func externalSpec(t *testing.T, s string) *devspec.VhostUserSpec {
	t.Helper()
	v, err := devspec.ParseVhostUser(s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestExternalConfigSpace(t *testing.T) {
	c := NewContext(nil)
	ctx := context.Background()

	// The C virtiofsd: no config space; the tag comes from the options.
	sock := serveFake(t, &fakeDevice{typ: 26, queues: 2, features: fsFNotification})
	d, err := c.connectExternal(ctx, 0, externalSpec(t, "type=fs,tag=share,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer d.shutdown(c.log)
	if d.info.NumQueues != 2 || d.info.MaxQueueSize != 128 || d.info.Type != 26 {
		t.Errorf("device info %+v", d.info)
	}
	if d.featureMask&fsFNotification == 0 {
		t.Error("VIRTIO_FS_F_NOTIFICATION offered without a notification queue")
	}
	tag, err := d.backend.GetConfig(0, 36)
	if err != nil || string(bytes.TrimRight(tag, "\x00")) != "share" {
		t.Errorf("tag %q, %v", tag, err)
	}
	if q, err := d.backend.GetConfig(36, 4); err != nil || binary.LittleEndian.Uint32(q) != 1 {
		t.Errorf("num_request_queues % x, %v", q, err)
	}
	if _, err := d.backend.GetConfig(38, 4); err == nil {
		t.Error("a read past the core's config space succeeded")
	}
	if err := d.backend.SetConfig(0, 0, []byte{1}); err == nil {
		t.Error("the core's config space took a write")
	}

	// A back-end with a config space: its tag, the core's queue count.
	cfg := make([]byte, 40)
	copy(cfg, "from-backend")
	binary.LittleEndian.PutUint32(cfg[36:], 7)
	sock = serveFake(t, &fakeDevice{typ: 26, queues: 8, config: cfg})
	d2, err := c.connectExternal(ctx, 1, externalSpec(t, "type=fs,tag=ignored,queues=2,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer d2.shutdown(c.log)
	if tag, err := d2.backend.GetConfig(0, 12); err != nil || string(tag) != "from-backend" {
		t.Errorf("tag %q, %v: want the back-end's", tag, err)
	}
	if q, err := d2.backend.GetConfig(34, 4); err != nil || !bytes.Equal(q, []byte{0, 0, 2, 0}) {
		t.Errorf("bytes 34..38 % x, %v: want the back-end's 0 0 then the core's count 2", q, err)
	}

	// blk: the back-end's capacity, the core's num_queues.
	blkCfg := make([]byte, 60)
	binary.LittleEndian.PutUint64(blkCfg, 2048)
	binary.LittleEndian.PutUint16(blkCfg[34:], 16)
	sock = serveFake(t, &fakeDevice{typ: 2, queues: 16, features: blkFMQ, config: blkCfg})
	d3, err := c.connectExternal(ctx, 2, externalSpec(t, "type=blk,queues=4,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer d3.shutdown(c.log)
	if b, err := d3.backend.GetConfig(0, 8); err != nil || binary.LittleEndian.Uint64(b) != 2048 {
		t.Errorf("capacity % x, %v", b, err)
	}
	if b, err := d3.backend.GetConfig(34, 2); err != nil || binary.LittleEndian.Uint16(b) != 4 {
		t.Errorf("num_queues % x, %v: want 4", b, err)
	}

	// net without a config space: no MAC, status or control-queue features.
	sock = serveFake(t, &fakeDevice{typ: 1, queues: 2, features: netFMAC | netFStatus | netFCtrlVQ | netFMQ | 1<<0})
	d4, err := c.connectExternal(ctx, 3, externalSpec(t, "type=net,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer d4.shutdown(c.log)
	for _, f := range []uint64{netFMAC, netFStatus, netFCtrlVQ, netFMQ} {
		if d4.featureMask&f == 0 {
			t.Errorf("net feature %#x offered to the guest", f)
		}
	}
	if d4.featureMask&1 != 0 {
		t.Error("VIRTIO_NET_F_CSUM masked")
	}
}

func TestExternalErrors(t *testing.T) {
	c := NewContext(nil)
	dir := shortDir(t)

	// Accepts and closes at once.
	closing := filepath.Join(dir, "closing.sock")
	lc, err := net.Listen("unix", closing)
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	go func() {
		for {
			conn, err := lc.Accept()
			if err != nil {
				return
			}
			conn.Close()
		}
	}()
	// Accepts and never answers.
	silent := filepath.Join(dir, "silent.sock")
	ls, err := net.Listen("unix", silent)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()
	go func() {
		for {
			conn, err := ls.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
		}
	}()
	fs2 := serveFake(t, &fakeDevice{typ: 26, queues: 2})
	blkNoCfg := serveFake(t, &fakeDevice{typ: 2, queues: 1})
	blk1 := serveFake(t, &fakeDevice{typ: 2, queues: 4, config: make([]byte, 60)})

	for _, tt := range []struct {
		spec string
		want string
	}{
		{"type=blk,socket=" + filepath.Join(dir, "absent.sock"), "connect to vhost-user back-end " + filepath.Join(dir, "absent.sock") + ": no such file or directory"},
		{"type=blk,socket=" + closing, "refused the negotiation"},
		{"type=blk,socket=" + silent, "did not answer the negotiation within "},
		{"type=fs,queues=2,tag=x,socket=" + fs2, "serves at most 2 queue(s), the device needs 3"},
		{"type=fs,socket=" + fs2, "set it with tag="},
		{"type=blk,socket=" + blkNoCfg, "needs for the disk's capacity"},
		{"type=blk,queues=2,socket=" + blk1, "does not offer VIRTIO_BLK_F_MQ"},
	} {
		// 300 ms for the back-end that never answers; the in-process
		// fakes get time to negotiate on a loaded machine.
		limit := 5 * time.Second
		if strings.Contains(tt.want, "within ") {
			limit = 300 * time.Millisecond
		}
		ctx, cancel := context.WithTimeout(context.Background(), limit)
		start := time.Now()
		d, err := c.connectExternal(ctx, 0, externalSpec(t, tt.spec))
		cancel()
		if err == nil {
			d.shutdown(c.log)
			t.Errorf("%s: connected", tt.spec)
			continue
		}
		if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") || !strings.HasPrefix(err.Error(), "device 0 (type=") {
			t.Errorf("%s: error %q, want one line naming the device and containing %q", tt.spec, err, tt.want)
		}
		// The limit named is what was left of ctx's 300 ms when the
		// negotiation started: a loaded machine takes a millisecond or
		// more to get there ("within 298ms" failed the exact match).
		if strings.Contains(tt.want, "within ") {
			var ms int
			if m := negotiationLimit.FindStringSubmatch(err.Error()); m != nil {
				ms, _ = strconv.Atoi(m[1])
			}
			if ms <= 0 || time.Duration(ms)*time.Millisecond > limit {
				t.Errorf("%s: error %q, want the limit named, at most %v", tt.spec, err, limit)
			}
		}
		if took := time.Since(start); took > limit+3*time.Second {
			t.Errorf("%s: took %v", tt.spec, took)
		}
	}
}

// negotiationLimit finds the limit an external back-end's negotiation
// error names.
var negotiationLimit = regexp.MustCompile(`did not answer the negotiation within ([0-9]+)ms `)

// newDeviceMachine is a machine without KVM for devs: 16 MiB of guest
// memory in a memfd, test wiring; the memory goes when the test ends.
func newDeviceMachine(t testing.TB, log hclog.Logger, devs []*pluginDevice) *machine {
	t.Helper()
	f, err := guestmem.NewMemfd("test-ram", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	mem, err := guestmem.Map([]guestmem.Region{{GuestAddr: 0, Size: 16 << 20, File: f}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	return &machine{log: log, mem: mem, memFile: f, testWiring: nopWiring{}, devices: devs, events: make(chan event, 1)}
}

// nopWiring stands in for KVM's ioeventfds and irqfds.
type nopWiring struct{}

func (nopWiring) RegisterIOEventFD(uint64, uint32, uint64, int) error   { return nil }
func (nopWiring) UnregisterIOEventFD(uint64, uint32, uint64, int) error { return nil }
func (nopWiring) RegisterIRQFD(int, uint32) error                       { return nil }
func (nopWiring) UnregisterIRQFD(int, uint32) error                     { return nil }
func (nopWiring) IRQLine(uint32, bool) error                            { return nil }

// A back-end that goes away while the guest runs fails its device, as a
// plugin that dies does; a monitor whose run ends just returns.
func TestExternalHangup(t *testing.T) {
	for _, hangup := range []bool{true, false} {
		c := NewContext(hclog.NewNullLogger())
		sock := filepath.Join(shortDir(t), "be.sock")
		f := backendtest.Listen(t, sock)
		sctx, stopServer := context.WithCancel(context.Background())
		served := make(chan struct{})
		go func() {
			defer close(served)
			// A connected session ends when its context does: the
			// back-end closes the connection.
			backend.Serve(sctx, f, &fakeDevice{typ: 4, queues: 1}, nil)
		}()
		d, err := c.connectExternal(context.Background(), 0, externalSpec(t, "type=4,socket="+sock))
		if err != nil {
			t.Fatal(err)
		}
		d.dev, err = mmio.New(mmio.Config{DeviceID: 4, Base: MMIOBase, GSI: 16, NumQueues: 1, QueueSizeMax: 256,
			Backend: d.backend, Wiring: nopWiring{}, Translate: func(gpa, _ uint64) (uint64, error) { return gpa, nil }})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		watched := make(chan struct{})
		go func() { d.monitor(ctx); close(watched) }()
		if hangup {
			stopServer()
			f.Close()
		} else {
			cancel()
		}
		select {
		case <-watched:
		case <-time.After(5 * time.Second):
			t.Fatalf("hang-up %v: the monitor did not return", hangup)
		}
		err = d.dev.Failed()
		switch {
		case hangup && (err == nil || !strings.Contains(err.Error(), sock+" disconnected")):
			t.Errorf("after the back-end left: device error %v", err)
		case !hangup && err != nil:
			t.Errorf("after a clean end: device failed: %v", err)
		}
		cancel()
		stopServer()
		f.Close()
		<-served
		d.shutdown(c.log)
	}
}

// Validate refuses, before anything starts, what Start would fail on late.
func TestValidate(t *testing.T) {
	dir := shortDir(t)
	k := filepath.Join(dir, "bzImage")
	os.WriteFile(k, []byte("x"), 0o644)
	t.Setenv("KRUN_PLUGIN_DIR", "")
	for _, tt := range []struct {
		name string
		set  func(c *Context) error
		want string
	}{
		{"missing plugin dir", func(c *Context) error { c.SetPluginDir(filepath.Join(dir, "nope")); return nil }, "--plugin-dir " + filepath.Join(dir, "nope") + ": no such directory"},
		{"missing plugin", func(c *Context) error {
			c.SetPluginDir(dir)
			return c.AddDevice(&devspec.PluginSpec{PluginKind: "nonexistent-kind"})
		}, "krun-plugin-nonexistent-kind not found"},
		{"missing socket", func(c *Context) error {
			return c.AddVhostUser("blk", filepath.Join(dir, "absent.sock"), VhostUserOptions{})
		}, "absent.sock: no such file or directory"},
		{"socket is a file", func(c *Context) error { return c.AddVhostUser("fs", k, VhostUserOptions{Tag: "t"}) }, "is not a socket"},
		{"two shares with one tag", func(c *Context) error {
			c.AddDevice(&devspec.FSSpec{Path: dir, Tag: "same"})
			return c.AddDevice(&devspec.FSSpec{Path: dir, Tag: "same", Mount: "/elsewhere"})
		}, `two shares with the tag "same"`},
		{"a share and an external back-end with one tag", func(c *Context) error {
			c.AddDevice(&devspec.FSSpec{Path: dir, Tag: "same"})
			return c.AddVhostUser("fs", k, VhostUserOptions{Tag: "same"})
		}, `two shares with the tag "same"`},
		{"grant without its plugin", func(c *Context) error {
			g := devspec.SyscallGrants{}
			c.SetPluginSyscalls(g)
			return g.Add("hello=sysinfo")
		}, "--plugin-syscalls hello: no --plugin hello to grant them to"},
	} {
		c := NewContext(nil)
		if err := c.SetKernel(k, "", ""); err != nil {
			t.Fatal(err)
		}
		if err := tt.set(c); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: Validate = %v, want one line containing %q", tt.name, err, tt.want)
		}
	}
	if err := NewContext(nil).AddVhostUser("scsi", "/x.sock", VhostUserOptions{}); !errors.Is(err, ErrConfig) {
		t.Errorf("AddVhostUser with an unknown type: %v", err)
	}
}

// startDaemon runs a third-party back-end until the test ends and returns
// once sock exists.
func startDaemon(t *testing.T, sock string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Skipf("%s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s exited: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not create %s: %s", name, sock, out.String())
		}
	}
}

// The core negotiates with qemu-storage-daemon and the C virtiofsd as it
// would for krun-core run: qsd's config space gives the capacity, the
// virtiofsd has none and the tag comes from the options.
func TestExternalThirdParty(t *testing.T) {
	c := NewContext(nil)
	t.Run("qemu-storage-daemon", func(t *testing.T) {
		qsd, err := exec.LookPath("qemu-storage-daemon")
		if err != nil {
			t.Skip("qemu-storage-daemon is not installed (Debian package qemu-utils)")
		}
		dir := shortDir(t)
		img := filepath.Join(dir, "disk.raw")
		if err := os.WriteFile(img, make([]byte, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "blk.sock")
		startDaemon(t, sock, qsd, "--blockdev", "driver=file,node-name=f,filename="+img,
			"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="+sock+",writable=on,num-queues=2")
		d := connectRetry(t, c, "type=blk,queues=2,socket="+sock)
		defer d.shutdown(c.log)
		if b, err := d.backend.GetConfig(0, 8); err != nil || binary.LittleEndian.Uint64(b) != 8<<20>>9 {
			t.Errorf("capacity % x, %v: want %d sectors", b, err, 8<<20>>9)
		}
		if b, err := d.backend.GetConfig(blkConfigNumQueues, 2); err != nil || binary.LittleEndian.Uint16(b) != 2 {
			t.Errorf("num_queues % x, %v", b, err)
		}
		// qemu-storage-daemon ignores GET_CONFIG's offset: the core
		// reads from 0 and picks the field itself.
		if b, err := d.backend.GetConfig(20, 4); err != nil || binary.LittleEndian.Uint32(b) != 512 {
			t.Errorf("blk_size % x, %v: want 512", b, err)
		}
		if _, err := d.backend.GetConfig(200, 4); err == nil {
			t.Error("a read past virtio_blk_config reached the back-end")
		}
	})
	t.Run("virtiofsd", func(t *testing.T) {
		const virtiofsd = "/usr/lib/qemu/virtiofsd"
		if _, err := os.Stat(virtiofsd); err != nil {
			t.Skipf("%s is not installed (Debian package qemu-system-common)", virtiofsd)
		}
		if os.Getuid() != 0 {
			t.Skip("the C virtiofsd needs root for its sandbox")
		}
		dir := shortDir(t)
		sock := filepath.Join(dir, "fs.sock")
		startDaemon(t, sock, virtiofsd, "--socket-path="+sock, "-o", "source="+dir)
		d := connectRetry(t, c, "type=fs,tag=share,socket="+sock)
		defer d.shutdown(c.log)
		if d.negotiated.ProtocolFeatures&vhostuser.ProtocolConfig != 0 {
			t.Skip("this virtiofsd has a config space of its own")
		}
		if tag, err := d.backend.GetConfig(0, 36); err != nil || string(bytes.TrimRight(tag, "\x00")) != "share" {
			t.Errorf("tag %q, %v", tag, err)
		}
	})
}

// connectRetry connects while the daemon's socket exists but does not
// listen yet.
func connectRetry(t *testing.T, c *Context, spec string) *pluginDevice {
	t.Helper()
	return connectRetryCtx(t, context.Background(), c, spec)
}

// connectRetryCtx is connectRetry under ctx.
func connectRetryCtx(t *testing.T, ctx context.Context, c *Context, spec string) *pluginDevice {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		d, err := c.connectExternal(ctx, 0, externalSpec(t, spec))
		if err == nil {
			return d
		}
		if !strings.Contains(err.Error(), "connection refused") || time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
}

// TestTagsAfterPrepareExec: Start runs Validate after prepareExec has put
// the root share among the devices: the root's own tag is no duplicate,
// and a user's share keeps its tag check (CI caught the first version,
// which refused every run with a root).
func TestTagsAfterPrepareExec(t *testing.T) {
	for _, tt := range []struct {
		name   string
		shares []string
		want   string // "" for no error
	}{
		{"the root alone", nil, ""},
		{"the root and a share", []string{"data"}, ""},
		{"two shares with one tag", []string{"data", "data"}, `two shares with the tag "data"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := prepTestExecErr(t, nil, func(c *Context) {
				for i, tag := range tt.shares {
					c.AddDevice(&devspec.FSSpec{Path: t.TempDir(), Tag: tag, Mount: fmt.Sprintf("/m%d", i)})
				}
			})
			if err == nil {
				err = c.checkTags()
			}
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("got %v, want no error", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("got %v, want an error with %q", err, tt.want)
			}
		})
	}
}
