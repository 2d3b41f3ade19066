package kruninit_test

import (
	"io"
	stdnet "net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/initconfig"
	"github.com/krun-core/krun-core/internal/netnstest"
	"github.com/krun-core/krun-core/internal/vmtest"
)

// TestNetwork: krun-init takes its address, route and DNS server from
// passt's DHCP, or from the config, and the command reaches an HTTP server
// on the host side through the gateway address.
func TestNetwork(t *testing.T) {
	for _, tc := range []struct {
		name string
		net  *initconfig.Network
	}{
		{"dhcp", &initconfig.Network{DHCP: true}},
		// passt's view of the guest is the namespace's own address.
		{"static", &initconfig.Network{Address: netnstest.Addr + "/24", Gateway: netnstest.Gateway, DNS: []string{netnstest.Gateway}}},
	} {
		t.Run(tc.name, func(t *testing.T) { testNetwork(t, tc.net) })
	}
}

func testNetwork(t *testing.T, network *initconfig.Network) {
	a := vmtest.Require(t)
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	ns := netnstest.New(t)

	mux := http.NewServeMux()
	mux.HandleFunc("/page", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello from the host\n") })
	var l stdnet.Listener
	if err := netnstest.Run(ns, func() (err error) {
		l, err = stdnet.Listen("tcp", "0.0.0.0:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	port := strconv.Itoa(l.Addr().(*stdnet.TCPAddr).Port)

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	qemuEnd := os.NewFile(uintptr(fds[0]), "qemu-end")
	defer qemuEnd.Close()
	netnstest.StartPasst(t, ns, os.NewFile(uintptr(fds[1]), "passt-end"))

	cfg := initconfig.New("sh", "-c", `
ip -4 -o addr show dev eth0 | awk '{print "addr=" $4}'
gw=$(ip route | awk '/^default/ {print $3}')
echo "gw=$gw"
grep -q '^nameserver ' /etc/resolv.conf && echo resolv=ok
grep -q 192.0.2.99 /etc/resolv.conf || echo replaced=ok
ip link show lo | grep -q 'state UNKNOWN\|UP' && echo lo=up
wget -q -O - "http://$gw:`+port+`/page"`)
	cfg.Network = network
	// The root's own resolv.conf is replaced (reopened through
	// /proc/self/fd on virtio-fs: krun-init opens only a regular file).
	root := makeRoot(t, a.Busybox)
	if err := os.WriteFile(filepath.Join(root, "etc/resolv.conf"), []byte("nameserver 192.0.2.99\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	o := run(t, guest{cfg: cfg, root: root, net: true, files: []*os.File{qemuEnd},
		args: []string{"-netdev", "socket,id=n0,fd=3", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:57"}})
	o.checkFinished(t, 0)
	for _, want := range []string{"addr=" + netnstest.Addr + "/24\n", "gw=" + netnstest.Gateway + "\n", "resolv=ok\n", "replaced=ok\n", "lo=up\n", "hello from the host\n"} {
		if !strings.Contains(o.stdout, want) {
			t.Errorf("stdout lacks %q: %q", want, o.stdout)
		}
	}
}
