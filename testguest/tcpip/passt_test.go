package tcpip_test

import (
	"context"
	"fmt"
	stdnet "net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	netdev "github.com/krun-core/krun-core/devices/net"
	"github.com/krun-core/krun-core/internal/netnstest"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/testguest/tcpip"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

var guestMAC = [6]byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}

// rig is passt in a namespace of the test's own with a TCP echo server on
// the namespace's loopback.
type rig struct {
	ns       string
	passt    *os.File // our end of passt's socket pair
	echoPort uint16
	dev      *netdev.Device // the virtio-net device, if any
}

func newRig(t testing.TB) *rig {
	t.Helper()
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	r := &rig{ns: netnstest.New(t)}
	var l stdnet.Listener
	if err := netnstest.Run(r.ns, func() (err error) {
		l, err = stdnet.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go tcpip.ServeEcho(l)
	r.echoPort = uint16(l.Addr().(*stdnet.TCPAddr).Port)

	ours, theirs, err := devspec.PasstSocketPair()
	if err != nil {
		t.Fatal(err)
	}
	r.passt = ours
	netnstest.StartPasst(t, r.ns, theirs)
	return r
}

// directLink frames straight to passt.
func (r *rig) directLink(t testing.TB) tcpip.Link {
	c, err := stdnet.FileConn(r.passt)
	if err != nil {
		t.Fatal(err)
	}
	r.passt.Close()
	l := tcpip.NewPasstLink(c)
	t.Cleanup(func() { l.Close() })
	return l
}

// virtioLink serves the virtio-net device over vhost-user in this process
// and drives its tx and rx queues with the test guest.
func (r *rig) virtioLink(t testing.TB) tcpip.Link {
	dev, err := netdev.New(netdev.Config{MAC: guestMAC[:], Conn: r.passt})
	if err != nil {
		t.Fatal(err)
	}
	r.dev = dev
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	devEnd := os.NewFile(uintptr(fds[0]), "vhost-user-backend")
	drvEnd := os.NewFile(uintptr(fds[1]), "vhost-user-frontend")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- backend.Serve(ctx, devEnd, dev, nil) }()
	fc, err := frontend.NewFromFile(drvEnd)
	drvEnd.Close()
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.Start(fc, testguest.Options{NumQueues: 2, Features: testguest.NetFeatures,
		RequiredFeatures: testguest.NetFMrgRxbuf, NoIndirect: true, MemSize: 96 << 20})
	if err != nil {
		t.Fatal(err)
	}
	n, err := testguest.NewNet(g)
	if err != nil {
		t.Fatal(err)
	}
	// The config space, read over vhost-user: MAC, link up, passt's MTU.
	if n.Config.MAC != guestMAC || n.Config.Status&1 == 0 || n.Config.MTU != netdev.DefaultMTU {
		t.Fatalf("config space %+v, want MAC %x, link up, MTU %d", n.Config, guestMAC, netdev.DefaultMTU)
	}
	t.Cleanup(func() {
		n.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("vhost-user back-end: %v", err)
		}
		devEnd.Close()
		dev.Close()
	})
	return n
}

// links are the two ways to passt the tests and benchmarks compare.
var links = []struct {
	name string
	make func(*rig, testing.TB) tcpip.Link
}{
	{"passt-socket", (*rig).directLink},
	{"virtio-net", (*rig).virtioLink},
}

func TestEcho(t *testing.T) {
	for _, l := range links {
		for _, mss := range []int{1460, 65480} {
			t.Run(fmt.Sprintf("%s/mss-%d", l.name, mss), func(t *testing.T) {
				r := newRig(t)
				e := tcpip.New(l.make(r, t), guestMAC)
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				lease, err := e.DHCP(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if lease.Addr.String() != netnstest.Addr || lease.Gateway.String() != netnstest.Gateway {
					t.Fatalf("lease %+v, want address %s and gateway %s (copied from the namespace)", lease, netnstest.Addr, netnstest.Gateway)
				}
				res, err := e.Echo(ctx, netip.AddrPortFrom(lease.Gateway, r.echoPort), tcpip.EchoOptions{Bytes: 32 << 20, MSS: mss})
				if err != nil {
					if r.dev != nil {
						t.Logf("device counters: %v", r.dev.Counters())
					}
					t.Fatalf("%v (%+v)", err, res)
				}
				if res.Bytes != 32<<20 || res.TxFrames == 0 || res.RxFrames == 0 {
					t.Fatalf("result %+v", res)
				}
				t.Logf("%.0f frames/s, %.1f MiB/s each way; %+v", res.FramesPerSecond(), res.MiBPerSecond(), res)
			})
		}
	}
}

// BenchmarkEcho sends b.N MiB through passt to the echo server on
// loopback and back, over passt's socket directly and over the
// virtio-net device's queues.
func BenchmarkEcho(b *testing.B) {
	for _, l := range links {
		for _, mss := range []int{1460, 65480} {
			b.Run(fmt.Sprintf("%s/mss-%d", l.name, mss), func(b *testing.B) {
				r := newRig(b)
				e := tcpip.New(l.make(r, b), guestMAC)
				ctx := context.Background()
				lease, err := e.DHCP(ctx)
				if err != nil {
					b.Fatal(err)
				}
				b.SetBytes(1 << 20)
				b.ResetTimer()
				res, err := e.Echo(ctx, netip.AddrPortFrom(lease.Gateway, r.echoPort), tcpip.EchoOptions{Bytes: int64(b.N) << 20, MSS: mss})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(res.FramesPerSecond(), "frames/s")
				b.ReportMetric(float64(res.Retransmits), "retransmits")
			})
		}
	}
}

// TestCloseWhileReading: closing the virtio-net link while the endpoint's
// reader waits in ReadFrame ends the read with an error, not a fault on
// unmapped guest memory.
func TestCloseWhileReading(t *testing.T) {
	r := newRig(t)
	l := r.virtioLink(t)
	e := tcpip.New(l, guestMAC)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.DHCP(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		time.Sleep(time.Millisecond)
		if err := l.(*testguest.Net).Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.DHCP(ctx); err == nil {
		t.Fatal("DHCP over a closed link succeeded")
	}
}
