// Package net_test is the end-to-end test of the passt network plugin: QEMU
// (TCG) boots Debian's stock kernel against `krun-core serve --net passt`,
// the guest takes its address from passt's DHCP, fetches a page from an HTTP
// server through the gateway address, and serves a page that the host
// fetches through a forwarded port. Everything runs inside a network
// namespace the test creates, so no packet leaves the machine.
//
// Not covered yet: the 8 MiB download the issue asks for. With Debian 12's
// passt (2023-03) on this project's host kernel, bulk host-to-guest TCP
// stalls after about 140 KB: a capture of passt's guest side shows passt
// stop sending while the guest has acknowledged everything and its window
// is open.
package net_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	stdnet "net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// bins are krun-core and the net plugin, built side by side.
var bins = vmtest.BinSet{Name: "net", Pkgs: map[string]string{
	"krun-core":             "github.com/krun-core/krun-core/cmd/krun-core",
	"krun-plugin-net-passt": "github.com/krun-core/krun-core/plugins/net-passt",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// serve starts `krun-core serve` and waits for its socket.
func serve(t *testing.T, netns, bin string, args ...string) (socket string, stop func() string) {
	t.Helper()
	socket = filepath.Join(t.TempDir(), "net.sock")
	ctx, cancel := context.WithCancel(context.Background())
	argv := append([]string{"netns", "exec", netns, filepath.Join(bin, "krun-core"), "serve", "--socket", socket}, args...)
	cmd := exec.CommandContext(ctx, "ip", argv...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		select {
		case err := <-exited:
			cancel()
			t.Fatalf("krun-core serve exited before listening: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("krun-core serve did not listen within 30 s\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	done := false
	stop = func() string {
		if !done {
			done = true
			cmd.Process.Signal(os.Interrupt)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				cancel()
				<-exited
			}
		}
		return logs.String()
	}
	t.Cleanup(func() {
		if out := stop(); t.Failed() {
			t.Logf("krun-core serve output:\n%s", out)
		}
	})
	return socket, stop
}

// The test network: a namespace of the test's own with a veth interface
// holding the default route, from which passt copies the guest's address
// and gateway. The gateway address is local to the namespace, so whatever
// passt does with a connection to it (map it to loopback or connect to it),
// it ends at the test's HTTP server there. No packet leaves the namespace.
const (
	nsGuestAddr = "10.200.0.2"
	nsGateway   = "10.200.0.1"
)

// newTestNetns creates the namespace and returns its name.
func newTestNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating the test's network namespace needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip (iproute2) is not installed")
	}
	name := fmt.Sprintf("krun-nettest-%d", os.Getpid())
	run := func(args ...string) {
		if b, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run("-n", name, "link", "set", "lo", "up")
	// Both ends of the veth pair stay inside the namespace.
	run("-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
	run("-n", name, "addr", "add", nsGuestAddr+"/24", "dev", "veth0")
	run("-n", name, "link", "set", "veth0", "up")
	run("-n", name, "link", "set", "veth1", "up")
	run("-n", name, "addr", "add", nsGateway+"/24", "dev", "veth1")
	run("-n", name, "route", "add", "default", "via", nsGateway, "dev", "veth0")
	return name
}

// inNetns runs fn on an OS thread that has entered the namespace; sockets
// fn creates belong to it. The thread goes back to its own namespace
// afterwards. It must not simply exit: a child process started from that
// thread earlier (QEMU, with a parent-death signal) would be killed.
func inNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer home.Close()
		f, err := os.Open("/var/run/netns/" + name)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); rerr == nil {
			runtime.UnlockOSThread()
		} // else: stay locked, the runtime retires the thread
		errc <- err
	}()
	return <-errc
}

const udhcpcScript = `#!/bin/sh
case "$1" in
bound|renew)
	ifconfig "$interface" "$ip" netmask "$subnet" up
	route add default gw "$router" dev "$interface"
	echo "$router" > /tmp/gateway
	;;
esac
`

func TestPasstGuest(t *testing.T) {
	a := vmtest.Require(t)
	if _, err := exec.LookPath("passt"); err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	ns := newTestNetns(t)
	bin := bins.Dir(t)

	// The host's HTTP server, inside the test's namespace.
	mux := http.NewServeMux()
	mux.HandleFunc("/page", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello from the host\n") })
	var l stdnet.Listener
	if err := inNetns(ns, func() (err error) {
		l, err = stdnet.Listen("tcp", "0.0.0.0:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	httpPort := l.Addr().(*stdnet.TCPAddr).Port

	const fwd = 18080 // the namespace is new: every port is free
	socket, stop := serve(t, ns, bin, "--net", fmt.Sprintf("passt,mac=52:54:00:12:34:56,ports=%d:80", fwd))

	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_pci", "virtio_net")
	ib.AddBytes("/udhcpc.sh", []byte(udhcpcScript), 0o755)
	ib.AddBytes("/www/index.html", []byte("hello from the guest\n"), 0o644)
	ib.SetInit(fmt.Sprintf(`
mount -t tmpfs -o size=64m tmpfs /tmp
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -s /udhcpc.sh -q -n -t 10 -T 2 || e2e_fail "no DHCP lease from passt"
gw=$(cat /tmp/gateway)
ip -4 addr show eth0
# nc -w: Debian 12's passt (2023) does not relay the server's FIN once the
# guest has half-closed, so end the read when the connection goes quiet.
fetched=
for try in 1 2 3 4 5; do
	printf 'GET /page HTTP/1.0\r\n\r\n' | timeout 20 nc -w 5 "$gw" %[1]d > /tmp/page || true
	if grep -q "hello from the host" /tmp/page; then fetched=$try; break; fi
	echo "page fetch attempt $try failed"
done
[ -n "$fetched" ] || e2e_fail "page not fetched: $(cat /tmp/page)"
echo "page fetched on attempt $fetched"
echo "GUEST-FETCH-OK"
httpd -p 80 -h /www
echo "GUEST-HTTPD-READY"
read answer
[ "$answer" = done ] || e2e_fail "host said $answer"
`, httpPort))

	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 300 * time.Second})
	// vectors=0: QEMU 7.2 crashes setting up MSI-X vector notifiers
	// for vhost-user-net under TCG; INTx avoids that code.
	// vectors=0: QEMU 7.2 crashes setting up MSI-X vector notifiers for
	// vhost-user-net under TCG; INTx avoids that code.
	vm.AddVhostUserNet(socket, "mac=52:54:00:12:34:56", "vectors=0")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Expect("GUEST-FETCH-OK", 240*time.Second); err != nil {
		vm.Kill()
		r, werr := vm.Wait()
		if r != nil {
			t.Fatalf("guest did not fetch: %v (QEMU exit: %v, wait: %v)\n%s", err, r.ExitErr, werr, r.Stderr)
		}
		t.Fatalf("guest did not fetch: %v (wait: %v)", err, werr)
	}
	vm.MustExpect("GUEST-HTTPD-READY", 30*time.Second)

	// host -> guest through passt's port forward. A try can come back
	// empty (passt's 2023 TCP path, see the package comment), so retry.
	const want = "hello from the guest\n"
	var tries []string
	deadline := time.Now().Add(60 * time.Second)
	for {
		var body string
		err := inNetns(ns, func() error {
			// Dial on this thread, inside the namespace.
			c, err := stdnet.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", fwd), 10*time.Second)
			if err != nil {
				return err
			}
			tr := &http.Transport{DialContext: func(context.Context, string, string) (stdnet.Conn, error) { return c, nil }}
			resp, err := (&http.Client{Timeout: 10 * time.Second, Transport: tr}).Get("http://guest/index.html")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			body = string(b)
			if err == nil && resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %s", resp.Status)
			}
			return err
		})
		if err == nil && body == want {
			break
		}
		tries = append(tries, fmt.Sprintf("%q/%v", body, err))
		if time.Now().After(deadline) {
			t.Fatalf("host could not fetch the guest's page through ports=%d:80; tries: %v", fwd, tries)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("forwarded port answered after %d failed tries: %v", len(tries), tries)
	if err := vm.Send("done\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Wait(); err != nil {
		t.Fatal(err)
	}
	logs := stop()
	if strings.Contains(logs, "panic") {
		t.Fatalf("serve logged a panic:\n%s", logs)
	}
}
